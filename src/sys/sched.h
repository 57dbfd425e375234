// Real-time scheduling for the few threads on a page fault's path.
//
// A post-copy fault waits on a chain of threads: the destination's
// userfaultfd handler sends a request, the source's responder answers it, the
// destination's reply reader installs the page. Under the default policy each
// of them waits for a CPU behind whatever else runs (vCPUs, bulk push,
// unrelated work on a shared host), and the fault's tail latency is the
// scheduler's: milliseconds. SCHED_FIFO threads run as soon as they are woken.
// Those threads block on I/O between short bursts, so they take little CPU;
// the kernel's real-time throttling (sched_rt_runtime_us) bounds them anyway.
//
// Needs CAP_SYS_NICE (or an RLIMIT_RTPRIO allowance); without it the calls
// fail with EPERM and the thread keeps its policy, which callers report
// rather than treat as fatal.
#pragma once

#include <sched.h>

#include "faultline/status.h"

namespace faultline::sys {

// The SCHED_FIFO priority Faultline gives its fault-path threads by default:
// the lowest, above every normal thread and below any real-time work the
// host runs on purpose.
inline constexpr int kDefaultRealtimePriority = 1;

// The calling thread runs SCHED_FIFO at `priority` (1..99) from now on.
// Threads it starts afterwards do not inherit the policy
// (SCHED_RESET_ON_FORK): they run the default one.
Status SetRealtime(int priority);

// True if the calling thread runs a real-time policy (SCHED_FIFO or SCHED_RR).
bool IsRealtime();

// SCHED_FIFO at `priority` for the calling thread while this object lives;
// its policy before is restored after. priority 0: does nothing. A failure
// (no permission) leaves the thread as it was; active() says which.
class ScopedRealtime {
 public:
  explicit ScopedRealtime(int priority);
  ~ScopedRealtime();
  ScopedRealtime(const ScopedRealtime&) = delete;
  ScopedRealtime& operator=(const ScopedRealtime&) = delete;

  bool active() const { return active_; }

 private:
  int policy_ = SCHED_OTHER;
  sched_param param_{};
  bool active_ = false;
};

}  // namespace faultline::sys
