// The migration seams (SourceVm, DestinationVm, PostcopyDestinationVm) for
// any VMM whose guest RAM is a GuestMemory: memory, dirty tracking and
// demand paging are Faultline's, and the VMM supplies the rest through
// VmControl. The reference VMM (src/vmm/vm_adapter.cc) and the embedding
// API (src/embed/) are both built on them.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "faultline/status.h"
#include "src/memory/guest_memory.h"
#include "src/migration/migratable.h"
#include "src/migration/postcopy_vm.h"
#include "src/paging/guest_pager.h"

namespace faultline::migration {

// What a VMM does besides memory: its vCPUs and devices.
class VmControl {
 public:
  virtual ~VmControl() = default;

  // Whose vCPU state SaveVcpus produces and LoadVcpus takes.
  virtual HelloAccel accelerator() const { return HelloAccel::kUnspecified; }
  virtual uint32_t vcpu_count() const = 0;

  // No vCPU runs and no device writes guest memory between Pause() and
  // Resume().
  virtual void Pause() = 0;
  virtual void Resume() = 0;
  // Requires Pause(). One opaque blob per vCPU, in index order.
  virtual Result<std::vector<std::vector<uint8_t>>> SaveVcpus() = 0;
  virtual Status LoadVcpus(std::span<const std::vector<uint8_t>> states) = 0;
  virtual Result<std::vector<DeviceBlob>> SaveDevices() = 0;
  virtual Status LoadDevices(std::span<const DeviceBlob> devices) = 0;

  // Destination: every page reads as zero now (memory created for the
  // migration), so zero pages of the first pass need no write.
  virtual bool memory_is_zero() const = 0;
  // Post-copy destination. The pager joins the VMM: its VcpuExitHandler on
  // the vCPU threads, EnsurePresent before the VMM's own accesses; nullptr
  // detaches it (the VM stopped). A VMM whose vCPUs fault only through
  // userfaultfd (KVM, any VMM of its own) needs no more than this.
  virtual void AttachPager(paging::GuestPager* pager) = 0;
  // With the pager attached, before the vCPUs run: what it must make
  // present for each vCPU (the hole installer, GuestPager::PrepareVcpu).
  virtual Status PrepareVcpus(paging::GuestPager& pager) = 0;
  // Runs the guest (its state loaded).
  virtual Status Start() = 0;
};

// `memory` must outlive the returned object.
std::unique_ptr<SourceVm> MakeMemorySource(GuestMemory& memory, std::unique_ptr<VmControl> vm);
std::unique_ptr<DestinationVm> MakeMemoryDestination(GuestMemory& memory,
                                                     std::unique_ptr<VmControl> vm);
// `memory`'s blocks must not be in use by a running guest yet; the result
// must outlive the guest's run (it owns the pager the vCPUs call). The
// installer defaults to paging::BestInstaller for the first block's
// backing.
std::unique_ptr<PostcopyDestinationVm> MakeMemoryPostcopyDestination(
    GuestMemory& memory, std::unique_ptr<VmControl> vm, PostcopyVmOptions options = {});

}  // namespace faultline::migration
