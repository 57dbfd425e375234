// MemoryMap: an immutable snapshot of the guest-physical layout. RAM blocks
// are placed at guest-physical addresses; holes (MMIO windows) are punched
// into them. Every change builds a new map and leaves the old one untouched,
// so a reader holding a snapshot never sees a layout half-way through a
// change. AtomicMemoryMap publishes snapshots RCU-style: readers take the
// current one without a lock, writers serialize among themselves.
//
// Terms used throughout:
//   reserved range  [base, base + block->size()): the guest-physical space a
//                   placement owns, so that it can grow (virtio-mem style)
//                   without ever colliding with a neighbour.
//   in-use range    [base, base + size_in_use): the part of the reserved
//                   range backed by the block; Resize moves its end.
//   hole            a page-aligned range inside an in-use range that is not
//                   RAM (an MMIO window). The block's memory under a hole is
//                   neither freed nor changed; it reappears when the hole is
//                   filled.
//   mapped range    a maximal piece of an in-use range outside every hole.
//                   Mapped ranges are what become KVM memslots.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "faultline/ram_block.h"
#include "faultline/status.h"
#include "faultline/types.h"

namespace faultline {

// The half-open guest-physical range [start, start + size).
struct GpaRange {
  Gpa start;
  uint64_t size = 0;

  constexpr Gpa end() const { return start + size; }
  constexpr bool Contains(Gpa gpa) const { return gpa >= start && gpa - start < size; }
  constexpr bool Overlaps(const GpaRange& other) const {
    return start < other.end() && other.start < end();
  }
  friend constexpr bool operator==(const GpaRange&, const GpaRange&) = default;
};

// "[0x1000, 0x3000)".
std::string ToString(const GpaRange& range);

// A piece of guest RAM the guest can access: guest-physical [gpa, gpa + size)
// is block bytes [block_offset, block_offset + size).
struct MappedRange {
  Gpa gpa;
  uint64_t size = 0;
  RamBlock* block = nullptr;  // Kept alive by the map the range came from.
  uint64_t block_offset = 0;
  Hva hva;  // block->host() + block_offset

  constexpr Gpa end() const { return gpa + size; }
  friend bool operator==(const MappedRange&, const MappedRange&) = default;
};

// A RAM block placed in the map.
struct Placement {
  std::shared_ptr<RamBlock> block;
  Gpa base;
  uint64_t size_in_use = 0;
  std::span<const GpaRange> holes;  // Sorted, disjoint, inside in_use().

  GpaRange reserved() const { return {base, block->size()}; }
  GpaRange in_use() const { return {base, size_in_use}; }
};

// Where a guest-physical address lives.
struct Translation {
  RamBlock* block = nullptr;  // Valid while the map Lookup was called on is.
  uint64_t offset = 0;        // in the block
  Hva hva;
  uint64_t contiguous = 0;  // bytes from the address to the end of its mapped range
};

class MemoryMap {
 public:
  class Builder;

  // The map with nothing placed, generation 0.
  static std::shared_ptr<const MemoryMap> Empty();

  MemoryMap(const MemoryMap&) = delete;
  MemoryMap& operator=(const MemoryMap&) = delete;

  // Each operation returns a new map of generation() + 1, or an error naming
  // the block and addresses; this map never changes. See Builder for the
  // rules each one checks. Each rebuilds the map, O(n log n) in placements
  // and holes; batch many changes with Edit().
  Result<std::shared_ptr<const MemoryMap>> Place(std::shared_ptr<RamBlock> block, Gpa base) const;
  Result<std::shared_ptr<const MemoryMap>> Place(std::shared_ptr<RamBlock> block, Gpa base,
                                                 uint64_t size_in_use) const;
  Result<std::shared_ptr<const MemoryMap>> Remove(std::string_view block_name) const;
  Result<std::shared_ptr<const MemoryMap>> PunchHole(Gpa start, uint64_t length) const;
  Result<std::shared_ptr<const MemoryMap>> FillHole(Gpa start, uint64_t length) const;
  Result<std::shared_ptr<const MemoryMap>> Resize(std::string_view block_name,
                                                  uint64_t size_in_use) const;

  // Starts a batch of changes that become one new map (one generation, one
  // publication), e.g. moving an MMIO window: fill the old hole and punch the
  // new one without any snapshot in which both or neither exist.
  Builder Edit() const;

  // The block, offset and host address backing `gpa`, or nullopt if `gpa` is
  // in a hole or in no placement's in-use range. O(log n) in mapped ranges.
  std::optional<Translation> Lookup(Gpa gpa) const;

  // Increments with each derived map; tells snapshots apart in logs.
  uint64_t generation() const { return generation_; }
  // Sorted by base; reserved ranges are disjoint.
  std::span<const Placement> placements() const { return placements_; }
  // Sorted by gpa, disjoint; adjacent ranges belong to different blocks or
  // are separated by a hole.
  std::span<const MappedRange> ranges() const { return ranges_; }
  // Every hole of every placement, sorted by start.
  std::span<const GpaRange> holes() const { return holes_; }
  const Placement* FindPlacement(std::string_view block_name) const;
  uint64_t mapped_bytes() const { return mapped_bytes_; }

  // One line per placement and its holes, for logs and test failures.
  std::string DebugString() const;

 private:
  struct Passkey {};

 public:
  // For make_shared from Builder::Build only (Passkey is private).
  MemoryMap(Passkey, uint64_t generation, std::vector<Placement> placements,
            std::vector<GpaRange> holes, std::vector<MappedRange> ranges);

 private:
  // All const: a published map is read by many threads without locks.
  const uint64_t generation_;
  const std::vector<GpaRange> holes_;  // Placement::holes point into it.
  const std::vector<Placement> placements_;
  const std::vector<MappedRange> ranges_;
  const std::vector<uint64_t> range_starts_;  // ranges_[i].gpa, dense for the binary search
  const uint64_t mapped_bytes_;
};

// A mutable working copy of a map. Every operation checks its input first and
// changes nothing when it returns an error, so a failed step leaves the batch
// as it was. Not thread-safe; one writer uses it and then calls Build().
class MemoryMap::Builder {
 public:
  // Places `block` with its reserved range at `base`. Errors: no block; a
  // block of the same name already placed; base or size_in_use not a
  // multiple of the block's page size; size_in_use > block->size(); the
  // reserved range wrapping past 2^64 or overlapping another placement's.
  Status Place(std::shared_ptr<RamBlock> block, Gpa base);
  Status Place(std::shared_ptr<RamBlock> block, Gpa base, uint64_t size_in_use);

  // Removes the placement and its holes. The block itself is untouched.
  Status Remove(std::string_view block_name);

  // Unmaps [start, start + length) from the guest. It must be non-empty,
  // aligned to the page size of the block it is in, inside one placement's
  // in-use range, and overlap no existing hole (adjacent is fine: holes are
  // kept as punched, not merged).
  Status PunchHole(Gpa start, uint64_t length);

  // Maps a hole back, with the RAM content it had. [start, start + length)
  // must be exactly a hole as punched; filling part of a hole, or several
  // holes at once, is an error. This keeps an MMIO window a unit: a device
  // that punched a window removes exactly that window.
  Status FillHole(Gpa start, uint64_t length);

  // Sets how much of the block is in use (virtio-mem plug and unplug):
  // a multiple of the page size, at most block->size(). Shrinking past a hole
  // is an error; fill the hole first.
  Status Resize(std::string_view block_name, uint64_t size_in_use);

  // The new map, of generation one more than the map this builder came from.
  std::shared_ptr<const MemoryMap> Build() const;

 private:
  friend class MemoryMap;
  struct Entry {
    std::shared_ptr<RamBlock> block;
    uint64_t size_in_use = 0;
    std::map<uint64_t, uint64_t> holes;  // start -> end, disjoint
  };
  using EntryMap = std::map<uint64_t, Entry>;  // by base

  explicit Builder(uint64_t generation) : generation_(generation) {}
  // The placement whose reserved range contains `gpa`, or end().
  EntryMap::iterator Containing(uint64_t gpa);
  Result<EntryMap::iterator> FindInUse(std::string_view what, Gpa start, uint64_t length);

  uint64_t generation_;  // of the source map
  EntryMap entries_;
  std::map<std::string, uint64_t, std::less<>> base_by_name_;
};

// Holds the current MemoryMap and publishes new ones RCU-style: a reader
// takes a snapshot and uses it for as long as it likes, unaffected by later
// changes; a snapshot is freed when its last holder drops it.
//
// Readers never block: Load() is lock-free (it retries only if a writer
// flipped the live slot between two of its loads). Writers serialize on a
// mutex and wait, after publishing, for readers still copying the previous
// slot (a few nanoseconds each).
//
// Why not std::atomic<std::shared_ptr>: libstdc++ 12 implements it with a
// spin bit in the control-block pointer, and load() releases that bit with a
// relaxed store, so a reader's read of the stored pointer is not ordered
// before the next writer's overwrite. That is a data race in the memory model
// and ThreadSanitizer reports it (google/sanitizers#1558). The left-right
// scheme below (Ramalhete and Correia) orders everything with atomics.
class AtomicMemoryMap {
 public:
  using Edit = std::function<Result<std::shared_ptr<const MemoryMap>>(const MemoryMap&)>;

  explicit AtomicMemoryMap(std::shared_ptr<const MemoryMap> initial = MemoryMap::Empty());
  AtomicMemoryMap(const AtomicMemoryMap&) = delete;
  AtomicMemoryMap& operator=(const AtomicMemoryMap&) = delete;

  // The current snapshot. Never null.
  std::shared_ptr<const MemoryMap> Load() const;

  // Writers: runs `edit` on the current map while holding the writer lock and
  // publishes what it returns. Anything that must happen before readers can
  // see the new map (applying KVM memslots, with vCPUs paused) belongs inside
  // `edit`. On error nothing is published and the error is returned.
  Result<std::shared_ptr<const MemoryMap>> Update(const Edit& edit);

  // How many maps Update has published.
  uint64_t publications() const { return publications_.load(std::memory_order_acquire); }

  // A per-thread cached snapshot for hot paths (vCPU exits): Get() costs one
  // atomic load of a counter and touches no shared cache line for writing
  // unless a new map was published since the last call.
  class Reader {
   public:
    explicit Reader(const AtomicMemoryMap& source) : source_(&source) {}
    // Valid until the next Get() or until the Reader is destroyed.
    const MemoryMap& Get();

   private:
    const AtomicMemoryMap* source_;
    std::shared_ptr<const MemoryMap> snapshot_;
    uint64_t seen_ = ~uint64_t{0};
  };

 private:
  // Readers in a slot, on its own cache line so that readers of one slot do
  // not slow the other's.
  struct alignas(64) ReaderCount {
    std::atomic<uint64_t> value{0};
  };

  std::mutex writer_mu_;  // Serializes Update; readers never take it.
  // What must hold: a reader copies slots_[i] only after it has counted
  // itself in readers_[i] and then seen live_ == i; a writer writes only the
  // slot that is not live, and only once its count has drained to zero after
  // live_ moved away from it. The slot that is not live is empty between
  // updates, so the AtomicMemoryMap keeps nothing but the current map alive.
  std::shared_ptr<const MemoryMap> slots_[2];
  std::atomic<uint32_t> live_{0};
  mutable ReaderCount readers_[2];
  // Incremented after each flip of live_ (release): a Reader that sees the
  // new count and then loads gets that map or a newer one.
  std::atomic<uint64_t> publications_{0};
};

}  // namespace faultline
