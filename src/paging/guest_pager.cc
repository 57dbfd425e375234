#include "src/paging/guest_pager.h"

#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <utility>

#include "src/paging/memory_error_trap.h"

namespace faultline::paging {
namespace {

// The vCPU index of the calling thread, or -1: not a vCPU thread.
thread_local int t_vcpu = -1;
constexpr uint64_t kCr0Pg = 1ull << 31;
constexpr uint64_t kEferLma = 1ull << 10;
constexpr uint64_t kPteAddress = 0x000ffffffffff000ull;

}  // namespace

GuestPager::GuestPager(GuestMemory& memory, std::shared_ptr<PageSource> source,
                       GuestPagingOptions options)
    : memory_(memory), options_(std::move(options)) {
  if (options_.installer == InstallerKind::kHole) {
    hole_ctx_ = std::make_unique<PagerContext>(std::move(source), options_.pager);
    hole_ctx_->metrics().AddQueue();  // queue 0: the vCPUs' own exits
  }
}

GuestPager::~GuestPager() = default;

Result<std::unique_ptr<GuestPager>> GuestPager::Create(GuestMemory& memory,
                                                       std::shared_ptr<PageSource> source,
                                                       std::vector<BlockToPage> blocks,
                                                       GuestPagingOptions options) {
  for (const BlockToPage& b : blocks) {
    if (b.block == nullptr) return Error("guest paging: no RAM block");
    RETURN_IF_ERROR(CheckInstaller(options.installer, b.block->backing()));
  }
  std::unique_ptr<GuestPager> pager(new GuestPager(memory, source, options));
  MemoryErrorTrap::Install();
  pager->original_granule_ = memory.memslot_granule();
  if (options.installer == InstallerKind::kHole) {
    for (BlockToPage& b : blocks) {
      ASSIGN_OR_RETURN(auto hole, HolePager::Create(*pager->hole_ctx_, memory, b.block,
                                                    b.source_block, b.present, options.hole_chunk));
      pager->holes_.push_back(std::move(hole));
      pager->blocks_.push_back(b.block);
    }
    return pager;
  }
  ASSIGN_OR_RETURN(pager->uffd_, DemandPager::Create(std::move(source), options.pager));
  for (BlockToPage& b : blocks) {
    RETURN_IF_ERROR(pager->uffd_->AddBlock(b.block, options.installer, b.source_block, b.present));
    pager->blocks_.push_back(b.block);
  }
  return pager;
}

void GuestPager::OnVcpuThreadStarted(uint32_t index) {
  t_vcpu = static_cast<int>(index);
  MemoryErrorTrap::ArmThisThread();
  ThreadRegistry& threads = uffd_ ? uffd_->threads() : hole_ctx_->threads();
  threads.Add(::gettid(), index);
}

Result<bool> GuestPager::OnMmio(hv::Vcpu& vcpu, hv::MmioExit& mmio) {
  if (holes_.empty()) return false;
  const auto start = std::chrono::steady_clock::now();
  const Gpa gpa = mmio.gpa;
  const uint32_t len = std::min<uint32_t>(mmio.len, sizeof(mmio.data));
  auto elapsed_ns = [&] {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                     std::chrono::steady_clock::now() - start)
                                     .count());
  };
  for (auto& hole : holes_) {
    if (hole->WasPresent(gpa)) hole_ctx_->metrics().faults_on_present.Add();
    const HolePager::Outcome outcome = hole->Resolve(gpa, /*vcpu_thread=*/true);
    if (outcome == HolePager::Outcome::kNotOurs) continue;
    // This thread's own exit, timed to the completed access (joins
    // included: Resolve waited for whoever fetched the chunk).
    const uint32_t slot = hole_ctx_->metrics().Fault(0, ::gettid());
    if (outcome == HolePager::Outcome::kPoisoned) {
      hole_ctx_->metrics().Latency(slot, elapsed_ns());
      // The access reads all-ones (a bus with nothing behind it) whatever
      // the policy decides.
      if (!mmio.is_write) std::memset(mmio.data, 0xff, sizeof(mmio.data));
      RETURN_IF_ERROR(MemoryLost(vcpu, gpa, Hva(hole->HostFor(gpa))));
      return true;
    }
    // Complete the access that exited against the chunk's memory; the vCPU
    // finishes the instruction with it.
    uint8_t* host = hole->HostFor(gpa);
    if (mmio.is_write) {
      std::memcpy(host, mmio.data, len);
    } else {
      std::memcpy(mmio.data, host, len);
    }
    hole_ctx_->metrics().Latency(slot, elapsed_ns());
    return true;
  }
  return false;
}

Status GuestPager::OnInterrupted(hv::Vcpu& vcpu) {
  std::optional<MemoryErrorEvent> event = MemoryErrorTrap::Take();
  if (!event) return Status::Ok();  // a kick
  const std::optional<Gpa> gpa = HvaToGpa(event->hva);
  return MemoryLost(vcpu, gpa.value_or(Gpa(~uint64_t{0})), event->hva);
}

Status GuestPager::MemoryLost(hv::Vcpu& vcpu, Gpa gpa, Hva hva) {
  const uint32_t index = vcpu.index();
  GuestMemoryError error{index, gpa, hva, false};
  Status injected = options_.inject_mce ? vcpu.InjectMachineCheck(gpa)
                                        : Error("machine-check injection is turned off");
  error.mce_injected = injected.ok();
  {
    sys::MutexLock lock(mu_);
    errors_.push_back(error);
  }
  if (injected.ok()) return Status::Ok();  // the guest handles its #MC
  return Error(
      "vcpu {} touched guest-physical {:#x} (host {:#x}), whose contents are lost: the page "
      "source could not supply the page, so it was poisoned. The VM is stopped: {}",
      index, gpa.value, hva.value, injected.ToString());
}

std::optional<Gpa> GuestPager::HvaToGpa(Hva hva) const {
  std::shared_ptr<const MemoryMap> map = memory_.map();
  for (const MappedRange& r : map->ranges()) {
    if (hva >= r.hva && hva.value - r.hva.value < r.size) return r.gpa + (hva.value - r.hva.value);
  }
  return std::nullopt;
}

Status GuestPager::EnsurePresent(Gpa gpa, uint64_t length) {
  const bool vcpu_thread = t_vcpu >= 0;
  for (auto& hole : holes_) RETURN_IF_ERROR(hole->EnsurePresent(gpa, length, vcpu_thread));
  if (!uffd_) return Status::Ok();
  std::shared_ptr<const MemoryMap> map = memory_.map();
  for (uint64_t done = 0; done < length;) {
    std::optional<Translation> t = map->Lookup(gpa + done);
    if (!t) return Status::Ok();  // a hole: GuestMemory reports it
    const uint64_t n = std::min(length - done, t->contiguous);
    RETURN_IF_ERROR(uffd_->EnsurePresent(*t->block, t->offset, n));
    done += n;
  }
  return Status::Ok();
}

Result<Gpa> GuestPager::Translate(const hv::VcpuState& sregs, uint64_t va) {
  if ((sregs.cr0 & kCr0Pg) == 0) return Gpa(va);
  if ((sregs.efer & kEferLma) == 0) {
    return Error("guest paging: only 4-level long-mode page tables are walked");
  }
  uint64_t table = sregs.cr3 & kPteAddress;
  for (int level = 4; level >= 1; --level) {
    const int shift = 12 + 9 * (level - 1);
    const Gpa entry_gpa(table + ((va >> shift) & 0x1ff) * 8);
    uint64_t entry = 0;
    RETURN_IF_ERROR(memory_.Read(entry_gpa, {reinterpret_cast<uint8_t*>(&entry), 8}));
    if ((entry & 1) == 0) return Error("guest paging: {:#x} is not mapped", va);
    if (level == 1 || (level <= 3 && (entry & 0x80) != 0)) {
      const uint64_t size = uint64_t{1} << shift;
      return Gpa(((entry & kPteAddress) & ~(size - 1)) | (va & (size - 1)));
    }
    table = entry & kPteAddress;
  }
  return Error("guest paging: {:#x}: page walk ended without a page", va);
}

Status GuestPager::PrepareVcpu(hv::Vcpu& vcpu) {
  if (holes_.empty()) return Status::Ok();  // userfaultfd serves KVM's reads too
  ASSIGN_OR_RETURN(hv::VcpuState sregs, vcpu.GetState());
  struct {
    uint64_t rip, rsp;
  } regs{sregs.rip, sregs.gpr[hv::kRsp]};
  // Translating reads the page tables through memory_.Read, whose access
  // hook brings in every table page on the way.
  auto present = [&](uint64_t va, uint64_t length) -> Status {
    ASSIGN_OR_RETURN(Gpa gpa, Translate(sregs, va));
    return EnsurePresent(gpa, length);
  };
  RETURN_IF_ERROR(present(regs.rip, 16));
  if (regs.rsp != 0) RETURN_IF_ERROR(present(regs.rsp - 8, 8));
  RETURN_IF_ERROR(present(sregs.gdt.base, sregs.gdt.limit + 1u));
  RETURN_IF_ERROR(present(sregs.idt.base, sregs.idt.limit + 1u));
  if (sregs.tr.base != 0) {
    RETURN_IF_ERROR(present(sregs.tr.base, 104));
    // The kernel stack an exception switches to (TSS.RSP0).
    ASSIGN_OR_RETURN(Gpa tss, Translate(sregs, sregs.tr.base));
    uint64_t rsp0 = 0;
    RETURN_IF_ERROR(memory_.Read(tss + 4, {reinterpret_cast<uint8_t*>(&rsp0), 8}));
    if (rsp0 != 0) RETURN_IF_ERROR(present(rsp0 - 8, 8));
  }
  return Status::Ok();
}

Status GuestPager::Start() { return uffd_ ? uffd_->Start() : Status::Ok(); }

Status GuestPager::PushAll() {
  for (auto& hole : holes_) RETURN_IF_ERROR(hole->PushAll());
  if (!uffd_) return Status::Ok();
  for (const auto& block : blocks_) RETURN_IF_ERROR(uffd_->Push(*block, 0, block->size()));
  for (int i = 0; i < 600'000 && !uffd_->complete(); ++i) {
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  return uffd_->complete() ? uffd_->first_error() : Error("guest paging: push did not complete");
}

Status GuestPager::Finish() {
  if (!complete()) return Error("guest paging: pages are still missing — PushAll() first");
  for (auto& hole : holes_) RETURN_IF_ERROR(hole->Finish(original_granule_));
  if (uffd_) uffd_->Stop();
  return first_error();
}

bool GuestPager::complete() const {
  for (const auto& hole : holes_) {
    if (hole->missing_chunks() != 0) return false;
  }
  return !uffd_ || uffd_->complete();
}

PagingStats GuestPager::stats() const {
  return uffd_ ? uffd_->stats() : hole_ctx_->metrics().Snapshot();
}

std::vector<PoisonedUnit> GuestPager::poisoned() const {
  return uffd_ ? uffd_->poisoned() : hole_ctx_->poisoned();
}

std::vector<GuestMemoryError> GuestPager::memory_errors() const {
  sys::MutexLock lock(mu_);
  return errors_;
}

Status GuestPager::first_error() const {
  return uffd_ ? uffd_->first_error() : hole_ctx_->first_error();
}

}  // namespace faultline::paging
