#include "src/hypervisor/kvm_dirty_log.h"

#include <algorithm>

#include "src/sys/linux_abi.h"

namespace faultline::hv {

Status KvmDirtyLog::EnableBitmap() {
  // Manual protect: KVM_GET_DIRTY_LOG only reads the log, and TakeSlotLog
  // re-protects exactly the pages it harvested.
  if (!(vm_.CheckExtension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) &
        KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)) {
    return Error("KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 — use the dirty ring instead");
  }
  return vm_.EnableCap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
}

Status KvmDirtyLog::EnableRing(uint32_t entries) {
  uint32_t cap = KVM_CAP_DIRTY_LOG_RING;
  int max_bytes = vm_.CheckExtension(cap);
  if (max_bytes <= 0) {
    cap = KVM_CAP_DIRTY_LOG_RING_ACQ_REL;
    max_bytes = vm_.CheckExtension(cap);
  }
  if (max_bytes <= 0) {
    return Error("KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING) — use the bitmap");
  }
  const uint64_t bytes = uint64_t{entries} * sizeof(kvm_dirty_gfn);
  if (bytes > static_cast<uint64_t>(max_bytes)) {
    return Error("dirty ring of {} entries is {} bytes; KVM allows at most {}", entries, bytes,
                 max_bytes);
  }
  RETURN_IF_ERROR(
      vm_.EnableCap(cap, bytes)
          .WithContext("enabling the dirty ring (it must happen before vCPUs are created)"));
  ring_entries_ = entries;
  return Status::Ok();
}

Status KvmDirtyLog::TakeSlotLog(uint32_t slot, uint64_t pages, std::vector<uint64_t>& bits) {
  bits.assign((pages + 63) / 64, 0);
  RETURN_IF_ERROR(vm_.GetDirtyLog(slot, bits));
  if (std::all_of(bits.begin(), bits.end(), [](uint64_t w) { return w == 0; })) {
    return Status::Ok();
  }
  // Re-protect exactly what was read before anyone reads the pages: a write
  // after this point dirties the page again.
  return vm_.ClearDirtyLog(slot, 0, static_cast<uint32_t>(pages), bits);
}

Status KvmDirtyLog::AddVcpu(const sys::KvmVcpu& vcpu) {
  if (ring_entries_ == 0) return Status::Ok();
  ASSIGN_OR_RETURN(sys::Mapping ring,
                   vcpu.MapDirtyRing(ring_entries_ * uint32_t{sizeof(kvm_dirty_gfn)}));
  sys::MutexLock lock(mu_);
  rings_.push_back(Ring{std::move(ring), 0});
  return Status::Ok();
}

void KvmDirtyLog::DrainRings(std::vector<DirtyRingEntry>& out) {
  sys::MutexLock lock(mu_);
  bool any = false;
  for (Ring& ring : rings_) {
    auto* gfns = reinterpret_cast<kvm_dirty_gfn*>(ring.mapping.data());
    for (;;) {
      kvm_dirty_gfn& entry = gfns[ring.next & (ring_entries_ - 1)];
      const uint32_t flags = __atomic_load_n(&entry.flags, __ATOMIC_ACQUIRE);
      if (!(flags & KVM_DIRTY_GFN_F_DIRTY)) break;
      // The slot field carries the address space in its upper half.
      out.push_back(DirtyRingEntry{entry.slot & 0xffff, entry.offset});
      __atomic_store_n(&entry.flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
      ++ring.next;
      any = true;
    }
  }
  // Gives the collected entries back to KVM, which re-protects their pages.
  if (any) (void)vm_.ResetDirtyRings();
}

}  // namespace faultline::hv
