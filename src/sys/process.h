// Other processes, watched without signals: a pidfd becomes readable when
// its process exits, so it can sit in a poll set beside sockets. And the
// one signal a library's I/O can raise: SIGPIPE.
#pragma once

#include <signal.h>
#include <sys/types.h>

#include "faultline/status.h"
#include "src/sys/unique_fd.h"

namespace faultline::sys {

// pidfd_open(pid): readable (POLLIN) once the process has exited.
// Errors: ESRCH (no such process), ENOSYS (kernel older than 5.3).
Result<UniqueFd> OpenPidfd(pid_t pid);

// Whether the process of `pidfd` has exited (poll without waiting).
Result<bool> PidfdExited(const UniqueFd& pidfd);

// Blocks SIGPIPE in this thread while it lives, for writes that cannot say
// MSG_NOSIGNAL (OpenSSL writes to its socket with write()): a SIGPIPE that
// such a write raises (the peer closed) is discarded when the guard ends
// instead of killing the process, and the write fails with EPIPE as usual.
// Costs two or three system calls; take it once around a loop of writes.
class ScopedSigpipeBlock {
 public:
  ScopedSigpipeBlock();
  ~ScopedSigpipeBlock();
  ScopedSigpipeBlock(const ScopedSigpipeBlock&) = delete;
  ScopedSigpipeBlock& operator=(const ScopedSigpipeBlock&) = delete;

 private:
  sigset_t old_{};
  bool was_blocked_ = false;  // then this guard changes nothing
};

}  // namespace faultline::sys
