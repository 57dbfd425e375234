// SocketChannel: waiting for input or room beside other work, non-blocking
// use by a layer above (TLS), and the peer's credentials (the page server
// logs which process handed it memory).
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>

#include "src/migration/socket_transport.h"

namespace faultline::migration {

namespace {

// Whether `fd` has `events` (or an error or hang-up) within `timeout`.
Result<bool> WaitFor(int fd, short events, std::chrono::milliseconds timeout,
                     const std::string& name) {
  pollfd pfd{fd, events, 0};
  auto ready = PollAny(std::span<pollfd>(&pfd, 1), timeout);
  if (!ready.has_value()) return ready.error().WithContext(name);
  return *ready > 0;
}

}  // namespace

Result<bool> SocketChannel::WaitReadable(std::chrono::milliseconds timeout) const {
  return WaitFor(fd_.get(), POLLIN, timeout, name_);
}

Result<bool> SocketChannel::WaitWritable(std::chrono::milliseconds timeout) const {
  return WaitFor(fd_.get(), POLLOUT, timeout, name_);
}

Status SocketChannel::SetNonBlocking() {
  const int flags = fcntl(fd_.get(), F_GETFL);
  if (flags < 0 || fcntl(fd_.get(), F_SETFL, flags | O_NONBLOCK) != 0) {
    return ErrnoError(errno, "{}: fcntl(O_NONBLOCK)", name_);
  }
  return Status::Ok();
}

Result<int> PollAny(std::span<pollfd> fds, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    const int r =
        poll(fds.data(), fds.size(), static_cast<int>(std::max<int64_t>(0, left.count())));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return ErrnoError(errno, "poll");
    return r;
  }
}

Result<PeerCredentials> SocketChannel::peer_credentials() const {
  if (!is_unix_) return Status(EOPNOTSUPP, fmt::format("{}: not a Unix socket", name_));
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (getsockopt(fd_.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    return ErrnoError(errno, "{}: getsockopt(SO_PEERCRED)", name_);
  }
  return PeerCredentials{cred.pid, cred.uid, cred.gid};
}

}  // namespace faultline::migration
