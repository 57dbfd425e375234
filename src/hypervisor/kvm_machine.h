// KVM behind the hypervisor seam: a VM on /dev/kvm with an in-kernel
// irqchip where the host has one, the host's supported CPUID per vCPU, and
// vCPU state captured and restored through the KVM state ioctls.
#pragma once

#include <memory>

#include "src/hypervisor/hypervisor.h"

namespace faultline::hv {

// Opens /dev/kvm and creates a VM; the error says what to do when there is
// no usable KVM device.
Result<std::unique_ptr<Vm>> CreateKvmVm(const VmOptions& options);

}  // namespace faultline::hv
