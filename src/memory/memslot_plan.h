// Memslot planning: which KVM memory slots to delete and create so that the
// slots match a new MemoryMap. Pure (no ioctls) so that it is tested without
// /dev/kvm; the code that owns the VM fd applies the plan.
//
// What the plan guarantees:
//   - a mapped range present in both maps (same gpa, size, block and block
//     offset) keeps its slot id, so KVM keeps its dirty log and the guest's
//     view of that range never flickers;
//   - every other old slot is deleted and every other new range is created,
//     with the lowest free ids (ids freed by this plan's deletes included);
//   - every delete comes before every create, so a create never overlaps a
//     slot that still exists (KVM_SET_USER_MEMORY_REGION2 fails with EEXIST
//     otherwise) and reusing a just-freed id is valid. QEMU's memory listener
//     orders a topology update the same way (a delete pass, then an add pass).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "faultline/memory_map.h"
#include "faultline/status.h"

namespace faultline {

// KVM_USER_MEM_SLOTS on x86-64 (SHRT_MAX less 3 internal slots), what
// KVM_CAP_NR_MEMSLOTS reports. Ask the VM for the real figure.
inline constexpr uint32_t kDefaultMaxMemslots = 32764;
// Slot ids are u16 within one address space.
inline constexpr uint32_t kMaxMemslotIds = 1u << 16;

struct Memslot {
  uint16_t id = 0;
  MappedRange range;
  friend bool operator==(const Memslot&, const Memslot&) = default;
};

// The slots that are (or will be) installed, with the map they came from.
// Holding the map keeps every RamBlock a slot points at alive.
class MemslotTable {
 public:
  MemslotTable() : map_(MemoryMap::Empty()) {}

  const std::shared_ptr<const MemoryMap>& map() const { return map_; }
  std::span<const Memslot> slots() const { return slots_; }  // sorted by gpa

 private:
  friend class MemslotPlanner;
  MemslotTable(std::shared_ptr<const MemoryMap> map, std::vector<Memslot> slots)
      : map_(std::move(map)), slots_(std::move(slots)) {}

  std::shared_ptr<const MemoryMap> map_;
  std::vector<Memslot> slots_;
};

struct MemslotChange {
  enum class Kind { kDelete, kCreate };
  Kind kind;
  // For a delete, the slot as installed: harvest its dirty log before
  // deleting it, the bits are lost with the slot.
  Memslot slot;
  friend bool operator==(const MemslotChange&, const MemslotChange&) = default;
};

struct MemslotPlan {
  std::vector<MemslotChange> changes;  // in the order to issue them
  MemslotTable next;                   // the slots once every change is applied
  size_t kept = 0;                     // slots left alone
};

class MemslotPlanner {
 public:
  // `max_slots`: how many slot ids KVM offers (KVM_CAP_NR_MEMSLOTS), at most
  // kMaxMemslotIds. Ids are 0 .. max_slots - 1.
  // `granule`: if non-zero (a power of two), no slot crosses a multiple of
  // it, so a change touches only the slots of the granules it changes.
  explicit MemslotPlanner(uint32_t max_slots = kDefaultMaxMemslots, uint64_t granule = 0)
      : max_slots_(max_slots), granule_(granule) {}

  // The changes that take `current` to slots for `next`. An error (too many
  // ranges for the slots available, a bad limit) leaves everything as it was:
  // nothing has been applied yet.
  Result<MemslotPlan> Plan(const MemslotTable& current,
                           std::shared_ptr<const MemoryMap> next) const;

  uint32_t max_slots() const { return max_slots_; }
  uint64_t granule() const { return granule_; }

 private:
  uint32_t max_slots_;
  uint64_t granule_;
};

}  // namespace faultline
