// VcpuExitHandler: what demand paging needs to run on a VMM's vCPU threads.
// The pager (paging::GuestPager) implements it; a VMM that runs its own
// vCPUs calls it from them (the reference VMM: vmm::Vm::AttachPager).
#pragma once

#include <cstdint>

#include "faultline/status.h"
#include "src/hypervisor/hypervisor.h"

namespace faultline::paging {

class VcpuExitHandler {
 public:
  virtual ~VcpuExitHandler() = default;

  // On vCPU `index`'s thread, before it first runs.
  virtual void OnVcpuThreadStarted(uint32_t index) = 0;
  // An access to a guest-physical address without RAM, before the VMM's
  // own MMIO handling: true if the pager completed it (a missing chunk
  // brought in), false if it is the VMM's.
  virtual Result<bool> OnMmio(hv::Vcpu& vcpu, hv::MmioExit& mmio) = 0;
  // The vCPU's run was interrupted (a signal): an error stops the VM.
  virtual Status OnInterrupted(hv::Vcpu& vcpu) = 0;
};

}  // namespace faultline::paging
