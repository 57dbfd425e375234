// GuestMemory: a VM's RAM blocks, the guest-physical map they are placed in,
// the memslots derived from that map (applied through the accelerator's
// MemslotBackend), and per-block dirty tracking.
//
// Layout changes (place, punch a hole, fill it, resize) are atomic for every
// vCPU: Update() computes the new map and the fewest memslot changes, holds
// every vCPU out of KVM_RUN, harvests the dirty bits of every slot about to
// go, applies the changes, publishes the map and releases the vCPUs. A slot
// whose range did not change keeps its id (and KVM's dirty log with it).
//
// Dirty bits live per RamBlock in 4 KiB pages, whatever the block's page size
// (KVM logs writes per 4 KiB page), so they survive any layout change. They
// come from KVM's dirty log (manual protect: harvest, then re-protect what was
// harvested), from the per-vCPU dirty rings, or from userfaultfd
// write-protect on the blocks' host memory (any accelerator; it also sees the
// VMM's own writes), and from writes the VMM makes through Write().
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "faultline/memory_map.h"
#include "faultline/ram_block.h"
#include "faultline/status.h"
#include "src/memory/dirty_bitmap.h"
#include "src/memory/memslot_backend.h"
#include "src/memory/memslot_plan.h"
#include "src/sys/mapping.h"
#include "src/sys/mutex.h"

namespace faultline {

// How GuestMemory keeps vCPUs out of the guest during a memslot change.
class VcpuPauser {
 public:
  virtual ~VcpuPauser() = default;
  // Returns once no vCPU is inside KVM_RUN; none enters until Release().
  virtual void Hold() = 0;
  virtual void Release() = 0;
};

inline constexpr uint64_t kDefaultMemslotGranule = 16ull << 20;

enum class DirtyLogMode {
  kBitmap,  // KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG (manual protect)
  kRing,    // per-vCPU dirty rings + KVM_RESET_DIRTY_RINGS
  kUffdWp,  // userfaultfd write-protect (async) harvested with PAGEMAP_SCAN
};
const char* DirtyLogModeName(DirtyLogMode mode);  // "bitmap", "ring", "uffd-wp"
// "bitmap", "ring", "uffd-wp"; the error lists them.
Result<DirtyLogMode> ParseDirtyLogMode(std::string_view text);

class UffdWpTracker;

struct GuestMemoryOptions {
  DirtyLogMode dirty_mode = DirtyLogMode::kBitmap;
  uint32_t dirty_ring_entries = 4096;  // per vCPU, a power of two (ring mode)
  // No memslot crosses a multiple of this (a power of two, 0 = no limit).
  // KVM's cost to create or delete a slot grows with its size, so small
  // granules keep layout changes short; more slots cost KVM little.
  uint64_t memslot_granule = kDefaultMemslotGranule;
};

// What one layout change cost, for benchmarks and logs.
struct LayoutChangeStats {
  uint64_t generation = 0;
  size_t slots_deleted = 0;
  size_t slots_created = 0;
  size_t slots_kept = 0;
  uint64_t pause_ns = 0;  // from Hold() returning to Release()
  uint64_t hold_ns = 0;   // how long Hold() took to stop every vCPU
};

class GuestMemory {
 public:
  // `backend` must outlive this object. The KVM modes need its own dirty
  // log (accel_dirty_log); this enables it, which KVM allows only before
  // any vCPU exists.
  static Result<std::unique_ptr<GuestMemory>> Create(MemslotBackend* backend,
                                                     GuestMemoryOptions options = {});
  ~GuestMemory();

  // Until a pauser is set (no vCPUs yet), changes apply without pausing.
  void SetPauser(VcpuPauser* pauser);
  DirtyLogMode dirty_mode() const { return options_.dirty_mode; }

  // The current layout. Lock-free; valid for as long as the caller holds it.
  std::shared_ptr<const MemoryMap> map() const { return map_.Load(); }
  const AtomicMemoryMap& atomic_map() const { return map_; }

  // Applies `edit` to the current map atomically for every vCPU (see top).
  // On error nothing changed: neither the map nor any memslot.
  Result<std::shared_ptr<const MemoryMap>> Update(const AtomicMemoryMap::Edit& edit);
  Status Place(std::shared_ptr<RamBlock> block, Gpa base);
  Status PunchHole(Gpa start, uint64_t length);
  Status FillHole(Gpa start, uint64_t length);
  LayoutChangeStats last_change() const;
  std::vector<Memslot> memslots() const;

  // Demand paging through holes (src/paging/hole_pager.h). Maps the hole
  // [start, start + length), exactly as punched, without pausing any vCPU:
  // allowed only when that creates memslots and changes no existing one (the
  // memslot granule divides the hole's bounds), since KVM switches to a
  // memslot set with one more slot atomically for running vCPUs. Safe on a
  // vCPU thread: it never waits for vCPUs, and never blocks on a writer that
  // may be waiting for them (mu_ is only tried). Returns false, changing
  // nothing, if a layout change is in progress; try again later.
  Result<bool> TryFillHoleWithoutPause(Gpa start, uint64_t length);
  // Re-plans every memslot with a new granule (a power of two, at least
  // 4 KiB; 0: no limit), pausing the vCPUs once. The hole pager cuts slots
  // at its chunk size while paging and merges them back afterwards.
  Status SetMemslotGranule(uint64_t granule);
  uint64_t memslot_granule() const;

  // Called with the range before every Read and Write below, so that a
  // demand pager can make the pages present (or report them lost) first.
  using AccessHook = std::function<Status(Gpa gpa, uint64_t length)>;
  void SetAccessHook(AccessHook hook);

  // Dirty tracking. Start turns on logging for every slot (present and
  // future) with empty block bitmaps; writes from then on are recorded.
  Status StartDirtyTracking();
  Status StopDirtyTracking();
  bool dirty_tracking() const;
  // Pulls KVM's dirty log or rings into the block bitmaps and re-protects the
  // harvested pages, so a later write dirties them again.
  Status HarvestDirty();
  // Moves the dirty bits accumulated for `block_name` into `out` (4 KiB
  // pages of the block) and clears them. Call HarvestDirty() first.
  Status TakeDirty(std::string_view block_name, DirtyBitmap& out);
  // A vCPU thread whose ring filled up (KVM_EXIT_DIRTY_RING_FULL) empties
  // every ring into a pending list. Never waits for vCPUs, so it is safe to
  // call from a vCPU thread while a layout change is holding the others.
  Status DrainDirtyRings();

  // Accesses the VMM itself makes to guest memory. Bounds and holes are
  // checked; writes are recorded as dirty while tracking is on.
  Status Read(Gpa gpa, std::span<uint8_t> out) const;
  Status Write(Gpa gpa, std::span<const uint8_t> data);

  std::vector<std::shared_ptr<RamBlock>> blocks() const;

 private:
  GuestMemory(MemslotBackend* backend, GuestMemoryOptions options);

  MemslotRegion RegionFor(const Memslot& slot) const REQUIRES(mu_);
  bool LogsDirty(const Memslot& slot) const REQUIRES(mu_);
  // Memslot changes are serialised by mu_.
  Status InstallSlot(const Memslot& slot) REQUIRES(mu_);
  Status DeleteSlot(const Memslot& slot) REQUIRES(mu_);
  Status HarvestSlotLocked(const Memslot& slot) REQUIRES(mu_);
  Status HarvestLocked() REQUIRES(mu_);
  void DrainRingsLocked() REQUIRES(ring_mu_);
  Status TrackBlocksLocked(const MemoryMap& map) REQUIRES(mu_);

  struct BlockDirty {
    std::shared_ptr<RamBlock> block;  // kept alive while its bits are
    DirtyBitmap bits;                 // 4 KiB pages of the block
  };
  struct VmmWrite {
    const RamBlock* block;
    uint64_t offset, length;
  };

  MemslotBackend* const backend_;
  AccelDirtyLog* const accel_log_;  // the accelerator's dirty log, or nullptr
  const GuestMemoryOptions options_;
  AtomicMemoryMap map_;
  AccessHook access_hook_;  // set before the VM runs; read without a lock

  // Lock order: mu_, then map_'s writer lock (inside Update), then ring_mu_,
  // then vmm_dirty_mu_. mu_ is held across holding the vCPUs, so nothing a
  // vCPU thread does (exit handling: Write, DrainDirtyRings) may take it.
  mutable sys::Mutex mu_;
  MemslotPlanner planner_ GUARDED_BY(mu_);  // SetMemslotGranule replaces it
  VcpuPauser* pauser_ GUARDED_BY(mu_) = nullptr;
  MemslotTable slots_ GUARDED_BY(mu_);  // what KVM has
  bool tracking_ GUARDED_BY(mu_) = false;
  std::map<const RamBlock*, BlockDirty> dirty_ GUARDED_BY(mu_);
  LayoutChangeStats last_change_ GUARDED_BY(mu_);
  std::vector<uint64_t> log_buffer_ GUARDED_BY(mu_);   // TakeSlotLog's scratch
  std::unique_ptr<UffdWpTracker> wp_ GUARDED_BY(mu_);  // uffd-wp while tracking

  mutable sys::Mutex ring_mu_ ACQUIRED_AFTER(mu_);
  std::vector<DirtyRingEntry> pending_ring_ GUARDED_BY(ring_mu_);

  // Writes by the VMM while tracking, merged at the next harvest. A leaf
  // lock: taken by vCPU threads, never held while waiting for anything.
  mutable sys::Mutex vmm_dirty_mu_ ACQUIRED_AFTER(mu_, ring_mu_);
  bool vmm_tracking_ GUARDED_BY(vmm_dirty_mu_) = false;
  std::vector<VmmWrite> vmm_dirty_ GUARDED_BY(vmm_dirty_mu_);
};

}  // namespace faultline
