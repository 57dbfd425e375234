#include "src/paging/staging_pool.h"

#include <sys/mman.h>

#include <cerrno>
#include <utility>

#include "faultline/types.h"

namespace faultline::paging {

Result<StagingPool> StagingPool::Create(uint64_t slot_size, uint32_t slots) {
  if (slot_size == 0 || !IsAligned(slot_size, kPageSize) || slots == 0) {
    return Error("staging pool: {} slots of {} bytes (need whole 4 KiB pages)", slots, slot_size);
  }
  ASSIGN_OR_RETURN(sys::Mapping memory, sys::Mapping::Anonymous(slot_size * slots, "staging pool"));
  if (::madvise(memory.data(), memory.size(), MADV_NOHUGEPAGE) != 0) {
    const int err = errno;
    return ErrnoError(err, "staging pool: madvise(MADV_NOHUGEPAGE)");
  }
  return StagingPool(std::move(memory), slot_size, slots);
}

StagingPool::StagingPool(sys::Mapping memory, uint64_t slot_size, uint32_t slots)
    : memory_(std::move(memory)), slot_size_(slot_size), slots_(slots) {
  free_.reserve(slots);
  // Handed out lowest first, so a lightly used pool touches few pages.
  for (uint32_t i = slots; i > 0; --i) free_.push_back(i - 1);
}

StagingPool::StagingPool(StagingPool&& other) noexcept
    : memory_(std::move(other.memory_)),
      slot_size_(std::exchange(other.slot_size_, 0)),
      slots_(std::exchange(other.slots_, 0)),
      free_(std::move(other.free_)) {}

uint32_t StagingPool::Acquire() {
  sys::MutexLock lock(mu_);
  cv_.wait(lock.native(), [&]() REQUIRES(mu_) { return !free_.empty(); });
  const uint32_t slot = free_.back();
  free_.pop_back();
  return slot;
}

int64_t StagingPool::TryAcquire() {
  sys::MutexLock lock(mu_);
  if (free_.empty()) return -1;
  const uint32_t slot = free_.back();
  free_.pop_back();
  return slot;
}

void StagingPool::Release(uint32_t slot) {
  {
    sys::MutexLock lock(mu_);
    free_.push_back(slot);
  }
  cv_.notify_one();
}

}  // namespace faultline::paging
