// Other processes, watched without signals: a pidfd becomes readable when
// its process exits, so it can sit in a poll set beside sockets.
#pragma once

#include <sys/types.h>

#include "faultline/status.h"
#include "src/sys/unique_fd.h"

namespace faultline::sys {

// pidfd_open(pid): readable (POLLIN) once the process has exited.
// Errors: ESRCH (no such process), ENOSYS (kernel older than 5.3).
Result<UniqueFd> OpenPidfd(pid_t pid);

// Whether the process of `pidfd` has exited (poll without waiting).
Result<bool> PidfdExited(const UniqueFd& pidfd);

}  // namespace faultline::sys
