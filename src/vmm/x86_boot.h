// The x86-64 boot environment the VMM builds for the test guest: identity
// page tables, a boot GDT, multiboot information and the command line in
// guest memory, and each vCPU's register state at the 64-bit entry. The
// layout is the contract in guest/abi.h.
#pragma once

#include "src/sys/kvm.h"

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "faultline/status.h"
#include "faultline/types.h"

namespace faultline::vmm {

// Writes page tables, GDT, multiboot info and `cmdline` into `ram` (guest
// memory from GPA 0). `ram_end` is the first GPA after RAM.
Status WriteBootStructures(std::span<uint8_t> ram, uint64_t ram_end, std::string_view cmdline);

// Special and general registers for vCPU `index` of `count` starting at
// `entry64` in long mode. `sregs` comes in with KVM's defaults.
void SetupLongModeSregs(kvm_sregs& sregs);
kvm_regs LongModeEntryRegs(uint64_t entry64, uint32_t index, uint32_t count);

// Supported CPUID adjusted for vCPU `index` (APIC IDs).
std::vector<kvm_cpuid_entry2> CpuidForVcpu(std::span<const kvm_cpuid_entry2> supported,
                                           uint32_t index);

}  // namespace faultline::vmm
