#include "src/migration/socket_transport.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <vector>

namespace faultline::migration {
namespace {

// sendmsg/recvmsg take at most IOV_MAX (1024) pieces per call.
constexpr size_t kMaxIov = 1024;

struct SocketAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;
  int family() const { return storage.ss_family; }
  const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(&storage); }
};

Result<SocketAddress> ToSocketAddress(const Address& address) {
  SocketAddress out;
  if (address.is_unix()) {
    auto* un = reinterpret_cast<sockaddr_un*>(&out.storage);
    if (address.path.empty() || address.path.size() >= sizeof(un->sun_path)) {
      return Error("{}: not a Unix socket path of 1..{} bytes", address.ToString(),
                   sizeof(un->sun_path) - 1);
    }
    un->sun_family = AF_UNIX;
    std::memcpy(un->sun_path, address.path.data(), address.path.size());
    out.length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + address.path.size() + 1);
    return out;
  }
  auto* v4 = reinterpret_cast<sockaddr_in*>(&out.storage);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&out.storage);
  if (inet_pton(AF_INET, address.host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(address.port);
    out.length = sizeof(sockaddr_in);
  } else if (inet_pton(AF_INET6, address.host.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(address.port);
    out.length = sizeof(sockaddr_in6);
  } else {
    return Error("{}: not a numeric IPv4 or IPv6 address", address.ToString());
  }
  return out;
}

// "127.0.0.1:4444" or "[::1]:4444".
std::string Format(const sockaddr_storage& storage) {
  char host[INET6_ADDRSTRLEN] = "?";
  if (storage.ss_family == AF_INET) {
    const auto* v4 = reinterpret_cast<const sockaddr_in*>(&storage);
    inet_ntop(AF_INET, &v4->sin_addr, host, sizeof(host));
    return fmt::format("{}:{}", host, ntohs(v4->sin_port));
  }
  const auto* v6 = reinterpret_cast<const sockaddr_in6*>(&storage);
  inet_ntop(AF_INET6, &v6->sin6_addr, host, sizeof(host));
  return fmt::format("[{}]:{}", host, ntohs(v6->sin6_port));
}

// The path of a bound Unix socket address, or "" (an unnamed end).
std::string UnixPath(const sockaddr_storage& storage, socklen_t length) {
  const auto* un = reinterpret_cast<const sockaddr_un*>(&storage);
  const size_t offset = offsetof(sockaddr_un, sun_path);
  if (length <= offset || un->sun_path[0] == '\0') return "";
  return std::string(un->sun_path, strnlen(un->sun_path, length - offset));
}

std::string Endpoints(int fd) {
  sockaddr_storage local{}, peer{};
  socklen_t local_len = sizeof(local), peer_len = sizeof(peer);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_len) != 0 ||
      getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_len) != 0) {
    return "socket (unconnected)";
  }
  if (local.ss_family == AF_UNIX) {
    // One end of a Unix connection has the listener's name, the other none.
    std::string path = UnixPath(peer, peer_len);
    if (path.empty()) path = UnixPath(local, local_len);
    return fmt::format("unix {}", path.empty() ? "(unnamed)" : path);
  }
  return fmt::format("tcp {} -> {}", Format(local), Format(peer));
}

Status SetIntOption(int fd, int level, int option, int value, const char* what) {
  if (setsockopt(fd, level, option, &value, sizeof(value)) != 0) {
    return ErrnoError(errno, "setsockopt({})", what);
  }
  return Status::Ok();
}

Status SetTimeout(int fd, int option, std::chrono::milliseconds timeout, const char* what) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(timeout.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((timeout.count() % 1000) * 1000);
  if (setsockopt(fd, SOL_SOCKET, option, &tv, sizeof(tv)) != 0) {
    return ErrnoError(errno, "setsockopt({})", what);
  }
  return Status::Ok();
}

// TransportOptions::link_timeout on a TCP socket. Keepalive probes find a
// peer that vanished without closing (a host that died, a cut link) while
// this side waits legitimately long for a message; TCP_USER_TIMEOUT ends a
// connection whose data, or whose probes, nobody acknowledged for that long
// (it overrides TCP_KEEPCNT once set; the count is the equivalent anyway).
Status ApplyLinkTimeout(int fd, std::chrono::milliseconds timeout) {
  if (timeout < std::chrono::seconds(1) || timeout > std::chrono::hours(1)) {
    return Error("link timeout {} ms: give 1000 ms to 1 h", timeout.count());
  }
  const int total_s = static_cast<int>(timeout.count() / 1000);
  const int idle_s = std::max(1, total_s / 3);
  const int interval_s = std::max(1, total_s / 6);
  const int probes = std::clamp((total_s - idle_s + interval_s - 1) / interval_s, 1, 127);
  RETURN_IF_ERROR(SetIntOption(fd, SOL_SOCKET, SO_KEEPALIVE, 1, "SO_KEEPALIVE"));
  RETURN_IF_ERROR(SetIntOption(fd, IPPROTO_TCP, TCP_KEEPIDLE, idle_s, "TCP_KEEPIDLE"));
  RETURN_IF_ERROR(SetIntOption(fd, IPPROTO_TCP, TCP_KEEPINTVL, interval_s, "TCP_KEEPINTVL"));
  RETURN_IF_ERROR(SetIntOption(fd, IPPROTO_TCP, TCP_KEEPCNT, probes, "TCP_KEEPCNT"));
  return SetIntOption(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, static_cast<int>(timeout.count()),
                      "TCP_USER_TIMEOUT");
}

// Walks a list of buffers as one byte stream: fills an iovec array from the
// current position and advances past what a syscall transferred.
template <typename Buffer>
class IovCursor {
 public:
  explicit IovCursor(std::span<const Buffer> parts) : parts_(parts) {
    for (const Buffer& p : parts) total_ += p.size();
  }
  bool done() const { return done_bytes_ == total_; }
  uint64_t done_bytes() const { return done_bytes_; }
  uint64_t total() const { return total_; }

  size_t Fill(iovec* iov) const {
    size_t n = 0;
    size_t offset = offset_;
    for (size_t i = part_; i < parts_.size() && n < kMaxIov; ++i, offset = 0) {
      if (parts_[i].size() == offset) continue;
      iov[n].iov_base = const_cast<uint8_t*>(parts_[i].data() + offset);
      iov[n].iov_len = parts_[i].size() - offset;
      ++n;
    }
    return n;
  }
  void Advance(size_t bytes) {
    done_bytes_ += bytes;
    while (bytes > 0) {
      const size_t left = parts_[part_].size() - offset_;
      if (bytes < left) {
        offset_ += bytes;
        return;
      }
      bytes -= left;
      ++part_;
      offset_ = 0;
    }
  }

 private:
  std::span<const Buffer> parts_;
  size_t part_ = 0;
  size_t offset_ = 0;  // into parts_[part_]
  uint64_t total_ = 0;
  uint64_t done_bytes_ = 0;
};

}  // namespace

Result<bool> PollReadable(int fd, std::chrono::milliseconds timeout) {
  pollfd pfd{fd, POLLIN, 0};
  ASSIGN_OR_RETURN(int ready, PollAny(std::span<pollfd>(&pfd, 1), timeout));
  return ready > 0;
}

Result<std::unique_ptr<SocketChannel>> SocketChannel::Adopt(sys::UniqueFd fd,
                                                            const TransportOptions& options) {
  const int s = fd.get();
  sockaddr_storage local{};
  socklen_t local_len = sizeof(local);
  if (getsockname(s, reinterpret_cast<sockaddr*>(&local), &local_len) != 0) {
    return ErrnoError(errno, "getsockname");
  }
  const bool is_unix = local.ss_family == AF_UNIX;
  RETURN_IF_ERROR(SetTimeout(s, SO_SNDTIMEO, options.io_timeout, "SO_SNDTIMEO"));
  RETURN_IF_ERROR(SetTimeout(s, SO_RCVTIMEO, options.io_timeout, "SO_RCVTIMEO"));
  if (!is_unix) {
    // (A Unix peer that dies is closed by its kernel at once.)
    RETURN_IF_ERROR(ApplyLinkTimeout(s, options.link_timeout));
  }
  if (options.socket_buffer_bytes > 0) {
    RETURN_IF_ERROR(
        SetIntOption(s, SOL_SOCKET, SO_SNDBUF, options.socket_buffer_bytes, "SO_SNDBUF"));
    RETURN_IF_ERROR(
        SetIntOption(s, SOL_SOCKET, SO_RCVBUF, options.socket_buffer_bytes, "SO_RCVBUF"));
  }
  std::string name = Endpoints(s);
  return std::unique_ptr<SocketChannel>(new SocketChannel(std::move(fd), std::move(name), is_unix));
}

SocketChannel::~SocketChannel() = default;

Status SocketChannel::IoError(int error, const char* what, uint64_t done, uint64_t total) const {
  if (shut_down_.load(std::memory_order_acquire)) {
    return Status(ESHUTDOWN, fmt::format("{}: {} after {} of {} bytes: channel shut down", name_,
                                         what, done, total));
  }
  if (error == EAGAIN || error == EWOULDBLOCK) {
    return Status(ETIMEDOUT, fmt::format("{}: {} made no progress within the I/O timeout ({} of "
                                         "{} bytes done)",
                                         name_, what, done, total));
  }
  if (error == 0) {
    return Status(ECONNRESET, fmt::format("{}: connection closed by the peer after {} of {} "
                                          "bytes",
                                          name_, done, total));
  }
  return ErrnoError(error, "{}: {} ({} of {} bytes done)", name_, what, done, total);
}

Status SocketChannel::SendGather(std::span<const ConstBuffer> parts) {
  IovCursor<ConstBuffer> cursor(parts);
  send_calls_.fetch_add(1, std::memory_order_relaxed);
  iovec iov[kMaxIov];
  // Each iteration either transfers bytes or returns; EINTR retries are
  // bounded in time by SO_SNDTIMEO.
  while (!cursor.done()) {
    if (shut_down_.load(std::memory_order_acquire)) {
      return IoError(ESHUTDOWN, "send", cursor.done_bytes(), cursor.total());
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = cursor.Fill(iov);
    const ssize_t n = sendmsg(fd_.get(), &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return IoError(errno, "send", cursor.done_bytes(), cursor.total());
    }
    cursor.Advance(static_cast<size_t>(n));
    bytes_sent_.fetch_add(static_cast<uint64_t>(n), std::memory_order_relaxed);
  }
  return Status::Ok();
}

Status SocketChannel::ReceiveScatter(std::span<const MutableBuffer> parts) {
  IovCursor<MutableBuffer> cursor(parts);
  receive_calls_.fetch_add(1, std::memory_order_relaxed);
  iovec iov[kMaxIov];
  while (!cursor.done()) {
    if (shut_down_.load(std::memory_order_acquire)) {
      return IoError(ESHUTDOWN, "receive", cursor.done_bytes(), cursor.total());
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = cursor.Fill(iov);
    // MSG_WAITALL: one syscall for the whole scatter list in the common case.
    const ssize_t n = recvmsg(fd_.get(), &msg, MSG_WAITALL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if ((errno == EAGAIN || errno == EWOULDBLOCK) && cursor.done_bytes() == 0 &&
          !shut_down_.load(std::memory_order_acquire)) {
        // Nothing consumed: the stream position is intact (see Channel).
        return Status(EAGAIN, fmt::format("{}: nothing received within the I/O timeout", name_));
      }
      return IoError(errno, "receive", cursor.done_bytes(), cursor.total());
    }
    if (n == 0) return IoError(0, "receive", cursor.done_bytes(), cursor.total());
    cursor.Advance(static_cast<size_t>(n));
    bytes_received_.fetch_add(static_cast<uint64_t>(n), std::memory_order_relaxed);
  }
  return Status::Ok();
}

void SocketChannel::Shutdown() {
  shut_down_.store(true, std::memory_order_release);
  // Wakes a sendmsg/recvmsg blocked in another thread; the fd stays open.
  ::shutdown(fd_.get(), SHUT_RDWR);
}

Status SocketChannel::SendWithFds(ConstBuffer bytes, std::span<const int> fds) {
  if (!is_unix_) return Channel::SendWithFds(bytes, fds);
  if (fds.empty() || bytes.empty()) return Send(bytes);
  if (fds.size() > kMaxPassedFds) {
    return Error("{}: {} descriptors to pass, at most {} at once", name_, fds.size(),
                 kMaxPassedFds);
  }
  std::vector<uint8_t> control(CMSG_SPACE(sizeof(int) * fds.size()));
  iovec iov{const_cast<uint8_t*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
  std::memcpy(CMSG_DATA(cmsg), fds.data(), sizeof(int) * fds.size());
  send_calls_.fetch_add(1, std::memory_order_relaxed);
  ssize_t n;
  do {
    n = sendmsg(fd_.get(), &msg, MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return IoError(errno, "send with descriptors", 0, bytes.size());
  bytes_sent_.fetch_add(static_cast<uint64_t>(n), std::memory_order_relaxed);
  // The descriptors went with the first byte; the rest is plain data.
  if (static_cast<size_t>(n) < bytes.size()) return Send(bytes.subspan(static_cast<size_t>(n)));
  return Status::Ok();
}

Result<std::vector<sys::UniqueFd>> SocketChannel::ReceiveWithFds(MutableBuffer bytes,
                                                                 size_t max_fds) {
  if (!is_unix_) return Channel::ReceiveWithFds(bytes, max_fds);
  if (bytes.empty()) return Error("{}: descriptors come with at least one byte", name_);
  std::vector<sys::UniqueFd> fds;
  ASSIGN_OR_RETURN(size_t n, ReceiveSome(bytes, max_fds, fds));
  if (n == 0) return IoError(0, "receive with descriptors", 0, bytes.size());
  if (n < bytes.size()) RETURN_IF_ERROR(Receive(bytes.subspan(n)));
  return fds;
}

Result<size_t> SocketChannel::ReceiveSome(MutableBuffer bytes, size_t max_fds,
                                          std::vector<sys::UniqueFd>& fds) {
  if (!is_unix_) return Status(EOPNOTSUPP, fmt::format("{}: not a Unix socket", name_));
  max_fds = std::min(max_fds, kMaxPassedFds);
  // Room for one more than allowed, so that too many shows as a count
  // rather than only as MSG_CTRUNC.
  std::vector<uint8_t> control(CMSG_SPACE(sizeof(int) * (max_fds + 1)));
  iovec iov{bytes.data(), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  receive_calls_.fetch_add(1, std::memory_order_relaxed);
  ssize_t n;
  do {
    n = recvmsg(fd_.get(), &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if ((errno == EAGAIN || errno == EWOULDBLOCK) && !shut_down_.load(std::memory_order_acquire)) {
      return Status(EAGAIN, fmt::format("{}: nothing received within the I/O timeout", name_));
    }
    return IoError(errno, "receive with descriptors", 0, bytes.size());
  }
  bytes_received_.fetch_add(static_cast<uint64_t>(n), std::memory_order_relaxed);
  // Owned from here, so that every return path closes them.
  const size_t before = fds.size();
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      fds.emplace_back(fd);
    }
  }
  if ((msg.msg_flags & MSG_CTRUNC) != 0 || fds.size() - before > max_fds) {
    return Error("{}: the peer passed more than {} descriptors", name_, max_fds);
  }
  return static_cast<size_t>(n);
}

Status SocketChannel::SetLowLatency(bool low_latency) {
  if (is_unix_) return Status::Ok();  // no Nagle on a Unix socket
  return SetIntOption(fd_.get(), IPPROTO_TCP, TCP_NODELAY, low_latency ? 1 : 0, "TCP_NODELAY")
      .WithContext(name_);
}

ChannelStats SocketChannel::stats() const {
  return ChannelStats{
      bytes_sent_.load(std::memory_order_relaxed), bytes_received_.load(std::memory_order_relaxed),
      send_calls_.load(std::memory_order_relaxed), receive_calls_.load(std::memory_order_relaxed)};
}

namespace {

// Before binding a Unix socket path: a socket file nobody listens on (its
// process exited without removing it) is removed; anything else there is an
// error that says what it is.
Status ClearStaleSocket(const Address& address, const SocketAddress& sa) {
  struct stat st {};
  if (lstat(address.path.c_str(), &st) != 0) {
    if (errno == ENOENT) return Status::Ok();
    return ErrnoError(errno, "listen on {}: stat", address.ToString());
  }
  if (!S_ISSOCK(st.st_mode)) {
    return Error("listen on {}: the path exists and is not a socket; choose another path",
                 address.ToString());
  }
  sys::UniqueFd probe(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!probe) return ErrnoError(errno, "socket for {}", address.ToString());
  if (connect(probe.get(), sa.get(), sa.length) == 0) {
    return Status(EADDRINUSE, fmt::format("listen on {}: another process listens on this socket; "
                                          "choose another path",
                                          address.ToString()));
  }
  if (errno != ECONNREFUSED) {
    return ErrnoError(errno, "listen on {}: probing the existing socket", address.ToString());
  }
  if (unlink(address.path.c_str()) != 0 && errno != ENOENT) {
    return ErrnoError(errno, "listen on {}: removing the stale socket", address.ToString());
  }
  return Status::Ok();
}

}  // namespace

SocketListener::~SocketListener() {
  if (!bound_.is_unix() || socket_inode_ == 0) return;
  // Only the file this listener made: another may have replaced it since.
  struct stat st {};
  if (lstat(bound_.path.c_str(), &st) == 0 && st.st_ino == socket_inode_) {
    unlink(bound_.path.c_str());
  }
}

Result<std::unique_ptr<SocketListener>> SocketListener::Listen(const Address& address,
                                                               const TransportOptions& options) {
  ASSIGN_OR_RETURN(SocketAddress sa, ToSocketAddress(address));
  sys::UniqueFd fd(socket(sa.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return ErrnoError(errno, "socket for {}", address.ToString());
  if (address.is_unix()) {
    RETURN_IF_ERROR(ClearStaleSocket(address, sa));
    // 0600 from the start (no window in which another user could connect).
    const mode_t old_mask = umask(0177);
    const int bound = bind(fd.get(), sa.get(), sa.length);
    const int bind_errno = errno;
    umask(old_mask);
    if (bound != 0) return ErrnoError(bind_errno, "listen on {}: bind", address.ToString());
    std::unique_ptr<SocketListener> listener(new SocketListener(std::move(fd), address, options));
    struct stat st {};
    if (lstat(address.path.c_str(), &st) == 0) listener->socket_inode_ = st.st_ino;
    if (listen(listener->fd_.get(), 64) != 0) {
      return ErrnoError(errno, "listen on {}", address.ToString());
    }
    return listener;
  }
  RETURN_IF_ERROR(SetIntOption(fd.get(), SOL_SOCKET, SO_REUSEADDR, 1, "SO_REUSEADDR"));
  if (bind(fd.get(), sa.get(), sa.length) != 0) {
    return ErrnoError(errno, "listen on {}: bind", address.ToString());
  }
  if (listen(fd.get(), 64) != 0) return ErrnoError(errno, "listen on {}", address.ToString());
  sockaddr_storage bound{};
  socklen_t bound_len = sizeof(bound);
  if (getsockname(fd.get(), reinterpret_cast<sockaddr*>(&bound), &bound_len) != 0) {
    return ErrnoError(errno, "getsockname for {}", address.ToString());
  }
  Address actual = address;
  actual.port =
      ntohs(bound.ss_family == AF_INET ? reinterpret_cast<const sockaddr_in*>(&bound)->sin_port
                                       : reinterpret_cast<const sockaddr_in6*>(&bound)->sin6_port);
  return std::unique_ptr<SocketListener>(
      new SocketListener(std::move(fd), std::move(actual), options));
}

Result<std::unique_ptr<Channel>> SocketListener::Accept(std::chrono::milliseconds timeout) {
  ASSIGN_OR_RETURN(auto channel, AcceptSocket(timeout));
  return std::unique_ptr<Channel>(std::move(channel));
}

Result<std::unique_ptr<SocketChannel>> SocketListener::AcceptSocket(
    std::chrono::milliseconds timeout) {
  while (true) {
    ASSIGN_OR_RETURN(bool readable, PollReadable(fd_.get(), timeout));
    if (!readable) {
      return Status(ETIMEDOUT, fmt::format("accept on {}: no connection within {} ms", address(),
                                           timeout.count()));
    }
    sys::UniqueFd conn(accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn) {
      // The connection may have gone away between poll and accept.
      if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED) continue;
      return ErrnoError(errno, "accept on {}", address());
    }
    return SocketChannel::Adopt(std::move(conn), options_);
  }
}

Result<std::unique_ptr<Channel>> SocketConnector::Connect() {
  ASSIGN_OR_RETURN(auto channel, ConnectSocket());
  return std::unique_ptr<Channel>(std::move(channel));
}

Result<std::unique_ptr<SocketChannel>> SocketConnector::ConnectSocket() {
  ASSIGN_OR_RETURN(SocketAddress sa, ToSocketAddress(address_));
  if (address_.is_unix()) {
    // A Unix connect completes or fails at once.
    sys::UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) return ErrnoError(errno, "socket for {}", address_.ToString());
    if (connect(fd.get(), sa.get(), sa.length) != 0) {
      const int err = errno;
      if (err == ECONNREFUSED) {
        return ErrnoError(err,
                          "connect to {}: nothing listens on this socket (a stale socket file "
                          "left by a process that exited?); start the destination first "
                          "(`faultline run --incoming {}`)",
                          address_.ToString(), address_.ToString());
      }
      if (err == ENOENT) {
        return ErrnoError(err,
                          "connect to {}: no such socket; start the destination first "
                          "(`faultline run --incoming {}`)",
                          address_.ToString(), address_.ToString());
      }
      return ErrnoError(err, "connect to {}", address_.ToString());
    }
    return SocketChannel::Adopt(std::move(fd), options_);
  }
  // Non-blocking connect, so that an unreachable peer costs connect_timeout
  // rather than the kernel's minutes of SYN retries; blocking afterwards.
  sys::UniqueFd fd(socket(sa.family(), SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return ErrnoError(errno, "socket for {}", address_.ToString());
  if (connect(fd.get(), sa.get(), sa.length) != 0) {
    if (errno != EINPROGRESS) return ErrnoError(errno, "connect to {}", address_.ToString());
    pollfd pfd{fd.get(), POLLOUT, 0};
    int r;
    do {
      r = poll(&pfd, 1, static_cast<int>(options_.connect_timeout.count()));
    } while (r < 0 && errno == EINTR);
    if (r == 0) {
      return Status(ETIMEDOUT, fmt::format("connect to {}: no answer within {} ms",
                                           address_.ToString(), options_.connect_timeout.count()));
    }
    int error = 0;
    socklen_t len = sizeof(error);
    if (r < 0 || getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &error, &len) != 0) error = errno;
    if (error != 0) return ErrnoError(error, "connect to {}", address_.ToString());
  }
  const int flags = fcntl(fd.get(), F_GETFL);
  if (flags < 0 || fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK) != 0) {
    return ErrnoError(errno, "fcntl(O_NONBLOCK) on a connection to {}", address_.ToString());
  }
  return SocketChannel::Adopt(std::move(fd), options_);
}

}  // namespace faultline::migration
