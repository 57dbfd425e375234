#include "src/migration/pass_barrier.h"

namespace faultline::migration {

bool PassBarrier::AllArrived(uint32_t pass) const {
  return arrived_.size() > pass && arrived_[pass] == parties_;
}

bool PassBarrier::Arrive(uint32_t pass) {
  std::unique_lock lock(mu_);
  if (arrived_.size() <= pass) arrived_.resize(pass + 1, 0);
  if (++arrived_[pass] == parties_) cv_.notify_all();
  cv_.wait(lock, [&] { return cancelled_ || AllArrived(pass); });
  return !cancelled_;
}

bool PassBarrier::AwaitAll(uint32_t pass) {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return cancelled_ || AllArrived(pass); });
  return !cancelled_;
}

void PassBarrier::Cancel() {
  std::lock_guard lock(mu_);
  cancelled_ = true;
  cv_.notify_all();
}

}  // namespace faultline::migration
