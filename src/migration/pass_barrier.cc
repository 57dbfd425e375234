#include "src/migration/pass_barrier.h"

namespace faultline::migration {

bool PassBarrier::AllArrived(uint32_t pass) const {
  return arrived_.size() > pass && arrived_[pass] == parties_;
}

bool PassBarrier::Arrive(uint32_t pass) {
  sys::MutexLock lock(mu_);
  if (arrived_.size() <= pass) arrived_.resize(pass + 1, 0);
  if (++arrived_[pass] == parties_) cv_.notify_all();
  cv_.wait(lock.native(), [&]() REQUIRES(mu_) { return cancelled_ || AllArrived(pass); });
  return !cancelled_;
}

bool PassBarrier::AwaitAll(uint32_t pass) {
  sys::MutexLock lock(mu_);
  cv_.wait(lock.native(), [&]() REQUIRES(mu_) { return cancelled_ || AllArrived(pass); });
  return !cancelled_;
}

void PassBarrier::Cancel() {
  sys::MutexLock lock(mu_);
  cancelled_ = true;
  cv_.notify_all();
}

}  // namespace faultline::migration
