#include "src/sys/process.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>

namespace faultline::sys {

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434  // the same number on every architecture
#endif

Result<UniqueFd> OpenPidfd(pid_t pid) {
  const int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0) return ErrnoError(errno, "pidfd_open({})", pid);
  // pidfd_open sets close-on-exec itself.
  return UniqueFd(fd);
}

Result<bool> PidfdExited(const UniqueFd& pidfd) {
  pollfd pfd{pidfd.get(), POLLIN, 0};
  int r;
  do {
    r = ::poll(&pfd, 1, 0);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return ErrnoError(errno, "poll pidfd");
  return r > 0;
}

}  // namespace faultline::sys
