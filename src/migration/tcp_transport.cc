#include "src/migration/tcp_transport.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

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

std::string Endpoints(int fd) {
  sockaddr_storage local{}, peer{};
  socklen_t local_len = sizeof(local), peer_len = sizeof(peer);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_len) != 0 ||
      getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_len) != 0) {
    return "tcp (unconnected)";
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

Result<std::unique_ptr<TcpChannel>> TcpChannel::Adopt(sys::UniqueFd fd,
                                                      const TransportOptions& options) {
  const int s = fd.get();
  RETURN_IF_ERROR(SetTimeout(s, SO_SNDTIMEO, options.io_timeout, "SO_SNDTIMEO"));
  RETURN_IF_ERROR(SetTimeout(s, SO_RCVTIMEO, options.io_timeout, "SO_RCVTIMEO"));
  // Keepalive probes find a peer that vanished without closing (a host that
  // died, a cut cable) while a side waits legitimately long for a message.
  RETURN_IF_ERROR(SetIntOption(s, SOL_SOCKET, SO_KEEPALIVE, 1, "SO_KEEPALIVE"));
  RETURN_IF_ERROR(SetIntOption(s, IPPROTO_TCP, TCP_KEEPIDLE, 10, "TCP_KEEPIDLE"));
  RETURN_IF_ERROR(SetIntOption(s, IPPROTO_TCP, TCP_KEEPINTVL, 5, "TCP_KEEPINTVL"));
  RETURN_IF_ERROR(SetIntOption(s, IPPROTO_TCP, TCP_KEEPCNT, 3, "TCP_KEEPCNT"));
  if (options.socket_buffer_bytes > 0) {
    RETURN_IF_ERROR(
        SetIntOption(s, SOL_SOCKET, SO_SNDBUF, options.socket_buffer_bytes, "SO_SNDBUF"));
    RETURN_IF_ERROR(
        SetIntOption(s, SOL_SOCKET, SO_RCVBUF, options.socket_buffer_bytes, "SO_RCVBUF"));
  }
  std::string name = Endpoints(s);
  return std::unique_ptr<TcpChannel>(new TcpChannel(std::move(fd), std::move(name)));
}

TcpChannel::~TcpChannel() = default;

Status TcpChannel::IoError(int error, const char* what, uint64_t done, uint64_t total) const {
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

Status TcpChannel::SendGather(std::span<const ConstBuffer> parts) {
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

Status TcpChannel::ReceiveScatter(std::span<const MutableBuffer> parts) {
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

void TcpChannel::Shutdown() {
  shut_down_.store(true, std::memory_order_release);
  // Wakes a sendmsg/recvmsg blocked in another thread; the fd stays open.
  ::shutdown(fd_.get(), SHUT_RDWR);
}

Status TcpChannel::SetLowLatency(bool low_latency) {
  return SetIntOption(fd_.get(), IPPROTO_TCP, TCP_NODELAY, low_latency ? 1 : 0, "TCP_NODELAY")
      .WithContext(name_);
}

ChannelStats TcpChannel::stats() const {
  return ChannelStats{
      bytes_sent_.load(std::memory_order_relaxed), bytes_received_.load(std::memory_order_relaxed),
      send_calls_.load(std::memory_order_relaxed), receive_calls_.load(std::memory_order_relaxed)};
}

Result<std::unique_ptr<TcpListener>> TcpListener::Listen(const Address& address,
                                                         const TransportOptions& options) {
  ASSIGN_OR_RETURN(SocketAddress sa, ToSocketAddress(address));
  sys::UniqueFd fd(socket(sa.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return ErrnoError(errno, "socket for {}", address.ToString());
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
  return std::unique_ptr<TcpListener>(new TcpListener(std::move(fd), std::move(actual), options));
}

Result<std::unique_ptr<Channel>> TcpListener::Accept(std::chrono::milliseconds timeout) {
  pollfd pfd{fd_.get(), POLLIN, 0};
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    const int r = poll(&pfd, 1, static_cast<int>(std::max<int64_t>(0, left.count())));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return ErrnoError(errno, "accept on {}: poll", address());
    if (r == 0) {
      return Status(ETIMEDOUT, fmt::format("accept on {}: no connection within {} ms", address(),
                                           timeout.count()));
    }
    sys::UniqueFd conn(accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn) {
      // The connection may have gone away between poll and accept.
      if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED) continue;
      return ErrnoError(errno, "accept on {}", address());
    }
    ASSIGN_OR_RETURN(auto channel, TcpChannel::Adopt(std::move(conn), options_));
    return std::unique_ptr<Channel>(std::move(channel));
  }
}

Result<std::unique_ptr<Channel>> TcpConnector::Connect() {
  ASSIGN_OR_RETURN(SocketAddress sa, ToSocketAddress(address_));
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
  ASSIGN_OR_RETURN(auto channel, TcpChannel::Adopt(std::move(fd), options_));
  return std::unique_ptr<Channel>(std::move(channel));
}

}  // namespace faultline::migration
