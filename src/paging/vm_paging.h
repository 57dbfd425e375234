// Wires a GuestPager into the reference VMM: its vCPU hooks and the access
// hook of its GuestMemory. Call before Vm::Start(); the pager must outlive
// the VM's use of it (detach, or stop the VM, before destroying it).
#pragma once

#include <optional>

#include "src/paging/guest_pager.h"
#include "src/vmm/vm.h"

namespace faultline::paging {

inline void AttachToVm(GuestPager& pager, vmm::Vm& vm) {
  vmm::VcpuHooks hooks;
  hooks.started = [&pager](uint32_t index) { pager.OnVcpuThreadStarted(index); };
  hooks.mmio = [&pager](hv::Vcpu& vcpu, hv::MmioExit& mmio) { return pager.OnMmio(vcpu, mmio); };
  hooks.interrupted = [&pager](hv::Vcpu& vcpu) -> Result<vmm::ExitAction> {
    RETURN_IF_ERROR(pager.OnInterrupted(vcpu));
    return vmm::ExitAction::kContinue;
  };
  vm.SetVcpuHooks(std::move(hooks));
  vm.memory().SetAccessHook(
      [&pager](Gpa gpa, uint64_t length) { return pager.EnsurePresent(gpa, length); });
}

inline void DetachFromVm(vmm::Vm& vm) {
  vm.SetVcpuHooks({});
  vm.memory().SetAccessHook(nullptr);
}

}  // namespace faultline::paging
