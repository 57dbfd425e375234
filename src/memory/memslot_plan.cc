#include "src/memory/memslot_plan.h"

#include <algorithm>
#include <optional>
#include <utility>

namespace faultline {

Result<MemslotPlan> MemslotPlanner::Plan(const MemslotTable& current,
                                         std::shared_ptr<const MemoryMap> next) const {
  if (max_slots_ == 0 || max_slots_ > kMaxMemslotIds) {
    return Error("memslot plan: {} slots is not a valid limit (1 to {})", max_slots_,
                 kMaxMemslotIds);
  }
  if (!next) return Error("memslot plan: no map given");
  const std::span<const Memslot> old_slots = current.slots();
  // Mapped ranges cut at every multiple of the granule: a layout change then
  // replaces only the granule-sized slots it touches, and the cost of a KVM
  // slot change grows with the slot's size (its rmap and dirty bitmap).
  std::vector<MappedRange> pieces;
  for (const MappedRange& r : next->ranges()) {
    for (uint64_t start = r.gpa.value; start < r.end().value;) {
      uint64_t end = r.end().value;
      if (granule_ != 0) end = std::min(end, AlignDown(start, granule_) + granule_);
      uint64_t skip = start - r.gpa.value;
      pieces.push_back({Gpa(start), end - start, r.block, r.block_offset + skip, r.hva + skip});
      start = end;
    }
  }
  const std::span<const MappedRange> ranges = pieces;
  if (ranges.size() > max_slots_) {
    return Error(
        "memslot plan for map generation {}: {} mapped ranges need a slot each but KVM offers "
        "{}; use fewer holes or blocks, or a larger memslot granule",
        next->generation(), ranges.size(), max_slots_);
  }

  // Both sequences are sorted by gpa and disjoint, so one merge pass finds
  // every range present in both. New slots get their id in a second pass,
  // once every kept id is known.
  std::vector<bool> used(max_slots_, false);
  std::vector<std::optional<uint16_t>> ids(ranges.size());
  MemslotPlan plan;
  size_t i = 0;
  size_t j = 0;
  while (i < old_slots.size() || j < ranges.size()) {
    if (i == old_slots.size()) {
      ++j;  // created below
      continue;
    }
    const Memslot& old_slot = old_slots[i];
    if (j == ranges.size() || old_slot.range.gpa < ranges[j].gpa) {
      plan.changes.push_back({MemslotChange::Kind::kDelete, old_slot});
      ++i;
      continue;
    }
    if (ranges[j].gpa < old_slot.range.gpa) {
      ++j;
      continue;
    }
    // Same start. Kept only if nothing else changed and the id is still
    // within the limit (the limit may have shrunk since it was assigned).
    if (old_slot.range == ranges[j] && old_slot.id < max_slots_) {
      ids[j] = old_slot.id;
      used[old_slot.id] = true;
      ++plan.kept;
    } else {
      plan.changes.push_back({MemslotChange::Kind::kDelete, old_slot});
    }
    ++i;
    ++j;
  }

  std::vector<Memslot> slots;
  slots.reserve(ranges.size());
  uint32_t free_id = 0;
  for (size_t k = 0; k < ranges.size(); ++k) {
    if (!ids[k]) {
      // ranges.size() <= max_slots_ guarantees a free id exists.
      while (used[free_id]) ++free_id;
      used[free_id] = true;
      ids[k] = static_cast<uint16_t>(free_id);
      plan.changes.push_back({MemslotChange::Kind::kCreate, {*ids[k], ranges[k]}});
    }
    slots.push_back({*ids[k], ranges[k]});
  }
  plan.next = MemslotTable(std::move(next), std::move(slots));
  return plan;
}

}  // namespace faultline
