// SocketChannel: waiting for input beside other work, and the peer's
// credentials (the page server logs which process handed it memory).
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>

#include "src/migration/socket_transport.h"

namespace faultline::migration {

Result<bool> SocketChannel::WaitReadable(std::chrono::milliseconds timeout) const {
  pollfd pfd{fd_.get(), POLLIN, 0};
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    const int r = poll(&pfd, 1, static_cast<int>(std::max<int64_t>(0, left.count())));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return ErrnoError(errno, "{}: poll", name_);
    return r > 0;
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
