// GuestPager: demand paging of a VM's guest memory. Chooses the machinery
// by installer (userfaultfd installers through a DemandPager, or memslot
// holes through HolePagers), runs on the VMM's vCPU threads through three
// hooks, gives the VMM's own accesses a path that makes pages present first,
// and applies the policy for pages the source could not supply.
//
// Wiring (vmm::Vm::AttachPager does it for the reference VMM):
//   VcpuExitHandler (src/paging/vcpu_exits.h), on the vCPU threads:
//     OnVcpuThreadStarted   (fault attribution, SIGBUS trap)
//     OnMmio                (hole installer: bring the chunk in)
//     OnInterrupted         (a poisoned page was touched)
//   GuestMemory::SetAccessHook -> EnsurePresent
//
// Memory errors: a vCPU touching a poisoned page gets a machine check
// injected (hv::Vcpu::InjectMachineCheck) when the guest has enabled them
// (CR4.MCE) and the accelerator can (KVM); otherwise (the software CPU, for
// one) the VM stops with an error naming the guest-physical address. The
// process never dies of it.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "faultline/status.h"
#include "src/hypervisor/hypervisor.h"
#include "src/memory/guest_memory.h"
#include "src/paging/demand_pager.h"
#include "src/paging/hole_pager.h"
#include "src/paging/vcpu_exits.h"
#include "src/sys/mutex.h"

namespace faultline::paging {

struct GuestPagingOptions {
  InstallerKind installer = InstallerKind::kMove;
  PagerOptions pager;                // queues, attempts, on_poison
  uint64_t hole_chunk = 2ull << 20;  // hole installer: bytes per chunk
  bool inject_mce = true;            // see the top of this file
};

// One RAM block to page: where its contents come from and what it has.
struct BlockToPage {
  std::shared_ptr<RamBlock> block;
  uint32_t source_block = 0;
  PresentMap present;
};

// A vCPU's access to a page whose contents were lost.
struct GuestMemoryError {
  uint32_t vcpu = 0;
  Gpa gpa;
  Hva hva;
  bool mce_injected = false;
};

class GuestPager final : public VcpuExitHandler {
 public:
  // Sets demand paging up for `blocks` (each placed in `memory`) before the
  // vCPUs run. `memory` must outlive this object.
  static Result<std::unique_ptr<GuestPager>> Create(GuestMemory& memory,
                                                    std::shared_ptr<PageSource> source,
                                                    std::vector<BlockToPage> blocks,
                                                    GuestPagingOptions options);
  ~GuestPager();

  // VcpuExitHandler, each on the vCPU's own thread.
  void OnVcpuThreadStarted(uint32_t index) override;
  // True if the exit was a missing chunk, now brought in and the access
  // completed; false if it is not demand paging's (the VMM handles it).
  Result<bool> OnMmio(hv::Vcpu& vcpu, hv::MmioExit& mmio) override;
  // An error stops the VM (the memory-error policy); OK otherwise.
  Status OnInterrupted(hv::Vcpu& vcpu) override;
  // The VMM's own accesses (GuestMemory's access hook): pages present first.
  Status EnsurePresent(Gpa gpa, uint64_t length);

  // Hole installer, before the vCPUs run: makes present what KVM reads by
  // itself for `vcpu` (the page tables from CR3 down to RIP, RSP, GDT, IDT
  // and TSS and its kernel stack, and those chunks).
  Status PrepareVcpu(hv::Vcpu& vcpu);

  Status Start();
  // Fetches every page still missing (from the caller's thread).
  Status PushAll();
  // Once complete: memslots merged back (hole) or userfaultfds unregistered.
  // Not on a vCPU thread.
  Status Finish();

  bool complete() const;
  PagingStats stats() const;
  std::vector<PoisonedUnit> poisoned() const;
  std::vector<GuestMemoryError> memory_errors() const;
  Status first_error() const;
  InstallerKind installer() const { return options_.installer; }
  DemandPager* demand_pager() { return uffd_.get(); }

 private:
  GuestPager(GuestMemory& memory, std::shared_ptr<PageSource> source, GuestPagingOptions options);
  std::optional<Gpa> HvaToGpa(Hva hva) const;
  // The policy for vCPU `index` touching lost page `gpa`.
  Status MemoryLost(hv::Vcpu& vcpu, Gpa gpa, Hva hva);
  Result<Gpa> Translate(const hv::VcpuState& state, uint64_t va);

  GuestMemory& memory_;
  GuestPagingOptions options_;
  uint64_t original_granule_ = 0;
  std::unique_ptr<DemandPager> uffd_;       // userfaultfd installers
  std::unique_ptr<PagerContext> hole_ctx_;  // hole installer
  std::vector<std::unique_ptr<HolePager>> holes_;
  std::vector<std::shared_ptr<RamBlock>> blocks_;

  mutable sys::Mutex mu_;
  std::vector<GuestMemoryError> errors_ GUARDED_BY(mu_);
};

}  // namespace faultline::paging
