// KvmDirtyLog: KVM's own dirty log behind memory's AccelDirtyLog. Bitmap
// mode reads a slot's log with KVM_GET_DIRTY_LOG and re-protects exactly
// the pages it read with KVM_CLEAR_DIRTY_LOG (manual protect, so a harvest
// costs no write-protect pass over the whole slot). Ring mode maps each
// vCPU's dirty ring, collects its entries and hands them back with
// KVM_RESET_DIRTY_RINGS.
#pragma once

#include <cstdint>
#include <vector>

#include "src/memory/memslot_backend.h"
#include "src/sys/kvm.h"
#include "src/sys/mapping.h"
#include "src/sys/mutex.h"

namespace faultline::hv {

class KvmDirtyLog final : public AccelDirtyLog {
 public:
  // `vm` must outlive this object.
  explicit KvmDirtyLog(sys::KvmVm& vm) : vm_(vm) {}

  Status EnableBitmap() override;
  Status EnableRing(uint32_t entries) override;
  Status TakeSlotLog(uint32_t slot, uint64_t pages, std::vector<uint64_t>& bits) override;
  void DrainRings(std::vector<DirtyRingEntry>& out) override;

  // Maps a new vCPU's ring (ring mode; nothing otherwise).
  Status AddVcpu(const sys::KvmVcpu& vcpu);

 private:
  struct Ring {
    sys::Mapping mapping;
    uint32_t next = 0;  // the next entry to collect (mod ring_entries_)
  };

  sys::KvmVm& vm_;
  uint32_t ring_entries_ = 0;  // 0: not in ring mode; set before any vCPU
  sys::Mutex mu_;
  std::vector<Ring> rings_ GUARDED_BY(mu_);
};

}  // namespace faultline::hv
