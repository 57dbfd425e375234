// StagingPool: fixed-size slots of private anonymous memory that page data
// lands in before an installer puts it in place (UFFDIO_COPY reads from a
// slot; UFFDIO_MOVE takes the slot's page away, leaving the slot empty until
// the next write faults a fresh page in).
//
// The pool bounds the fetches in flight per block: Acquire waits for a free
// slot, which throttles a fast fault stream against a slow source instead of
// growing memory without limit.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <span>
#include <vector>

#include "faultline/status.h"
#include "src/sys/mapping.h"
#include "src/sys/mutex.h"

namespace faultline::paging {

class StagingPool {
 public:
  // `slots` slots of `slot_size` bytes (a multiple of 4 KiB). Transparent
  // huge pages are disabled on the pool: UFFDIO_MOVE of one 4 KiB piece of a
  // huge page would split it first.
  static Result<StagingPool> Create(uint64_t slot_size, uint32_t slots);

  // Moved only before anyone uses the pool (into its installer). A move
  // constructor only, which takes free_ without other.mu_: constructors are
  // not analysed, and nothing may use either pool meanwhile.
  StagingPool(StagingPool&& other) noexcept;
  StagingPool& operator=(StagingPool&&) = delete;

  uint64_t slot_size() const { return slot_size_; }
  uint32_t slots() const { return slots_; }

  // A free slot's index; waits while none is free.
  uint32_t Acquire();
  // A free slot's index, or -1 at once if none is free.
  int64_t TryAcquire();
  // Gives the slot back. It may still hold data, or (after a move) no page.
  void Release(uint32_t slot);
  std::span<uint8_t> data(uint32_t slot) const {
    return {memory_.data() + uint64_t{slot} * slot_size_, slot_size_};
  }

 private:
  StagingPool(sys::Mapping memory, uint64_t slot_size, uint32_t slots);

  sys::Mapping memory_;
  uint64_t slot_size_ = 0;
  uint32_t slots_ = 0;
  sys::Mutex mu_;
  std::condition_variable cv_;
  std::vector<uint32_t> free_ GUARDED_BY(mu_);
};

}  // namespace faultline::paging
