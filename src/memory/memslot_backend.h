// MemslotBackend: what GuestMemory needs from the accelerator below it. The
// hypervisor layer (src/hypervisor/) implements it for KVM and for the
// software CPU; tests implement it with a table. Memory speaks its own
// types here: KVM's stay in the hypervisor layer.
#pragma once

#include <cstdint>
#include <vector>

#include "faultline/status.h"
#include "faultline/types.h"

namespace faultline {

// One memslot: `size` bytes at `gpa`, backed by host memory at `hva`.
struct MemslotRegion {
  uint32_t id = 0;
  Gpa gpa;
  uint64_t size = 0;  // 0 deletes the slot
  Hva hva;
  bool log_dirty = false;  // the accelerator's own dirty log tracks writes
  int guest_memfd = -1;    // >= 0: the slot is this guest_memfd's memory
  uint64_t guest_memfd_offset = 0;
};

// A page the accelerator saw written: 4 KiB page `page` of memslot `slot`.
struct DirtyRingEntry {
  uint32_t slot = 0;
  uint64_t page = 0;
};

// The accelerator's own dirty log (KVM's bitmap and per-vCPU rings).
class AccelDirtyLog {
 public:
  virtual ~AccelDirtyLog() = default;
  // One of the two, once, before any vCPU exists. Each says what is missing
  // if the host cannot.
  virtual Status EnableBitmap() = 0;
  virtual Status EnableRing(uint32_t entries) = 0;
  // Bitmap: the slot's log into `bits` (one bit per 4 KiB page of `pages`),
  // and exactly those pages write-protected again before it returns.
  virtual Status TakeSlotLog(uint32_t slot, uint64_t pages, std::vector<uint64_t>& bits) = 0;
  // Ring: appends what every vCPU's ring holds to `out` and hands the
  // entries back, which re-protects their pages. Any thread.
  virtual void DrainRings(std::vector<DirtyRingEntry>& out) = 0;
};

class MemslotBackend {
 public:
  virtual ~MemslotBackend() = default;

  // How many memslot ids the accelerator takes.
  virtual uint32_t max_memslots() const = 0;
  // Creates, moves or (size 0) deletes one memslot. log_dirty is ignored
  // where there is no dirty log of the accelerator's own; guest_memfd is
  // refused where guest_memfd does not exist.
  virtual Status SetMemslot(const MemslotRegion& region) = 0;
  // The accelerator's dirty log, or nullptr where it has none (then only
  // userfaultfd write-protect tracks writes).
  virtual AccelDirtyLog* accel_dirty_log() = 0;
};

// For a VMM that keeps its own memslots (an embedder, a test): GuestMemory
// then only needs the layout to know its blocks, and dirty pages come from
// userfaultfd write-protect.
class VmmOwnedMemslots final : public MemslotBackend {
 public:
  uint32_t max_memslots() const override { return 0; }
  Status SetMemslot(const MemslotRegion&) override { return Status::Ok(); }
  AccelDirtyLog* accel_dirty_log() override { return nullptr; }
};

}  // namespace faultline
