// The x86-64 boot environment the VMM builds for the test guest: identity
// page tables, a boot GDT, multiboot information and the command line in
// guest memory, and each vCPU's register state at the 64-bit entry. The
// layout is the contract in guest/abi.h.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "faultline/status.h"
#include "faultline/types.h"
#include "src/hypervisor/vcpu_state.h"

namespace faultline::vmm {

// Writes page tables, GDT, multiboot info and `cmdline` into `ram` (guest
// memory from GPA 0). `ram_end` is the first GPA after RAM.
Status WriteBootStructures(std::span<uint8_t> ram, uint64_t ram_end, std::string_view cmdline);

// Sets `state` (an accelerator's reset state) for vCPU `index` of `count`
// to start at `entry64` in long mode: flat boot GDT segments, paging on the
// identity page tables, and the entry's arguments in RDI, RSI, RDX.
void SetupLongModeEntry(hv::VcpuState& state, uint64_t entry64, uint32_t index, uint32_t count);

// "#GP", "#PF", ... for an exception vector; "vector N" otherwise.
std::string ExceptionName(uint8_t vector);

}  // namespace faultline::vmm
