#include "src/hypervisor/tcg_machine.h"

#include <setjmp.h>
#include <time.h>
#include <unicorn/unicorn.h>
#include <x86intrin.h>

#include <array>
#include <atomic>
#include <cstring>
#include <map>
#include <optional>
#include <vector>

#include "src/hypervisor/tcg_state.h"
#include "src/sys/linux_abi.h"
#include "src/sys/mutex.h"

namespace faultline::hv {
namespace {

// An address the guest never executes: uc_emu_start runs until a stop.
constexpr uint64_t kNoUntil = 0xffff'ffff'ffff'f000ull;
constexpr uint64_t kCr4Mce = 1ull << 6;

// The calling thread's escape from a software CPU engine (SIGBUS on a
// poisoned page: the access would fault forever if the handler returned).
thread_local sigjmp_buf* t_escape = nullptr;

struct Region {
  uint64_t gpa = 0, size = 0, hva = 0;
  friend bool operator==(const Region&, const Region&) = default;
};

uint64_t Monotonic() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC_RAW, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

class TcgVmImpl;

class TcgVcpuImpl final : public Vcpu {
 public:
  TcgVcpuImpl(TcgVmImpl& vm, uint32_t index) : vm_(vm), index_(index) {}
  ~TcgVcpuImpl() override {
    if (uc_ != nullptr) uc_close(uc_);
  }

  Status Init();
  uint32_t index() const override { return index_; }
  Result<RunOutcome> Run(const ExitHandler& handler) override;
  // The block hook stops the engine at the next block boundary. A stop
  // from another thread (uc_emu_stop) is not precise in libunicorn 2.0.1:
  // measured here, the engine resumed mid-instruction and re-executed
  // stores, so a kick is a flag the engine polls.
  void RequestExit() override { exit_requested_.store(true, std::memory_order_release); }
  void ClearExitRequest() override { exit_requested_.store(false, std::memory_order_seq_cst); }
  void CompletePendingExit() override {}  // exits complete inside the instruction
  Result<VcpuState> GetState() const override;
  Status SetState(const VcpuState& state) override;
  Status PrepareForState() override { return Sync(); }
  Status InjectMachineCheck(Gpa gpa) override;

 private:
  struct MmioPage {
    TcgVcpuImpl* vcpu;
    uint64_t gpa;
  };

  static uint32_t HookIn(uc_engine* uc, uint32_t port, int size, void* user);
  static void HookOut(uc_engine* uc, uint32_t port, int size, uint32_t value, void* user);
  static bool HookUnmapped(uc_engine* uc, uc_mem_type type, uint64_t address, int size,
                           int64_t value, void* user);
  static void HookIntr(uc_engine* uc, uint32_t intno, void* user);
  static void HookBlock(uc_engine* uc, uint64_t address, uint32_t size, void* user);
  static uint64_t MmioRead(uc_engine* uc, uint64_t offset, unsigned size, void* user);
  static void MmioWrite(uc_engine* uc, uint64_t offset, unsigned size, uint64_t value, void* user);

  // Calls the handler from inside a hook; an error or kFinish stops the
  // engine after the current instruction.
  void Deliver(VcpuExit& exit);
  void Stop() { uc_emu_stop(uc_); }
  // Maps the VM's current memslots into this engine (outside uc_emu_start).
  Status Sync();
  // Maps the slot covering `gpa` if the VM has one now (inside a hook).
  bool MapCovering(uint64_t gpa);
  Status MapRam(const Region& r);
  void UnmapMmioIn(uint64_t gpa, uint64_t size);
  bool Halted() const;
  bool EmulateGuarded(uint64_t rip, uc_err* err);
  // An access through an MMIO page that RAM covers now: done on the host.
  bool AccessRamDirect(uint64_t gpa, unsigned size, bool write, uint64_t* value);

  TcgVmImpl& vm_;
  const uint32_t index_;
  uc_engine* uc_ = nullptr;
  std::atomic<bool> exit_requested_{false};

  // Touched only by the vCPU's thread (and by GetState/SetState while the
  // vCPU is not running).
  uint64_t synced_generation_ = ~0ull;
  std::map<uint64_t, Region> ram_;                      // by GPA: RAM this engine maps
  std::map<uint64_t, std::unique_ptr<MmioPage>> mmio_;  // by GPA: MMIO pages it maps
  const ExitHandler* handler_ = nullptr;                // during Run
  Status error_;
  bool finished_ = false;
  bool resync_ = false;
  int exception_ = -1;
  bool dead_ = false;  // left through a signal: the engine's state is gone
  // Segments as last set or decoded (CS, SS, DS, ES, FS, GS): GetState
  // decodes a descriptor from guest memory only for a selector the guest
  // changed since, so that it never touches a page that may still be
  // missing (post-copy, before the pager runs).
  mutable std::array<Segment, 6> known_segments_{};
};

class TcgVmImpl final : public Vm {
 public:
  explicit TcgVmImpl(uint32_t tsc_khz) : tsc_khz_(tsc_khz) {
    capabilities_.kvm_dirty_log = false;
    capabilities_.guest_memfd = false;
    capabilities_.machine_checks = false;
  }

  Accel accel() const override { return Accel::kTcg; }
  const VmCapabilities& capabilities() const override { return capabilities_; }
  uint32_t tsc_khz() const override { return tsc_khz_; }
  uint32_t max_memslots() const override { return 4096; }
  AccelDirtyLog* accel_dirty_log() override { return nullptr; }
  int kvm_vm_fd() const override { return -1; }

  Status SetMemslot(const MemslotRegion& region) override {
    if (region.guest_memfd >= 0) {
      return Error(
          "memslot {}: guest_memfd memory is a KVM object; the software CPU cannot map it — use "
          "--backing memfd or anon",
          region.id);
    }
    sys::MutexLock lock(mu_);
    if (region.size == 0) {
      slots_.erase(region.id);
    } else {
      slots_[region.id] = Region{region.gpa.value, region.size, region.hva.value};
    }
    generation_.fetch_add(1, std::memory_order_release);
    return Status::Ok();
  }

  Result<std::unique_ptr<Vcpu>> CreateVcpu(uint32_t index) override {
    auto vcpu = std::make_unique<TcgVcpuImpl>(*this, index);
    RETURN_IF_ERROR(vcpu->Init());
    return std::unique_ptr<Vcpu>(std::move(vcpu));
  }

  Result<VcpuState> ResetState(Vcpu& vcpu) override {
    VcpuState s;
    s.index = vcpu.index();
    s.cs.selector = 0xf000;
    s.cs.base = 0xffff0000;
    s.rip = 0xfff0;
    s.cr0 = 0x60000010;
    s.apic_base = 0xfee00000 | (vcpu.index() == 0 ? 0x100 : 0) | 0x800;
    return s;
  }

  uint64_t generation() const { return generation_.load(std::memory_order_acquire); }
  std::vector<Region> Regions(uint64_t* generation) const {
    sys::MutexLock lock(mu_);
    *generation = generation_.load(std::memory_order_relaxed);
    std::vector<Region> out;
    out.reserve(slots_.size());
    for (const auto& [id, r] : slots_) out.push_back(r);
    return out;
  }
  std::optional<Region> Covering(uint64_t gpa) const {
    sys::MutexLock lock(mu_);
    for (const auto& [id, r] : slots_) {
      if (gpa >= r.gpa && gpa - r.gpa < r.size) return r;
    }
    return std::nullopt;
  }

 private:
  const uint32_t tsc_khz_;
  VmCapabilities capabilities_;
  mutable sys::Mutex mu_;
  std::map<uint32_t, Region> slots_ GUARDED_BY(mu_);
  std::atomic<uint64_t> generation_{0};
};

Status TcgVcpuImpl::Init() {
  uc_err err = uc_open(UC_ARCH_X86, UC_MODE_64, &uc_);
  if (err != UC_ERR_OK) {
    uc_ = nullptr;
    return UcError(err, "creating a software CPU engine");
  }
  uc_hook hook;
  if ((err = uc_hook_add(uc_, &hook, UC_HOOK_INSN, reinterpret_cast<void*>(&HookIn), this, 1, 0,
                         UC_X86_INS_IN)) != UC_ERR_OK ||
      (err = uc_hook_add(uc_, &hook, UC_HOOK_INSN, reinterpret_cast<void*>(&HookOut), this, 1, 0,
                         UC_X86_INS_OUT)) != UC_ERR_OK ||
      (err = uc_hook_add(uc_, &hook, UC_HOOK_MEM_UNMAPPED, reinterpret_cast<void*>(&HookUnmapped),
                         this, 1, 0)) != UC_ERR_OK ||
      (err = uc_hook_add(uc_, &hook, UC_HOOK_INTR, reinterpret_cast<void*>(&HookIntr), this, 1,
                         0)) != UC_ERR_OK ||
      (err = uc_hook_add(uc_, &hook, UC_HOOK_BLOCK, reinterpret_cast<void*>(&HookBlock), this, 1,
                         0)) != UC_ERR_OK) {
    return UcError(err, "adding the software CPU's hooks");
  }
  return Status::Ok();
}

void TcgVcpuImpl::Deliver(VcpuExit& exit) {
  if (!error_.ok() || finished_) return;  // the engine is stopping already
  Result<ExitAction> action = (*handler_)(*this, exit);
  if (!action.has_value()) {
    error_ = action.error();
    Stop();
  } else if (*action == ExitAction::kFinish) {
    finished_ = true;
    Stop();
  }
}

uint32_t TcgVcpuImpl::HookIn(uc_engine*, uint32_t port, int size, void* user) {
  auto* self = static_cast<TcgVcpuImpl*>(user);
  uint32_t value = 0;
  VcpuExit exit;
  exit.kind = VcpuExit::Kind::kIo;
  exit.io.port = static_cast<uint16_t>(port);
  exit.io.size = static_cast<uint8_t>(size);
  exit.io.out = false;
  exit.io.data = reinterpret_cast<uint8_t*>(&value);
  self->Deliver(exit);
  return value;
}

void TcgVcpuImpl::HookOut(uc_engine*, uint32_t port, int size, uint32_t value, void* user) {
  auto* self = static_cast<TcgVcpuImpl*>(user);
  VcpuExit exit;
  exit.kind = VcpuExit::Kind::kIo;
  exit.io.port = static_cast<uint16_t>(port);
  exit.io.size = static_cast<uint8_t>(size);
  exit.io.out = true;
  exit.io.data = reinterpret_cast<uint8_t*>(&value);
  self->Deliver(exit);
}

void TcgVcpuImpl::HookIntr(uc_engine*, uint32_t intno, void* user) {
  auto* self = static_cast<TcgVcpuImpl*>(user);
  self->exception_ = static_cast<int>(intno);
  self->Stop();
}

void TcgVcpuImpl::HookBlock(uc_engine*, uint64_t, uint32_t, void* user) {
  auto* self = static_cast<TcgVcpuImpl*>(user);
  // Where the engine stops precisely (before the block): for a kick, and
  // to re-map memory after an MMIO access found RAM.
  if (self->resync_ || self->exit_requested_.load(std::memory_order_acquire)) self->Stop();
}

bool TcgVcpuImpl::MapCovering(uint64_t gpa) {
  std::optional<Region> r = vm_.Covering(gpa);
  if (!r) return false;
  UnmapMmioIn(r->gpa, r->size);
  return MapRam(*r).ok();
}

Status TcgVcpuImpl::MapRam(const Region& r) {
  uc_err err = uc_mem_map_ptr(uc_, r.gpa, r.size, UC_PROT_ALL, reinterpret_cast<void*>(r.hva));
  if (err != UC_ERR_OK) {
    return UcError(err, fmt::format("vcpu {}: mapping guest-physical [{:#x}, {:#x})", index_, r.gpa,
                                    r.gpa + r.size));
  }
  ram_[r.gpa] = r;
  return Status::Ok();
}

void TcgVcpuImpl::UnmapMmioIn(uint64_t gpa, uint64_t size) {
  for (auto it = mmio_.lower_bound(gpa); it != mmio_.end() && it->first < gpa + size;) {
    (void)uc_mem_unmap(uc_, it->first, kPageSize);
    it = mmio_.erase(it);
  }
}

bool TcgVcpuImpl::HookUnmapped(uc_engine*, uc_mem_type type, uint64_t address, int size, int64_t,
                               void* user) {
  auto* self = static_cast<TcgVcpuImpl*>(user);
  if (self->MapCovering(address)) return true;  // a slot added since the last sync
  if (type == UC_MEM_FETCH_UNMAPPED) {
    // Code must come from RAM: let the handler bring it in (the hole
    // installer), as KVM would report a fetch from a missing slot.
    VcpuExit exit;
    exit.kind = VcpuExit::Kind::kMmio;
    exit.mmio.gpa = Gpa(address);
    exit.mmio.len = 1;
    self->Deliver(exit);
    if (self->error_.ok() && self->MapCovering(address)) return true;
    if (self->error_.ok()) {
      self->error_ = Error(
          "vcpu {}: instruction fetch from guest-physical {:#x}, where there is "
          "no RAM",
          self->index_, address);
    }
    return false;
  }
  // Data: an MMIO page whose accesses reach the exit handler.
  const uint64_t page = AlignDown(address, kPageSize);
  auto mmio = std::make_unique<MmioPage>(MmioPage{self, page});
  uc_err err =
      uc_mmio_map(self->uc_, page, kPageSize, &MmioRead, mmio.get(), &MmioWrite, mmio.get());
  if (err != UC_ERR_OK) {
    self->error_ =
        UcError(err, fmt::format("vcpu {}: {} of {} bytes at guest-physical {:#x}", self->index_,
                                 type == UC_MEM_WRITE_UNMAPPED ? "write" : "read", size, address));
    return false;
  }
  self->mmio_[page] = std::move(mmio);
  return true;
}

bool TcgVcpuImpl::AccessRamDirect(uint64_t gpa, unsigned size, bool write, uint64_t* value) {
  std::optional<Region> r = vm_.Covering(gpa);
  if (!r || gpa + size > r->gpa + r->size) return false;
  auto* host = reinterpret_cast<uint8_t*>(r->hva + (gpa - r->gpa));
  if (write) {
    std::memcpy(host, value, size);
  } else {
    *value = 0;
    std::memcpy(value, host, size);
  }
  // Map the RAM in place of the MMIO page before the next block.
  resync_ = true;
  return true;
}

uint64_t TcgVcpuImpl::MmioRead(uc_engine*, uint64_t offset, unsigned size, void* user) {
  auto* page = static_cast<MmioPage*>(user);
  TcgVcpuImpl* self = page->vcpu;
  const uint64_t gpa = page->gpa + offset;
  uint64_t value = 0;
  if (self->AccessRamDirect(gpa, size, false, &value)) return value;
  VcpuExit exit;
  exit.kind = VcpuExit::Kind::kMmio;
  exit.mmio.gpa = Gpa(gpa);
  exit.mmio.len = std::min<unsigned>(size, 8);
  exit.mmio.is_write = false;
  self->Deliver(exit);
  std::memcpy(&value, exit.mmio.data, exit.mmio.len);
  if (self->vm_.Covering(gpa)) self->resync_ = true;  // the handler brought RAM in
  return value;
}

void TcgVcpuImpl::MmioWrite(uc_engine*, uint64_t offset, unsigned size, uint64_t value,
                            void* user) {
  auto* page = static_cast<MmioPage*>(user);
  TcgVcpuImpl* self = page->vcpu;
  const uint64_t gpa = page->gpa + offset;
  if (self->AccessRamDirect(gpa, size, true, &value)) return;
  VcpuExit exit;
  exit.kind = VcpuExit::Kind::kMmio;
  exit.mmio.gpa = Gpa(gpa);
  exit.mmio.len = std::min<unsigned>(size, 8);
  exit.mmio.is_write = true;
  std::memcpy(exit.mmio.data, &value, exit.mmio.len);
  self->Deliver(exit);
  if (self->vm_.Covering(gpa)) self->resync_ = true;
}

Status TcgVcpuImpl::Sync() {
  if (vm_.generation() == synced_generation_ && !resync_) return Status::Ok();
  resync_ = false;
  uint64_t generation = 0;
  std::vector<Region> regions = vm_.Regions(&generation);
  // MMIO pages are made again on demand; RAM that moved or went is unmapped.
  for (auto& [gpa, page] : mmio_) (void)uc_mem_unmap(uc_, gpa, kPageSize);
  mmio_.clear();
  std::map<uint64_t, Region> wanted;
  for (const Region& r : regions) wanted[r.gpa] = r;
  for (auto it = ram_.begin(); it != ram_.end();) {
    auto w = wanted.find(it->first);
    if (w != wanted.end() && w->second == it->second) {
      wanted.erase(w);
      ++it;
      continue;
    }
    uc_err err = uc_mem_unmap(uc_, it->second.gpa, it->second.size);
    if (err != UC_ERR_OK) {
      return UcError(err, fmt::format("vcpu {}: unmapping guest-physical [{:#x}, {:#x})", index_,
                                      it->second.gpa, it->second.gpa + it->second.size));
    }
    it = ram_.erase(it);
  }
  for (const auto& [gpa, r] : wanted) RETURN_IF_ERROR(MapRam(r));
  synced_generation_ = generation;
  return Status::Ok();
}

// Apart from Run(), with no locals a longjmp could clobber: runs the engine
// with the calling thread's escape set. True if a signal left it.
__attribute__((noinline)) bool TcgVcpuImpl::EmulateGuarded(uint64_t rip, uc_err* err) {
  sigjmp_buf escape;
  if (sigsetjmp(escape, 1) != 0) {
    t_escape = nullptr;
    return true;
  }
  t_escape = &escape;
  *err = uc_emu_start(uc_, rip, kNoUntil, 0, 0);
  t_escape = nullptr;
  return false;
}

Result<RunOutcome> TcgVcpuImpl::Run(const ExitHandler& handler) {
  if (dead_) {
    return Error("vcpu {}: the software CPU left the guest on a memory error and cannot resume",
                 index_);
  }
  if (exit_requested_.load(std::memory_order_seq_cst)) return RunOutcome::kInterrupted;
  RETURN_IF_ERROR(Sync());
  uint64_t rip = 0;
  uc_reg_read(uc_, UC_X86_REG_RIP, &rip);
  handler_ = &handler;
  error_ = Status::Ok();
  finished_ = false;
  exception_ = -1;
  uc_err err = UC_ERR_OK;
  if (EmulateGuarded(rip, &err)) {
    // A SIGBUS handler left the engine (LeaveSoftwareCpuAfterSignal).
    handler_ = nullptr;
    dead_ = true;
    return RunOutcome::kInterrupted;
  }
  handler_ = nullptr;
  if (!error_.ok()) return error_;
  if (finished_) return RunOutcome::kFinished;
  if (err == UC_ERR_INSN_INVALID) exception_ = 6;  // #UD
  if (exception_ >= 0) {
    VcpuExit exit;
    exit.vector = static_cast<uint8_t>(exception_);
    exit.kind = VcpuExit::Kind::kException;
    exit.detail = fmt::format("CPU exception {}", exception_);
    // The engine does not deliver exceptions through the IDT; where the
    // guest's IDT has no gate for the vector either, the CPU would have
    // shut down (a triple fault), and that is what is reported.
    uc_x86_mmr idtr{};
    uc_reg_read(uc_, UC_X86_REG_IDTR, &idtr);
    if (idtr.limit < static_cast<uint32_t>(exception_) * 16 + 15) {
      exit.kind = VcpuExit::Kind::kShutdown;
      exit.detail =
          fmt::format("CPU exception {} with no IDT gate for it: a triple fault", exception_);
    }
    ASSIGN_OR_RETURN(ExitAction action, handler(*this, exit));
    return action == ExitAction::kFinish ? RunOutcome::kFinished : RunOutcome::kHandled;
  }
  if (err != UC_ERR_OK) {
    VcpuExit exit;
    exit.kind = VcpuExit::Kind::kFailed;
    exit.detail = fmt::format("the software CPU stopped: {}", uc_strerror(err));
    ASSIGN_OR_RETURN(ExitAction action, handler(*this, exit));
    return action == ExitAction::kFinish ? RunOutcome::kFinished : RunOutcome::kHandled;
  }
  if (exit_requested_.load(std::memory_order_seq_cst)) return RunOutcome::kInterrupted;
  if (resync_ || !Halted()) return RunOutcome::kHandled;  // the engine stopped by itself
  VcpuExit exit;
  exit.kind = VcpuExit::Kind::kHalt;
  exit.detail = "HLT";
  ASSIGN_OR_RETURN(ExitAction action, handler(*this, exit));
  return action == ExitAction::kFinish ? RunOutcome::kFinished : RunOutcome::kHandled;
}

bool TcgVcpuImpl::Halted() const {
  // libunicorn ends a run at HLT without saying so, and also ends runs for
  // its own reasons (a memory map changed inside a hook). HLT is privileged:
  // it is a halt only at CPL0, right after an 0xF4 byte (identity-mapped).
  uint64_t rip = 0, cs = 0;
  uc_reg_read(uc_, UC_X86_REG_RIP, &rip);
  uc_reg_read(uc_, UC_X86_REG_CS, &cs);
  if ((cs & 3) != 0 || rip == 0) return false;
  std::optional<Region> r = vm_.Covering(rip - 1);
  return r && *reinterpret_cast<const uint8_t*>(r->hva + (rip - 1 - r->gpa)) == 0xf4;
}

Result<VcpuState> TcgVcpuImpl::GetState() const {
  return ReadTcgState(uc_, index_, known_segments_, [this](uint64_t gpa, void* out) {
    std::optional<Region> r = vm_.Covering(gpa);
    if (!r || gpa + 16 > r->gpa + r->size) return false;
    std::memcpy(out, reinterpret_cast<const void*>(r->hva + (gpa - r->gpa)), 16);
    return true;
  });
}

Status TcgVcpuImpl::SetState(const VcpuState& s) {
  // Memory first: loading a segment selector reads its descriptor from the
  // GDT in guest memory.
  RETURN_IF_ERROR(Sync());
  return WriteTcgState(uc_, index_, s, known_segments_);
}

Status TcgVcpuImpl::InjectMachineCheck(Gpa gpa) {
  uint64_t cr4 = 0;
  uc_reg_read(uc_, UC_X86_REG_CR4, &cr4);
  return Error(
      "the software CPU cannot deliver a machine check for guest-physical {:#x} (the guest {} "
      "enabled them); run on KVM for #MC injection",
      gpa.value, (cr4 & kCr4Mce) != 0 ? "has" : "has not");
}

uint32_t CalibrateTscKhz() {
  // Two 10 ms samples; the second (warm) one counts.
  uint32_t khz = 0;
  for (int i = 0; i < 2; ++i) {
    const uint64_t t0 = Monotonic();
    const uint64_t c0 = __rdtsc();
    timespec pause{0, 10'000'000};
    nanosleep(&pause, nullptr);
    const uint64_t t1 = Monotonic();
    const uint64_t c1 = __rdtsc();
    khz = static_cast<uint32_t>((c1 - c0) * 1'000'000ull / (t1 - t0));
  }
  return khz;
}

}  // namespace

uint32_t HostTscKhz() {
  static const uint32_t khz = CalibrateTscKhz();
  return khz;
}

bool InSoftwareCpu() { return t_escape != nullptr; }

void LeaveSoftwareCpuAfterSignal() {
  if (sigjmp_buf* escape = t_escape) {
    t_escape = nullptr;
    siglongjmp(*escape, 1);
  }
}

Result<std::unique_ptr<Vm>> CreateTcgVm(const VmOptions&) {
  return std::unique_ptr<Vm>(new TcgVmImpl(HostTscKhz()));
}

}  // namespace faultline::hv
