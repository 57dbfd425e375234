// A libunicorn x86-64 engine's registers as the explicit VcpuState: the
// software CPU's GetState and SetState (tcg_machine.cc) without the engine
// around them.
#pragma once

#include <unicorn/unicorn.h>

#include <array>
#include <cstdint>
#include <functional>
#include <string_view>

#include "faultline/status.h"
#include "src/hypervisor/vcpu_state.h"

namespace faultline::hv {

// A libunicorn error as a Status: `what` failed, and libunicorn's reason.
Status UcError(uc_err err, std::string_view what);

// Reads the 16 bytes of guest memory at a guest-physical address into
// `out`; false if no RAM covers them.
using GuestReader = std::function<bool(uint64_t gpa, void* out)>;

// Segment hidden parts are not in libunicorn's registers: `known` holds the
// segments (CS, SS, DS, ES, FS, GS) as last set or decoded, and a selector
// that changed since is decoded from the GDT through `read_guest`.
Result<VcpuState> ReadTcgState(uc_engine* uc, uint32_t index, std::array<Segment, 6>& known,
                               const GuestReader& read_guest);
// Writes `state` into the engine (modes, tables, segments, GPRs, FPU/SSE,
// MSRs but the TSC, which the engine reads from the host) and into `known`.
// Guest memory must be mapped first: loading a selector reads the GDT.
Status WriteTcgState(uc_engine* uc, uint32_t index, const VcpuState& state,
                     std::array<Segment, 6>& known);

}  // namespace faultline::hv
