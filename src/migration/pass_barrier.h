// The destination's pass barrier (docs/protocol.md §3): a page re-sent in
// pass p + 1 may travel on another page channel than its pass-p copy, so no
// page channel writes a page of pass p + 1 before every page channel ended
// pass p. One per connection attempt (attempt.h), shared by both
// destinations' page channels; the post-copy destination's main thread also
// waits on it, without arriving, for the last pre-copy pass to end.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "src/sys/mutex.h"

namespace faultline::migration {

class PassBarrier {
 public:
  explicit PassBarrier(size_t parties) : parties_(parties) {}

  // A page channel ended `pass`: returns true once every party has, false
  // once cancelled.
  bool Arrive(uint32_t pass);
  // Waits, without arriving, until every party ended `pass` (true) or the
  // barrier is cancelled (false).
  bool AwaitAll(uint32_t pass);
  // Releases every waiter, for good. Any thread.
  void Cancel();

 private:
  bool AllArrived(uint32_t pass) const REQUIRES(mu_);

  const size_t parties_;
  // A leaf, taken after Attempt::mu_ (whose ShutdownLinks cancels the
  // barrier).
  sys::Mutex mu_;
  std::condition_variable cv_;
  std::vector<size_t> arrived_ GUARDED_BY(mu_);  // by pass
  bool cancelled_ GUARDED_BY(mu_) = false;
};

}  // namespace faultline::migration
