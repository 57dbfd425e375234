// SocketChannel: waiting for input beside other work, and the peer's
// credentials (the page server logs which process handed it memory).
#include <sys/socket.h>

#include <cerrno>

#include "src/migration/socket_transport.h"

namespace faultline::migration {

Result<bool> SocketChannel::WaitReadable(std::chrono::milliseconds timeout) const {
  auto readable = PollReadable(fd_.get(), timeout);
  if (!readable.has_value()) return readable.error().WithContext(name_);
  return *readable;
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
