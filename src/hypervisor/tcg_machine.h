// The software CPU behind the hypervisor seam: one libunicorn x86-64 engine
// per vCPU, run on the vCPU's own thread, on guest RAM mapped straight from
// the RAM blocks' host mappings (uc_mem_map_ptr), so that installers,
// migration and the VMM's own accesses see the same memory as the guest.
//
// - Port I/O arrives through instruction hooks and is handled inline.
// - An access to a guest-physical address without RAM arrives through the
//   unmapped-memory hook on the vCPU's thread. If the VM's memslot table now
//   covers it (a hole filled without a pause), the engine maps that slot
//   and retries; otherwise the page becomes an MMIO page whose accesses go
//   to the exit handler (an all-ones hole, or the hole installer bringing a
//   chunk in).
// - Layout: SetMemslot updates the VM's table and its generation. Every
//   engine compares generations before it enters the guest and re-maps what
//   changed. Slots are only removed or moved while every vCPU is held
//   (GuestMemory::Update), so no engine runs on a stale layout; added slots
//   are mapped lazily as above.
// - A kick is a flag that a block hook polls, stopping the engine at the
//   next block boundary (uc_emu_stop from another thread is not precise in
//   libunicorn 2.0.1: the engine resumed mid-instruction).
// - RDTSC reads the host TSC (libunicorn 2.0.1 cannot hook it), so the VM's
//   tsc_khz is the host TSC's frequency, calibrated once per process.
// - A CPU exception (the engine does not deliver them through the IDT)
//   becomes an exit with its vector, reported with the registers.
// - libunicorn 2.0.1 walks the guest's page tables but accesses data at the
//   virtual address: guests must identity-map their RAM (the test guest
//   does).
#pragma once

#include <memory>

#include "src/hypervisor/hypervisor.h"

namespace faultline::hv {

Result<std::unique_ptr<Vm>> CreateTcgVm(const VmOptions& options);

// The host TSC frequency in kHz (calibrated against CLOCK_MONOTONIC once).
uint32_t HostTscKhz();

// For a SIGBUS handler on a vCPU thread: if the thread is inside a software
// CPU engine, leaves the engine (never returns) and its Run() returns
// kInterrupted; the engine cannot run again. Returns if it is not.
void LeaveSoftwareCpuAfterSignal();
// Whether the calling thread is inside a software CPU engine's run.
bool InSoftwareCpu();

}  // namespace faultline::hv
