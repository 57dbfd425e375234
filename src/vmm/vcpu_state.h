// VcpuState: everything needed to continue a vCPU elsewhere (another VM in
// this process, or another host): general and special registers, FPU and
// XSAVE, XCRs, MSRs including the TSC, the local APIC, pending events and
// the MP state. Serialises to a self-describing little-endian byte string.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "faultline/status.h"
#include "src/sys/kvm.h"

namespace faultline::vmm {

struct VcpuState {
  uint32_t id = 0;
  kvm_regs regs{};
  kvm_sregs sregs{};
  kvm_fpu fpu{};
  std::vector<uint8_t> xsave;  // empty if not captured
  kvm_xcrs xcrs{};
  bool has_xcrs = false;
  std::vector<sys::MsrEntry> msrs;
  kvm_lapic_state lapic{};
  bool has_lapic = false;
  kvm_vcpu_events events{};
  kvm_mp_state mp_state{};

  std::vector<uint8_t> Serialize() const;
  static Result<VcpuState> Deserialize(std::span<const uint8_t> bytes);
};

// What the host lets us save and restore, queried once per VM.
struct VcpuStateSupport {
  std::vector<uint32_t> msr_indices;  // KVM_GET_MSR_INDEX_LIST, filtered to readable ones
  int xsave2_size = 0;                // KVM_CAP_XSAVE2, 0 if unsupported
  bool xcrs = false;
  bool lapic = false;  // an in-kernel irqchip exists
};

// The vCPU must be out of KVM_RUN with no pending I/O (VcpuSet::Hold()).
Result<VcpuState> CaptureVcpuState(const sys::KvmVcpu& vcpu, const VcpuStateSupport& support);
Status RestoreVcpuState(sys::KvmVcpu& vcpu, const VcpuState& state);

// Drops MSRs from `support.msr_indices` that `vcpu` cannot read.
void FilterReadableMsrs(const sys::KvmVcpu& vcpu, VcpuStateSupport& support);

}  // namespace faultline::vmm
