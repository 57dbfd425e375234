#include "faultline/memory_map.h"

#include <iterator>
#include <limits>
#include <thread>
#include <utility>

#include <fmt/format.h>

namespace faultline {
namespace {

constexpr uint64_t kMaxAddress = std::numeric_limits<uint64_t>::max();

// Integer arithmetic: a block without a host mapping (host() == nullptr) must
// not produce pointer arithmetic on null.
Hva HostAddress(const RamBlock& block, uint64_t offset) {
  return Hva(reinterpret_cast<uintptr_t>(block.host()) + offset);
}

std::vector<uint64_t> Starts(const std::vector<MappedRange>& ranges) {
  std::vector<uint64_t> starts;
  starts.reserve(ranges.size());
  for (const MappedRange& range : ranges) starts.push_back(range.gpa.value);
  return starts;
}

uint64_t Sum(const std::vector<MappedRange>& ranges) {
  uint64_t total = 0;
  for (const MappedRange& range : ranges) total += range.size;
  return total;
}

}  // namespace

std::string ToString(const GpaRange& range) {
  return fmt::format("[{:#x}, {:#x})", range.start.value, range.end().value);
}

// ---------------------------------------------------------------------------
// MemoryMap

MemoryMap::MemoryMap(Passkey, uint64_t generation, std::vector<Placement> placements,
                     std::vector<GpaRange> holes, std::vector<MappedRange> ranges)
    // Moving a vector keeps its buffer, so the Placement::holes spans built
    // over `holes` stay valid in holes_.
    : generation_(generation),
      holes_(std::move(holes)),
      placements_(std::move(placements)),
      ranges_(std::move(ranges)),
      range_starts_(Starts(ranges_)),
      mapped_bytes_(Sum(ranges_)) {}

std::shared_ptr<const MemoryMap> MemoryMap::Empty() {
  return std::make_shared<const MemoryMap>(Passkey{}, 0, std::vector<Placement>{},
                                           std::vector<GpaRange>{}, std::vector<MappedRange>{});
}

MemoryMap::Builder MemoryMap::Edit() const {
  Builder builder(generation_);
  for (const Placement& placement : placements_) {
    Builder::Entry entry{placement.block, placement.size_in_use, {}};
    for (const GpaRange& hole : placement.holes) {
      entry.holes.emplace_hint(entry.holes.end(), hole.start.value, hole.end().value);
    }
    builder.entries_.emplace_hint(builder.entries_.end(), placement.base.value, std::move(entry));
    builder.base_by_name_.emplace(placement.block->name(), placement.base.value);
  }
  return builder;
}

Result<std::shared_ptr<const MemoryMap>> MemoryMap::Place(std::shared_ptr<RamBlock> block,
                                                          Gpa base) const {
  Builder builder = Edit();
  RETURN_IF_ERROR(builder.Place(std::move(block), base));
  return builder.Build();
}

Result<std::shared_ptr<const MemoryMap>> MemoryMap::Place(std::shared_ptr<RamBlock> block, Gpa base,
                                                          uint64_t size_in_use) const {
  Builder builder = Edit();
  RETURN_IF_ERROR(builder.Place(std::move(block), base, size_in_use));
  return builder.Build();
}

Result<std::shared_ptr<const MemoryMap>> MemoryMap::Remove(std::string_view block_name) const {
  Builder builder = Edit();
  RETURN_IF_ERROR(builder.Remove(block_name));
  return builder.Build();
}

Result<std::shared_ptr<const MemoryMap>> MemoryMap::PunchHole(Gpa start, uint64_t length) const {
  Builder builder = Edit();
  RETURN_IF_ERROR(builder.PunchHole(start, length));
  return builder.Build();
}

Result<std::shared_ptr<const MemoryMap>> MemoryMap::FillHole(Gpa start, uint64_t length) const {
  Builder builder = Edit();
  RETURN_IF_ERROR(builder.FillHole(start, length));
  return builder.Build();
}

Result<std::shared_ptr<const MemoryMap>> MemoryMap::Resize(std::string_view block_name,
                                                           uint64_t size_in_use) const {
  Builder builder = Edit();
  RETURN_IF_ERROR(builder.Resize(block_name, size_in_use));
  return builder.Build();
}

std::optional<Translation> MemoryMap::Lookup(Gpa gpa) const {
  // The last range starting at or below gpa is the only one that can hold it.
  // Branch-free binary search: the data-dependent step compiles to a
  // conditional move, so a lookup costs log2(n) loads and no mispredictions
  // (std::upper_bound mispredicts about half its steps on random addresses).
  size_t n = range_starts_.size();
  if (n == 0 || gpa.value < range_starts_[0]) return std::nullopt;
  const uint64_t* first = range_starts_.data();
  while (n > 1) {
    const size_t half = n / 2;
    first = first[half] <= gpa.value ? first + half : first;
    n -= half;
  }
  const MappedRange& range = ranges_[static_cast<size_t>(first - range_starts_.data())];
  const uint64_t delta = gpa - range.gpa;
  if (delta >= range.size) return std::nullopt;
  return Translation{.block = range.block,
                     .offset = range.block_offset + delta,
                     .hva = range.hva + delta,
                     .contiguous = range.size - delta};
}

const Placement* MemoryMap::FindPlacement(std::string_view block_name) const {
  for (const Placement& placement : placements_) {
    if (placement.block->name() == block_name) return &placement;
  }
  return nullptr;
}

std::string MemoryMap::DebugString() const {
  std::string out = fmt::format("generation {}\n", generation_);
  for (const Placement& placement : placements_) {
    out += fmt::format("'{}' reserved {} in use {:#x}", placement.block->name(),
                       ToString(placement.reserved()), placement.size_in_use);
    for (const GpaRange& hole : placement.holes) out += " hole " + ToString(hole);
    out += '\n';
  }
  return out;
}

// ---------------------------------------------------------------------------
// MemoryMap::Builder

MemoryMap::Builder::EntryMap::iterator MemoryMap::Builder::Containing(uint64_t gpa) {
  auto it = entries_.upper_bound(gpa);
  if (it == entries_.begin()) return entries_.end();
  --it;
  return gpa - it->first < it->second.block->size() ? it : entries_.end();
}

Status MemoryMap::Builder::Place(std::shared_ptr<RamBlock> block, Gpa base) {
  const uint64_t size = block ? block->size() : 0;
  return Place(std::move(block), base, size);
}

Status MemoryMap::Builder::Place(std::shared_ptr<RamBlock> block, Gpa base, uint64_t size_in_use) {
  if (!block) return Error("place at {:#x}: no block given", base.value);
  const std::string context = fmt::format("place '{}' at {:#x}", block->name(), base.value);
  const uint64_t page = block->page_size();
  const uint64_t size = block->size();
  if (auto it = base_by_name_.find(block->name()); it != base_by_name_.end()) {
    return Error("{}: a block named '{}' is already placed at {:#x}; remove it first", context,
                 block->name(), it->second);
  }
  if (size == 0) return Error("{}: the block has size 0", context);
  if (!IsAligned(base.value, page)) {
    return Error("{}: the address is not a multiple of the block's page size {:#x}", context, page);
  }
  if (!IsAligned(size_in_use, page)) {
    return Error("{}: size in use {:#x} is not a multiple of the block's page size {:#x}", context,
                 size_in_use, page);
  }
  if (size_in_use > size) {
    return Error("{}: size in use {:#x} exceeds the block's size {:#x}", context, size_in_use,
                 size);
  }
  if (base.value > kMaxAddress - size) {
    return Error("{}: the block's {:#x} bytes run past the end of the address space", context,
                 size);
  }
  // Reserved ranges are disjoint and sorted by base, so only the placements
  // just below and just above the new base can overlap it.
  const GpaRange reserved{base, size};
  auto next = entries_.lower_bound(base.value);
  std::optional<EntryMap::iterator> clash;
  if (next != entries_.end() && next->first < reserved.end().value) clash = next;
  if (next != entries_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second.block->size() > base.value) clash = prev;
  }
  if (clash) {
    const Entry& other = (*clash)->second;
    return Error("{}: overlaps '{}' {}", context, other.block->name(),
                 ToString({Gpa((*clash)->first), other.block->size()}));
  }
  base_by_name_.emplace(block->name(), base.value);
  entries_.emplace(base.value, Entry{std::move(block), size_in_use, {}});
  return Status::Ok();
}

Status MemoryMap::Builder::Remove(std::string_view block_name) {
  auto it = base_by_name_.find(block_name);
  if (it == base_by_name_.end()) {
    return Error("remove '{}': no block of that name is placed", block_name);
  }
  entries_.erase(it->second);
  base_by_name_.erase(it);
  return Status::Ok();
}

// Checks what PunchHole and FillHole share: a non-empty, page-aligned range
// inside one placement's in-use range. Returns that placement.
Result<MemoryMap::Builder::EntryMap::iterator> MemoryMap::Builder::FindInUse(std::string_view what,
                                                                             Gpa start,
                                                                             uint64_t length) {
  if (length == 0) return Error("{} hole at {:#x}: the length is 0", what, start.value);
  if (start.value > kMaxAddress - length) {
    return Error("{} hole at {:#x} of {:#x} bytes: runs past the end of the address space", what,
                 start.value, length);
  }
  const GpaRange hole{start, length};
  const std::string context = fmt::format("{} hole {}", what, ToString(hole));
  auto it = Containing(start.value);
  if (it == entries_.end()) return Error("{}: outside every placed block", context);
  const Entry& entry = it->second;
  const GpaRange in_use{Gpa(it->first), entry.size_in_use};
  if (!in_use.Contains(start)) {
    return Error("{}: beyond the part of '{}' in use {}", context, entry.block->name(),
                 ToString(in_use));
  }
  if (hole.end() > in_use.end()) {
    return Error("{}: crosses the end of '{}' in use {}; a hole must lie inside one block", context,
                 entry.block->name(), ToString(in_use));
  }
  const uint64_t page = entry.block->page_size();
  if (!IsAligned(start.value, page) || !IsAligned(length, page)) {
    return Error("{}: not aligned to the page size {:#x} of '{}'", context, page,
                 entry.block->name());
  }
  return it;
}

Status MemoryMap::Builder::PunchHole(Gpa start, uint64_t length) {
  ASSIGN_OR_RETURN(auto it, FindInUse("punch", start, length));
  auto& holes = it->second.holes;
  const uint64_t end = start.value + length;
  // Holes are disjoint and sorted: only the neighbours of `start` can overlap.
  auto next = holes.lower_bound(start.value);
  std::optional<std::pair<uint64_t, uint64_t>> clash;
  if (next != holes.end() && next->first < end) clash = *next;
  if (next != holes.begin() && std::prev(next)->second > start.value) clash = *std::prev(next);
  if (clash) {
    return Error("punch hole {}: overlaps hole {} in '{}'", ToString({start, length}),
                 ToString({Gpa(clash->first), clash->second - clash->first}),
                 it->second.block->name());
  }
  holes.emplace_hint(next, start.value, end);
  return Status::Ok();
}

Status MemoryMap::Builder::FillHole(Gpa start, uint64_t length) {
  ASSIGN_OR_RETURN(auto it, FindInUse("fill", start, length));
  auto& holes = it->second.holes;
  const uint64_t end = start.value + length;
  auto exact = holes.find(start.value);
  if (exact != holes.end() && exact->second == end) {
    holes.erase(exact);
    return Status::Ok();
  }
  // Name an overlapping hole, if any, so the caller sees what they missed.
  auto next = holes.lower_bound(start.value);
  if (next != holes.begin() && std::prev(next)->second > start.value) --next;
  const std::string context = fmt::format("fill hole {}", ToString({start, length}));
  if (next != holes.end() && next->first < end) {
    return Error("{}: does not match hole {} in '{}'; fill holes exactly as punched", context,
                 ToString({Gpa(next->first), next->second - next->first}),
                 it->second.block->name());
  }
  return Error("{}: '{}' has no hole there", context, it->second.block->name());
}

Status MemoryMap::Builder::Resize(std::string_view block_name, uint64_t size_in_use) {
  auto name_it = base_by_name_.find(block_name);
  if (name_it == base_by_name_.end()) {
    return Error("resize '{}' to {:#x}: no block of that name is placed", block_name, size_in_use);
  }
  Entry& entry = entries_.at(name_it->second);
  const std::string context = fmt::format("resize '{}' to {:#x}", block_name, size_in_use);
  if (!IsAligned(size_in_use, entry.block->page_size())) {
    return Error("{}: not a multiple of the block's page size {:#x}", context,
                 entry.block->page_size());
  }
  if (size_in_use > entry.block->size()) {
    return Error("{}: exceeds the block's size {:#x}", context, entry.block->size());
  }
  const uint64_t new_end = name_it->second + size_in_use;
  if (!entry.holes.empty() && entry.holes.rbegin()->second > new_end) {
    const auto& [hole_start, hole_end] = *entry.holes.rbegin();
    return Error("{}: hole {} lies beyond the new end {:#x}; fill it first", context,
                 ToString({Gpa(hole_start), hole_end - hole_start}), new_end);
  }
  entry.size_in_use = size_in_use;
  return Status::Ok();
}

std::shared_ptr<const MemoryMap> MemoryMap::Builder::Build() const {
  std::vector<Placement> placements;
  std::vector<GpaRange> holes;
  std::vector<MappedRange> ranges;
  std::vector<std::pair<size_t, size_t>> hole_spans;  // first, count per placement
  placements.reserve(entries_.size());
  hole_spans.reserve(entries_.size());
  for (const auto& [base, entry] : entries_) {
    RamBlock& block = *entry.block;
    auto emit = [&](uint64_t from, uint64_t to) {
      if (from == to) return;
      ranges.push_back(MappedRange{.gpa = Gpa(from),
                                   .size = to - from,
                                   .block = &block,
                                   .block_offset = from - base,
                                   .hva = HostAddress(block, from - base)});
    };
    hole_spans.emplace_back(holes.size(), entry.holes.size());
    uint64_t cursor = base;
    for (const auto& [hole_start, hole_end] : entry.holes) {
      holes.push_back({Gpa(hole_start), hole_end - hole_start});
      emit(cursor, hole_start);
      cursor = hole_end;
    }
    emit(cursor, base + entry.size_in_use);
    placements.push_back({entry.block, Gpa(base), entry.size_in_use, {}});
  }
  // Only now is `holes` complete, so its buffer no longer moves.
  for (size_t i = 0; i < placements.size(); ++i) {
    placements[i].holes = std::span(holes).subspan(hole_spans[i].first, hole_spans[i].second);
  }
  return std::make_shared<const MemoryMap>(Passkey{}, generation_ + 1, std::move(placements),
                                           std::move(holes), std::move(ranges));
}

// ---------------------------------------------------------------------------
// AtomicMemoryMap

AtomicMemoryMap::AtomicMemoryMap(std::shared_ptr<const MemoryMap> initial)
    : slots_{initial ? std::move(initial) : MemoryMap::Empty(), nullptr} {}

std::shared_ptr<const MemoryMap> AtomicMemoryMap::Load() const {
  // seq_cst throughout: the argument that a writer never overwrites a slot
  // being copied relies on one total order of these counts and loads.
  while (true) {
    const uint32_t slot = live_.load();
    readers_[slot].value.fetch_add(1);
    if (live_.load() == slot) {
      std::shared_ptr<const MemoryMap> snapshot = slots_[slot];
      readers_[slot].value.fetch_sub(1, std::memory_order_release);
      return snapshot;
    }
    // A writer flipped in between: the slot may be written now. Retry.
    readers_[slot].value.fetch_sub(1, std::memory_order_release);
  }
}

Result<std::shared_ptr<const MemoryMap>> AtomicMemoryMap::Update(const Edit& edit) {
  std::lock_guard lock(writer_mu_);
  // Only writers change live_, and they hold writer_mu_.
  const uint32_t old_slot = live_.load(std::memory_order_relaxed);
  const uint32_t new_slot = 1 - old_slot;
  ASSIGN_OR_RETURN(std::shared_ptr<const MemoryMap> next, edit(*slots_[old_slot]));
  if (!next) return Error("memory map update: the edit returned no map");
  // No reader copies new_slot: it has been empty and not live since the last
  // update drained it.
  slots_[new_slot] = next;
  live_.store(new_slot);
  publications_.fetch_add(1, std::memory_order_release);
  // Readers that saw old_slot live may still be copying it. Once they are
  // gone no one reads it again (they check live_ after counting themselves).
  while (readers_[old_slot].value.load() != 0) std::this_thread::yield();
  slots_[old_slot].reset();
  return next;
}

const MemoryMap& AtomicMemoryMap::Reader::Get() {
  const uint64_t published = source_->publications_.load(std::memory_order_acquire);
  if (published != seen_ || !snapshot_) {
    snapshot_ = source_->Load();
    seen_ = published;
  }
  return *snapshot_;
}

}  // namespace faultline
