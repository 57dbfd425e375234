#include "src/sys/sched.h"

#include <cerrno>

namespace faultline::sys {
namespace {

constexpr int kPolicyMask = ~SCHED_RESET_ON_FORK;

}  // namespace

Status SetRealtime(int priority) {
  const int lo = sched_get_priority_min(SCHED_FIFO), hi = sched_get_priority_max(SCHED_FIFO);
  if (priority < lo || priority > hi) {
    return Error("real-time priority {} is outside SCHED_FIFO's range {}..{}", priority, lo, hi);
  }
  sched_param param{};
  param.sched_priority = priority;
  // pid 0 is the calling thread. SCHED_RESET_ON_FORK: threads this one
  // starts (a VM's vCPUs, say) get the default policy, not this one.
  if (::sched_setscheduler(0, SCHED_FIFO | SCHED_RESET_ON_FORK, &param) != 0) {
    const int err = errno;
    return Status(err, err == EPERM ? "SCHED_FIFO refused: the process needs CAP_SYS_NICE or an "
                                      "RLIMIT_RTPRIO allowance (run as root, or set the "
                                      "real-time priority to 0)"
                                    : "sched_setscheduler(SCHED_FIFO)");
  }
  return Status::Ok();
}

bool IsRealtime() {
  const int policy = ::sched_getscheduler(0);
  return policy >= 0 &&
         ((policy & kPolicyMask) == SCHED_FIFO || (policy & kPolicyMask) == SCHED_RR);
}

ScopedRealtime::ScopedRealtime(int priority) {
  if (priority == 0) return;
  policy_ = ::sched_getscheduler(0);
  if (policy_ < 0 || ::sched_getparam(0, &param_) != 0) return;
  active_ = SetRealtime(priority).ok();
}

ScopedRealtime::~ScopedRealtime() {
  if (active_) (void)::sched_setscheduler(0, policy_, &param_);
}

}  // namespace faultline::sys
