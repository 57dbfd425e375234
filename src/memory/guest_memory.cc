#include "src/memory/guest_memory.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <unordered_map>

#include "src/memory/uffd_wp_tracker.h"

namespace faultline {
namespace {

constexpr uint64_t kDirtyPage = 4096;  // KVM logs writes per 4 KiB page

uint64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool IsGuestMemfd(const RamBlock& block) { return block.backing() == Backing::kGuestMemfd; }

// How many memslots the planner may use on this backend.
uint32_t MaxSlots(MemslotBackend& backend) {
  const uint32_t max_slots = backend.max_memslots();
  return max_slots > 0 ? std::min<uint32_t>(max_slots, kMaxMemslotIds) : kDefaultMaxMemslots;
}

}  // namespace

const char* DirtyLogModeName(DirtyLogMode mode) {
  switch (mode) {
    case DirtyLogMode::kRing:
      return "ring";
    case DirtyLogMode::kUffdWp:
      return "uffd-wp";
    case DirtyLogMode::kBitmap:
      break;
  }
  return "bitmap";
}

Result<DirtyLogMode> ParseDirtyLogMode(std::string_view text) {
  if (text == "bitmap") return DirtyLogMode::kBitmap;
  if (text == "ring") return DirtyLogMode::kRing;
  if (text == "uffd-wp") return DirtyLogMode::kUffdWp;
  return Error(
      "unknown dirty tracking '{}' — use bitmap or ring (KVM's dirty log) or uffd-wp "
      "(userfaultfd write-protect, any accelerator)",
      text);
}

GuestMemory::GuestMemory(MemslotBackend* backend, GuestMemoryOptions options)
    : backend_(backend),
      accel_log_(backend->accel_dirty_log()),
      options_(options),
      planner_(MaxSlots(*backend), options.memslot_granule) {}

GuestMemory::~GuestMemory() = default;

Result<std::unique_ptr<GuestMemory>> GuestMemory::Create(MemslotBackend* backend,
                                                         GuestMemoryOptions options) {
  const uint64_t granule = options.memslot_granule;
  if (granule != 0 && (granule < kHugePageSize || (granule & (granule - 1)) != 0)) {
    return Error("memslot granule {:#x}: must be 0 or a power of two of at least 2 MiB", granule);
  }
  std::unique_ptr<GuestMemory> memory(new GuestMemory(backend, options));
  AccelDirtyLog* log = memory->accel_log_;
  if (options.dirty_mode == DirtyLogMode::kUffdWp) return memory;
  if (log == nullptr) {
    return Error(
        "dirty tracking '{}' is KVM's dirty log, and this VM has no KVM — use --dirty uffd-wp",
        DirtyLogModeName(options.dirty_mode));
  }
  if (options.dirty_mode == DirtyLogMode::kBitmap) {
    RETURN_IF_ERROR(log->EnableBitmap());
  } else {
    const uint32_t entries = options.dirty_ring_entries;
    if (entries == 0 || (entries & (entries - 1)) != 0) {
      return Error("dirty ring of {} entries: must be a power of two", entries);
    }
    RETURN_IF_ERROR(log->EnableRing(entries));
  }
  return memory;
}

void GuestMemory::SetPauser(VcpuPauser* pauser) {
  sys::MutexLock lock(mu_);
  pauser_ = pauser;
}

MemslotRegion GuestMemory::RegionFor(const Memslot& slot) const {
  MemslotRegion region;
  region.id = slot.id;
  region.gpa = slot.range.gpa;
  region.size = slot.range.size;
  region.hva = slot.range.hva;
  if (IsGuestMemfd(*slot.range.block)) {
    // guest_memfd slots cannot log dirty pages on this kernel: KVM rejects
    // the flag. Their blocks are reported all dirty instead (TakeDirty).
    region.guest_memfd = slot.range.block->fd();
    region.guest_memfd_offset = slot.range.block_offset;
    return region;
  }
  region.log_dirty = LogsDirty(slot);
  return region;
}

bool GuestMemory::LogsDirty(const Memslot& slot) const {
  // guest_memfd slots cannot (see RegionFor); userfaultfd write-protect
  // tracks the blocks' host memory, not slots.
  return !IsGuestMemfd(*slot.range.block) && tracking_ && accel_log_ != nullptr &&
         options_.dirty_mode != DirtyLogMode::kUffdWp;
}

Status GuestMemory::InstallSlot(const Memslot& slot) {
  return backend_->SetMemslot(RegionFor(slot))
      .WithContext(fmt::format("memslot for block '{}'", slot.range.block->name()));
}

Status GuestMemory::DeleteSlot(const Memslot& slot) {
  MemslotRegion region;
  region.id = slot.id;
  region.gpa = slot.range.gpa;
  region.size = 0;
  return backend_->SetMemslot(region);
}

Result<std::shared_ptr<const MemoryMap>> GuestMemory::Update(const AtomicMemoryMap::Edit& edit) {
  sys::MutexLock lock(mu_);
  // Every writer of map_ goes through here under mu_, so `current` stays the
  // published map until we publish the next one.
  std::shared_ptr<const MemoryMap> current = map_.Load();
  ASSIGN_OR_RETURN(std::shared_ptr<const MemoryMap> next, edit(*current));
  ASSIGN_OR_RETURN(MemslotPlan plan, planner_.Plan(slots_, next));

  LayoutChangeStats stats;
  stats.generation = next->generation();
  stats.slots_kept = plan.kept;
  // Ordering invariants, in this order:
  //  1. every vCPU is out of KVM_RUN before the first slot changes, so none
  //     runs against an intermediate layout;
  //  2. a slot's dirty log is harvested before the slot is deleted (KVM
  //     frees the log with the slot); rings are drained while the old slot
  //     ids still mean what they meant;
  //  3. deletes precede creates (the planner orders them), so a create never
  //     overlaps a live slot and freed ids can be reused;
  //  4. the new map is published before the vCPUs run again, so an exit
  //     handler that looks up an address sees the layout KVM has.
  const bool pause = pauser_ != nullptr && !plan.changes.empty();
  uint64_t t0 = NowNs();
  if (pause) pauser_->Hold();
  uint64_t t1 = NowNs();
  Status status = tracking_ ? TrackBlocksLocked(*next) : Status::Ok();
  if (status.ok() && tracking_) status = HarvestLocked();
  size_t applied = 0;  // changes that took effect
  while (status.ok() && applied < plan.changes.size()) {
    const MemslotChange& change = plan.changes[applied];
    if (change.kind == MemslotChange::Kind::kDelete) {
      status = DeleteSlot(change.slot);
      stats.slots_deleted += status.ok();
    } else {
      status = InstallSlot(change.slot);
      stats.slots_created += status.ok();
    }
    if (status.ok()) ++applied;
  }
  if (!status.ok()) {
    // Undo what was applied, newest first, so KVM's slots match slots_
    // again; the old map stays published.
    for (size_t i = applied - 1; i < applied; --i) {
      const MemslotChange& change = plan.changes[i];
      if (change.kind == MemslotChange::Kind::kCreate) {
        (void)DeleteSlot(change.slot);
      } else {
        (void)InstallSlot(change.slot);
      }
    }
    if (pause) pauser_->Release();
    return status.WithContext(fmt::format("layout change to generation {}", next->generation()));
  }
  slots_ = std::move(plan.next);
  Result<std::shared_ptr<const MemoryMap>> published = map_.Update(
      [&](const MemoryMap&) -> Result<std::shared_ptr<const MemoryMap>> { return next; });
  uint64_t t2 = NowNs();
  if (pause) pauser_->Release();
  stats.hold_ns = t1 - t0;
  stats.pause_ns = t2 - t1;
  last_change_ = stats;
  return published;
}

Status GuestMemory::Place(std::shared_ptr<RamBlock> block, Gpa base) {
  return Update([&](const MemoryMap& m) { return m.Place(block, base); }).status();
}

Status GuestMemory::PunchHole(Gpa start, uint64_t length) {
  return Update([&](const MemoryMap& m) { return m.PunchHole(start, length); }).status();
}

Status GuestMemory::FillHole(Gpa start, uint64_t length) {
  return Update([&](const MemoryMap& m) { return m.FillHole(start, length); }).status();
}

Result<bool> GuestMemory::TryFillHoleWithoutPause(Gpa start, uint64_t length) {
  // Only tried: a writer holding mu_ may be waiting for this very vCPU to
  // stop (Update holds the vCPUs under mu_).
  if (!mu_.TryLock()) return false;
  sys::MutexLock lock(mu_, std::adopt_lock);
  std::shared_ptr<const MemoryMap> current = map_.Load();
  ASSIGN_OR_RETURN(std::shared_ptr<const MemoryMap> next, current->FillHole(start, length));
  ASSIGN_OR_RETURN(MemslotPlan plan, planner_.Plan(slots_, next));
  for (const MemslotChange& change : plan.changes) {
    if (change.kind == MemslotChange::Kind::kDelete) {
      return Error(
          "filling hole [{:#x}, +{:#x}) without a pause would change memslot {} (the memslot "
          "granule {:#x} must divide the hole's bounds)",
          start.value, length, change.slot.id, planner_.granule());
    }
  }
  if (tracking_) RETURN_IF_ERROR(TrackBlocksLocked(*next));
  for (size_t i = 0; i < plan.changes.size(); ++i) {
    Status status = InstallSlot(plan.changes[i].slot);
    if (!status.ok()) {
      for (size_t j = 0; j < i; ++j) (void)DeleteSlot(plan.changes[j].slot);
      return status.WithContext(fmt::format("filling hole [{:#x}, +{:#x})", start.value, length));
    }
  }
  slots_ = std::move(plan.next);
  // The slots exist before the map says so: an exit handler that finds the
  // range mapped can rely on KVM having it too.
  RETURN_IF_ERROR(map_.Update([&](const MemoryMap&) -> Result<std::shared_ptr<const MemoryMap>> {
                        return next;
                      })
                      .status());
  return true;
}

Status GuestMemory::SetMemslotGranule(uint64_t granule) {
  if (granule != 0 && (granule < kDirtyPage || (granule & (granule - 1)) != 0)) {
    return Error("memslot granule {:#x}: must be 0 or a power of two of at least 4 KiB", granule);
  }
  {
    sys::MutexLock lock(mu_);
    planner_ = MemslotPlanner(planner_.max_slots(), granule);
  }
  // The same map, planned again: slots cut differently are replaced.
  return Update([](const MemoryMap& m) -> Result<std::shared_ptr<const MemoryMap>> {
           return m.Edit().Build();
         })
      .status();
}

uint64_t GuestMemory::memslot_granule() const {
  sys::MutexLock lock(mu_);
  return planner_.granule();
}

void GuestMemory::SetAccessHook(AccessHook hook) { access_hook_ = std::move(hook); }

LayoutChangeStats GuestMemory::last_change() const {
  sys::MutexLock lock(mu_);
  return last_change_;
}

std::vector<Memslot> GuestMemory::memslots() const {
  sys::MutexLock lock(mu_);
  return {slots_.slots().begin(), slots_.slots().end()};
}

Status GuestMemory::TrackBlocksLocked(const MemoryMap& map) {
  for (const Placement& p : map.placements()) {
    auto [it, inserted] = dirty_.try_emplace(p.block.get());
    if (inserted) {
      it->second.block = p.block;
      it->second.bits = DirtyBitmap(p.block->size() / kDirtyPage);
      // guest_memfd has no host mapping to protect: TakeDirty reports it all.
      if (wp_ && !IsGuestMemfd(*p.block)) RETURN_IF_ERROR(wp_->Track(p.block));
    }
  }
  return Status::Ok();
}

Status GuestMemory::StartDirtyTracking() {
  sys::MutexLock lock(mu_);
  if (tracking_) return Status::Ok();
  dirty_.clear();
  if (options_.dirty_mode == DirtyLogMode::kUffdWp) {
    ASSIGN_OR_RETURN(wp_, UffdWpTracker::Create());
    Status s = TrackBlocksLocked(*map_.Load());
    if (!s.ok()) {
      wp_.reset();
      dirty_.clear();
      return s.WithContext("starting dirty tracking (uffd-wp)");
    }
  } else {
    (void)TrackBlocksLocked(*map_.Load());
  }
  tracking_ = true;
  {
    sys::MutexLock vmm_lock(vmm_dirty_mu_);
    vmm_tracking_ = true;
    vmm_dirty_.clear();
  }
  for (const Memslot& slot : slots_.slots()) {
    // A guest_memfd slot's flags do not change with tracking, and KVM
    // refuses to update such a slot in place (EINVAL): leave it alone.
    if (IsGuestMemfd(*slot.range.block)) continue;
    Status s = InstallSlot(slot);
    if (!s.ok()) {
      tracking_ = false;
      for (const Memslot& undo : slots_.slots()) {
        if (!IsGuestMemfd(*undo.range.block)) (void)InstallSlot(undo);
      }
      sys::MutexLock vmm_lock(vmm_dirty_mu_);
      vmm_tracking_ = false;
      return s.WithContext("starting dirty tracking");
    }
  }
  return Status::Ok();
}

Status GuestMemory::StopDirtyTracking() {
  sys::MutexLock lock(mu_);
  if (!tracking_) return Status::Ok();
  tracking_ = false;
  {
    sys::MutexLock vmm_lock(vmm_dirty_mu_);
    vmm_tracking_ = false;
    vmm_dirty_.clear();
  }
  dirty_.clear();
  wp_.reset();  // unregisters every block
  for (const Memslot& slot : slots_.slots()) {
    if (IsGuestMemfd(*slot.range.block)) continue;  // see StartDirtyTracking
    RETURN_IF_ERROR(InstallSlot(slot));
  }
  return Status::Ok();
}

bool GuestMemory::dirty_tracking() const {
  sys::MutexLock lock(mu_);
  return tracking_;
}

Status GuestMemory::HarvestDirty() {
  sys::MutexLock lock(mu_);
  if (!tracking_) return Error("dirty tracking is off — StartDirtyTracking() first");
  return HarvestLocked();
}

Status GuestMemory::HarvestSlotLocked(const Memslot& slot) {
  if (!LogsDirty(slot)) return Status::Ok();
  const uint64_t pages = slot.range.size / kDirtyPage;
  RETURN_IF_ERROR(accel_log_->TakeSlotLog(slot.id, pages, log_buffer_));
  auto it = dirty_.find(slot.range.block);
  if (it != dirty_.end()) {
    it->second.bits.MergeRaw(log_buffer_, pages, slot.range.block_offset / kDirtyPage);
  }
  return Status::Ok();
}

void GuestMemory::DrainRingsLocked() { accel_log_->DrainRings(pending_ring_); }

Status GuestMemory::DrainDirtyRings() {
  sys::MutexLock lock(ring_mu_);
  DrainRingsLocked();
  return Status::Ok();
}

Status GuestMemory::HarvestLocked() {
  if (options_.dirty_mode == DirtyLogMode::kUffdWp) {
    for (auto& [block, entry] : dirty_) {
      if (wp_->tracking(*block)) RETURN_IF_ERROR(wp_->Harvest(*block, entry.bits));
    }
  } else if (options_.dirty_mode == DirtyLogMode::kBitmap) {
    for (const Memslot& slot : slots_.slots()) RETURN_IF_ERROR(HarvestSlotLocked(slot));
  } else {
    sys::MutexLock ring_lock(ring_mu_);
    DrainRingsLocked();
    std::unordered_map<uint32_t, const Memslot*> by_id;
    for (const Memslot& slot : slots_.slots()) by_id[slot.id] = &slot;
    for (const DirtyRingEntry& entry : pending_ring_) {
      auto it = by_id.find(entry.slot);
      if (it == by_id.end()) continue;
      const Memslot& slot = *it->second;
      if (entry.page >= slot.range.size / kDirtyPage) continue;
      auto block = dirty_.find(slot.range.block);
      if (block != dirty_.end()) {
        block->second.bits.Set(slot.range.block_offset / kDirtyPage + entry.page);
      }
    }
    pending_ring_.clear();
  }
  std::vector<VmmWrite> writes;
  {
    sys::MutexLock vmm_lock(vmm_dirty_mu_);
    writes.swap(vmm_dirty_);
  }
  for (const VmmWrite& w : writes) {
    auto it = dirty_.find(w.block);
    if (it == dirty_.end()) continue;
    uint64_t first = w.offset / kDirtyPage;
    uint64_t last = (w.offset + w.length + kDirtyPage - 1) / kDirtyPage;
    it->second.bits.SetRange(first, last - first);
  }
  return Status::Ok();
}

Status GuestMemory::TakeDirty(std::string_view block_name, DirtyBitmap& out) {
  sys::MutexLock lock(mu_);
  for (auto& [block, entry] : dirty_) {
    if (block->name() != block_name) continue;
    entry.bits.TakeInto(out);
    // No dirty log for guest_memfd: every page may have changed.
    if (IsGuestMemfd(*block)) out.SetAll();
    return Status::Ok();
  }
  return Error("no dirty bits for block '{}' (not placed, or tracking is off)", block_name);
}

Status GuestMemory::Read(Gpa gpa, std::span<uint8_t> out) const {
  if (access_hook_) RETURN_IF_ERROR(access_hook_(gpa, out.size()));
  std::shared_ptr<const MemoryMap> map = map_.Load();
  size_t done = 0;
  while (done < out.size()) {
    std::optional<Translation> t = map->Lookup(gpa + done);
    if (!t)
      return Error("guest read at {:#x}: no RAM there (a hole, or unmapped)", (gpa + done).value);
    size_t n = std::min<uint64_t>(out.size() - done, t->contiguous);
    std::memcpy(out.data() + done, t->hva.ptr(), n);
    done += n;
  }
  return Status::Ok();
}

Status GuestMemory::Write(Gpa gpa, std::span<const uint8_t> data) {
  if (access_hook_) RETURN_IF_ERROR(access_hook_(gpa, data.size()));
  std::shared_ptr<const MemoryMap> map = map_.Load();
  size_t done = 0;
  while (done < data.size()) {
    std::optional<Translation> t = map->Lookup(gpa + done);
    if (!t) {
      return Error("guest write at {:#x}: no RAM there (a hole, or unmapped)", (gpa + done).value);
    }
    size_t n = std::min<uint64_t>(data.size() - done, t->contiguous);
    std::memcpy(t->hva.ptr(), data.data() + done, n);
    {
      sys::MutexLock lock(vmm_dirty_mu_);
      if (vmm_tracking_) vmm_dirty_.push_back({t->block, t->offset, n});
    }
    done += n;
  }
  return Status::Ok();
}

std::vector<std::shared_ptr<RamBlock>> GuestMemory::blocks() const {
  std::vector<std::shared_ptr<RamBlock>> out;
  for (const Placement& p : map_.Load()->placements()) out.push_back(p.block);
  return out;
}

}  // namespace faultline
