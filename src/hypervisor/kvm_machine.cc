#include "src/hypervisor/kvm_machine.h"

#include <cstring>
#include <vector>

#include "src/hypervisor/kvm_dirty_log.h"
#include "src/sys/kvm.h"
#include "src/sys/linux_abi.h"

namespace faultline::hv {
namespace {

// Machine-check architecture values (Intel SDM vol. 3B, ch. 16): 10 banks,
// software error recovery; an uncorrected, action-required data load error
// (SRAR, MCACOD 0x134) with a valid physical address, as QEMU injects it.
constexpr uint64_t kCr4Mce = 1ull << 6;
constexpr uint64_t kMcgCtlP = 1ull << 8;
constexpr uint64_t kMcgSerP = 1ull << 24;
constexpr uint64_t kMcgCap = 10 | kMcgCtlP | kMcgSerP;
constexpr uint8_t kMceBank = 9;
constexpr uint64_t kMciStatusSrar = (1ull << 63) | (1ull << 61) | (1ull << 60) | (1ull << 59) |
                                    (1ull << 58) | (1ull << 56) | (1ull << 55) | 0x134;
constexpr uint64_t kMcgStatusMcipEipv = (1ull << 2) | (1ull << 1);
constexpr uint64_t kMciMiscPhysPage = (2ull << 6) | 12;  // physical address, 4 KiB granule

// What the host lets us save and restore, queried once per VM.
struct StateSupport {
  std::vector<uint32_t> msr_indices;  // filtered to the readable ones
  int xsave2_size = 0;                // KVM_CAP_XSAVE2, 0 if unsupported
  bool xcrs = false;
  bool lapic = false;  // an in-kernel irqchip exists
};

Segment FromKvm(const kvm_segment& k) {
  Segment s;
  s.base = k.base;
  s.limit = k.limit;
  s.selector = k.selector;
  s.type = k.type;
  s.present = k.present;
  s.dpl = k.dpl;
  s.db = k.db;
  s.s = k.s;
  s.l = k.l;
  s.g = k.g;
  s.avl = k.avl;
  s.unusable = k.unusable;
  return s;
}

kvm_segment ToKvm(const Segment& s) {
  kvm_segment k{};
  k.base = s.base;
  k.limit = s.limit;
  k.selector = s.selector;
  k.type = s.type;
  k.present = s.present;
  k.dpl = s.dpl;
  k.db = s.db;
  k.s = s.s;
  k.l = s.l;
  k.g = s.g;
  k.avl = s.avl;
  k.unusable = s.unusable;
  return k;
}

template <typename T>
std::vector<uint8_t> Bytes(const T& value) {
  const auto* p = reinterpret_cast<const uint8_t*>(&value);
  return {p, p + sizeof(T)};
}

template <typename T>
Status FromBytes(const std::vector<uint8_t>& bytes, T* out, const char* what) {
  if (bytes.size() != sizeof(T)) {
    return Error("vCPU state: {} is {} bytes, KVM's is {}", what, bytes.size(), sizeof(T));
  }
  std::memcpy(out, bytes.data(), sizeof(T));
  return Status::Ok();
}

// Supported CPUID adjusted for vCPU `index` (APIC IDs).
std::vector<kvm_cpuid_entry2> CpuidForVcpu(std::span<const kvm_cpuid_entry2> supported,
                                           uint32_t index) {
  std::vector<kvm_cpuid_entry2> out(supported.begin(), supported.end());
  for (kvm_cpuid_entry2& e : out) {
    if (e.function == 1) {
      e.ebx = (e.ebx & 0x00ffffff) | (index << 24);  // initial APIC ID
    } else if (e.function == 0xb || e.function == 0x1f) {
      e.edx = index;  // x2APIC ID
    }
  }
  return out;
}

class KvmVcpuImpl final : public Vcpu {
 public:
  KvmVcpuImpl(uint32_t index, sys::KvmVcpu vcpu, const StateSupport* support)
      : index_(index), vcpu_(std::move(vcpu)), support_(support) {}

  uint32_t index() const override { return index_; }

  Result<RunOutcome> Run(const ExitHandler& handler) override {
    Status s = vcpu_.Run();
    kvm_run* run = vcpu_.run();
    if (!s.ok()) {
      if (s.code() == EINTR) return RunOutcome::kInterrupted;
      if (s.code() == EAGAIN) return RunOutcome::kHandled;
      return s;
    }
    if (run->exit_reason == KVM_EXIT_INTR) return RunOutcome::kInterrupted;
    VcpuExit exit;
    switch (run->exit_reason) {
      case KVM_EXIT_IO:
        exit.kind = VcpuExit::Kind::kIo;
        exit.io.port = run->io.port;
        exit.io.size = run->io.size;
        exit.io.out = run->io.direction == KVM_EXIT_IO_OUT;
        exit.io.count = run->io.count;
        exit.io.data = reinterpret_cast<uint8_t*>(run) + run->io.data_offset;
        break;
      case KVM_EXIT_MMIO:
        exit.kind = VcpuExit::Kind::kMmio;
        exit.mmio.gpa = Gpa(run->mmio.phys_addr);
        exit.mmio.len = std::min<uint32_t>(run->mmio.len, sizeof(run->mmio.data));
        exit.mmio.is_write = run->mmio.is_write != 0;
        std::memcpy(exit.mmio.data, run->mmio.data, sizeof(exit.mmio.data));
        break;
      case KVM_EXIT_SHUTDOWN:
        exit.kind = VcpuExit::Kind::kShutdown;
        exit.detail = "KVM_EXIT_SHUTDOWN";
        break;
      case KVM_EXIT_HLT:
        exit.kind = VcpuExit::Kind::kHalt;
        exit.detail = "KVM_EXIT_HLT";
        break;
      case KVM_EXIT_DIRTY_RING_FULL:
        exit.kind = VcpuExit::Kind::kDirtyRingFull;
        break;
      case KVM_EXIT_FAIL_ENTRY:
        exit.detail = fmt::format("KVM_EXIT_FAIL_ENTRY, hardware reason {:#x}",
                                  run->fail_entry.hardware_entry_failure_reason);
        break;
      case KVM_EXIT_INTERNAL_ERROR:
        exit.detail = fmt::format("KVM_EXIT_INTERNAL_ERROR, suberror {}", run->internal.suberror);
        break;
      default:
        exit.detail = fmt::format("unexpected exit {} ({})", sys::KvmExitName(run->exit_reason),
                                  run->exit_reason);
        break;
    }
    ASSIGN_OR_RETURN(ExitAction action, handler(*this, exit));
    if (exit.kind == VcpuExit::Kind::kMmio && !exit.mmio.is_write) {
      std::memcpy(run->mmio.data, exit.mmio.data, sizeof(run->mmio.data));
    }
    return action == ExitAction::kFinish ? RunOutcome::kFinished : RunOutcome::kHandled;
  }

  void RequestExit() override { SetImmediateExit(1); }
  void ClearExitRequest() override { SetImmediateExit(0); }
  void CompletePendingExit() override {
    // KVM_RUN with immediate_exit set finishes the instruction and returns EINTR.
    SetImmediateExit(1);
    (void)vcpu_.Run();
  }

  Result<VcpuState> GetState() const override {
    VcpuState s;
    s.index = index_;
    // Events first: KVM reports a pending exception there, and reading the
    // rest does not change it.
    ASSIGN_OR_RETURN(kvm_vcpu_events events, vcpu_.GetVcpuEvents());
    s.events = Bytes(events);
    ASSIGN_OR_RETURN(kvm_mp_state mp, vcpu_.GetMpState());
    s.mp_state = Bytes(mp);
    ASSIGN_OR_RETURN(kvm_regs regs, vcpu_.GetRegs());
    const uint64_t gprs[kGprCount] = {regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp,
                                      regs.rsi, regs.rdi, regs.r8,  regs.r9,  regs.r10, regs.r11,
                                      regs.r12, regs.r13, regs.r14, regs.r15};
    std::copy(std::begin(gprs), std::end(gprs), s.gpr.begin());
    s.rip = regs.rip;
    s.rflags = regs.rflags;
    ASSIGN_OR_RETURN(kvm_sregs sregs, vcpu_.GetSregs());
    s.cs = FromKvm(sregs.cs);
    s.ds = FromKvm(sregs.ds);
    s.es = FromKvm(sregs.es);
    s.fs = FromKvm(sregs.fs);
    s.gs = FromKvm(sregs.gs);
    s.ss = FromKvm(sregs.ss);
    s.tr = FromKvm(sregs.tr);
    s.ldt = FromKvm(sregs.ldt);
    s.gdt = {sregs.gdt.base, sregs.gdt.limit};
    s.idt = {sregs.idt.base, sregs.idt.limit};
    s.cr0 = sregs.cr0;
    s.cr2 = sregs.cr2;
    s.cr3 = sregs.cr3;
    s.cr4 = sregs.cr4;
    s.cr8 = sregs.cr8;
    s.efer = sregs.efer;
    s.apic_base = sregs.apic_base;
    ASSIGN_OR_RETURN(kvm_fpu fpu, vcpu_.GetFpu());
    for (int i = 0; i < 8; ++i) std::memcpy(s.fpu.st[i].data(), fpu.fpr[i], 16);
    s.fpu.fcw = fpu.fcw;
    s.fpu.fsw = fpu.fsw;
    s.fpu.ftw = fpu.ftwx;
    s.fpu.last_opcode = fpu.last_opcode;
    s.fpu.last_ip = fpu.last_ip;
    s.fpu.last_dp = fpu.last_dp;
    for (int i = 0; i < 16; ++i) std::memcpy(s.fpu.xmm[i].data(), fpu.xmm[i], 16);
    s.fpu.mxcsr = fpu.mxcsr;
    ASSIGN_OR_RETURN(s.xsave, vcpu_.GetXsave(support_->xsave2_size));
    if (support_->xcrs) {
      ASSIGN_OR_RETURN(kvm_xcrs xcrs, vcpu_.GetXcrs());
      for (uint32_t i = 0; i < xcrs.nr_xcrs && i < KVM_MAX_XCRS; ++i) {
        if (xcrs.xcrs[i].xcr == 0) {
          s.has_xcr0 = true;
          s.xcr0 = xcrs.xcrs[i].value;
        }
      }
    }
    std::vector<sys::MsrEntry> msrs;
    msrs.reserve(support_->msr_indices.size());
    for (uint32_t i : support_->msr_indices) msrs.push_back({i, 0});
    ASSIGN_OR_RETURN(size_t n, vcpu_.GetMsrs(msrs));
    if (n != msrs.size()) {
      return Error("KVM_GET_MSRS vcpu {}: read {} of {} MSRs (stopped at {:#x})", index_, n,
                   msrs.size(), msrs[n].index);
    }
    for (const sys::MsrEntry& m : msrs) s.msrs.push_back({m.index, m.data});
    if (support_->lapic) {
      ASSIGN_OR_RETURN(kvm_lapic_state lapic, vcpu_.GetLapic());
      s.lapic = Bytes(lapic);
    }
    return s;
  }

  Status SetState(const VcpuState& s) override {
    // Order matters: special registers (CR0/CR4/EFER) before XSAVE and the
    // MSRs that depend on them; events and MP state last, since setting
    // registers can clear pending events.
    ASSIGN_OR_RETURN(kvm_sregs sregs, vcpu_.GetSregs());
    sregs.cs = ToKvm(s.cs);
    sregs.ds = ToKvm(s.ds);
    sregs.es = ToKvm(s.es);
    sregs.fs = ToKvm(s.fs);
    sregs.gs = ToKvm(s.gs);
    sregs.ss = ToKvm(s.ss);
    sregs.tr = ToKvm(s.tr);
    sregs.ldt = ToKvm(s.ldt);
    sregs.gdt = {s.gdt.base, s.gdt.limit, {}};
    sregs.idt = {s.idt.base, s.idt.limit, {}};
    sregs.cr0 = s.cr0;
    sregs.cr2 = s.cr2;
    sregs.cr3 = s.cr3;
    sregs.cr4 = s.cr4;
    sregs.cr8 = s.cr8;
    sregs.efer = s.efer;
    if (s.apic_base != 0) sregs.apic_base = s.apic_base;
    std::memset(sregs.interrupt_bitmap, 0, sizeof(sregs.interrupt_bitmap));
    RETURN_IF_ERROR(vcpu_.SetSregs(sregs));
    kvm_regs regs{};
    const auto& g = s.gpr;
    regs.rax = g[kRax], regs.rcx = g[kRcx], regs.rdx = g[kRdx], regs.rbx = g[kRbx];
    regs.rsp = g[kRsp], regs.rbp = g[kRbp], regs.rsi = g[kRsi], regs.rdi = g[kRdi];
    regs.r8 = g[kR8], regs.r9 = g[kR9], regs.r10 = g[kR10], regs.r11 = g[kR11];
    regs.r12 = g[kR12], regs.r13 = g[kR13], regs.r14 = g[kR14], regs.r15 = g[kR15];
    regs.rip = s.rip;
    regs.rflags = s.rflags;
    RETURN_IF_ERROR(vcpu_.SetRegs(regs));
    if (s.has_xcr0) {
      kvm_xcrs xcrs{};
      xcrs.nr_xcrs = 1;
      xcrs.xcrs[0].xcr = 0;
      xcrs.xcrs[0].value = s.xcr0;
      RETURN_IF_ERROR(vcpu_.SetXcrs(xcrs));
    }
    if (!s.xsave.empty()) {
      RETURN_IF_ERROR(vcpu_.SetXsave(s.xsave));
    } else {
      kvm_fpu fpu{};
      for (int i = 0; i < 8; ++i) std::memcpy(fpu.fpr[i], s.fpu.st[i].data(), 16);
      fpu.fcw = s.fpu.fcw;
      fpu.fsw = s.fpu.fsw;
      fpu.ftwx = s.fpu.ftw;
      fpu.last_opcode = s.fpu.last_opcode;
      fpu.last_ip = s.fpu.last_ip;
      fpu.last_dp = s.fpu.last_dp;
      for (int i = 0; i < 16; ++i) std::memcpy(fpu.xmm[i], s.fpu.xmm[i].data(), 16);
      fpu.mxcsr = s.fpu.mxcsr;
      RETURN_IF_ERROR(vcpu_.SetFpu(fpu));
    }
    std::vector<sys::MsrEntry> msrs;
    for (const Msr& m : s.msrs) msrs.push_back({m.index, m.value});
    ASSIGN_OR_RETURN(size_t n, vcpu_.SetMsrs(msrs));
    if (n != msrs.size()) {
      return Error("KVM_SET_MSRS vcpu {}: wrote {} of {} MSRs (stopped at {:#x})", index_, n,
                   msrs.size(), msrs[n].index);
    }
    if (!s.lapic.empty()) {
      kvm_lapic_state lapic;
      RETURN_IF_ERROR(FromBytes(s.lapic, &lapic, "lapic"));
      RETURN_IF_ERROR(vcpu_.SetLapic(lapic));
    }
    if (!s.events.empty()) {
      kvm_vcpu_events events;
      RETURN_IF_ERROR(FromBytes(s.events, &events, "events"));
      RETURN_IF_ERROR(vcpu_.SetVcpuEvents(events));
    }
    kvm_mp_state mp{KVM_MP_STATE_RUNNABLE};
    if (!s.mp_state.empty()) RETURN_IF_ERROR(FromBytes(s.mp_state, &mp, "mp_state"));
    return vcpu_.SetMpState(mp);
  }

  Status InjectMachineCheck(Gpa gpa) override {
    ASSIGN_OR_RETURN(kvm_sregs sregs, vcpu_.GetSregs());
    if ((sregs.cr4 & kCr4Mce) == 0) {
      return Error("the guest has not enabled machine checks (CR4.MCE), so none can be injected");
    }
    if (!mce_ready_) {
      RETURN_IF_ERROR(vcpu_.X86SetupMce(kMcgCap));
      mce_ready_ = true;
    }
    kvm_x86_mce mce = {};
    mce.bank = kMceBank;
    mce.status = kMciStatusSrar;
    mce.addr = AlignDown(gpa.value, kPageSize);
    mce.misc = kMciMiscPhysPage;
    mce.mcg_status = kMcgStatusMcipEipv;
    return vcpu_.X86SetMce(mce);
  }

 private:
  void SetImmediateExit(uint8_t value) {
    __atomic_store_n(&vcpu_.run()->immediate_exit, value, __ATOMIC_SEQ_CST);
  }

  const uint32_t index_;
  sys::KvmVcpu vcpu_;
  const StateSupport* support_;
  bool mce_ready_ = false;  // KVM_X86_SETUP_MCE done (on the vCPU's thread)
};

class KvmVmImpl final : public Vm {
 public:
  KvmVmImpl(sys::KvmSystem kvm, sys::KvmVm vm)
      : kvm_(std::move(kvm)), vm_(std::move(vm)), dirty_log_(vm_) {}

  Status Init() {
    // By default KVM drops every shadow page of the VM when any memslot is
    // deleted, and the running vCPUs then rebuild them: on PVM hosts (shadow
    // paging) that made one hole punch pause the VM for milliseconds. With
    // the quirk off, only the deleted slot's mappings go.
    if (vm_.CheckExtension(KVM_CAP_DISABLE_QUIRKS2) & KVM_X86_QUIRK_SLOT_ZAP_ALL) {
      RETURN_IF_ERROR(vm_.EnableCap(KVM_CAP_DISABLE_QUIRKS2, KVM_X86_QUIRK_SLOT_ZAP_ALL));
    }
    // An in-kernel irqchip gives every vCPU a local APIC whose state is part
    // of the vCPU's. Not fatal where the host has none.
    support_.lapic = vm_.CreateIrqchip().ok();
    support_.xsave2_size = kvm_.CheckExtension(KVM_CAP_XSAVE2);
    support_.xcrs = kvm_.CheckExtension(KVM_CAP_XCRS) > 0;
    ASSIGN_OR_RETURN(support_.msr_indices, kvm_.MsrIndexList());
    ASSIGN_OR_RETURN(cpuid_, kvm_.SupportedCpuid());
    const int max_slots = vm_.CheckExtension(KVM_CAP_NR_MEMSLOTS);
    max_memslots_ = max_slots > 0 ? static_cast<uint32_t>(max_slots) : 32;
    capabilities_.kvm_dirty_log = true;
    capabilities_.guest_memfd = true;
    capabilities_.machine_checks = true;
    return Status::Ok();
  }

  Accel accel() const override { return Accel::kKvm; }
  const VmCapabilities& capabilities() const override { return capabilities_; }
  uint32_t tsc_khz() const override { return tsc_khz_; }
  uint32_t max_memslots() const override { return max_memslots_; }
  Status SetMemslot(const MemslotRegion& region) override {
    sys::UserMemoryRegion kvm;
    kvm.slot = region.id;
    kvm.gpa = region.gpa;
    kvm.size = region.size;
    kvm.hva = region.hva;
    if (region.log_dirty) kvm.flags |= KVM_MEM_LOG_DIRTY_PAGES;
    if (region.guest_memfd >= 0) {
      kvm.flags |= KVM_MEM_GUEST_MEMFD;
      kvm.guest_memfd = region.guest_memfd;
      kvm.guest_memfd_offset = region.guest_memfd_offset;
    }
    return vm_.SetUserMemoryRegion(kvm);
  }
  AccelDirtyLog* accel_dirty_log() override { return &dirty_log_; }
  int kvm_vm_fd() const override { return vm_.fd(); }

  Result<std::unique_ptr<Vcpu>> CreateVcpu(uint32_t index) override {
    ASSIGN_OR_RETURN(sys::KvmVcpu vcpu, vm_.CreateVcpu(index));
    RETURN_IF_ERROR(vcpu.SetCpuid(CpuidForVcpu(cpuid_, index)));
    RETURN_IF_ERROR(dirty_log_.AddVcpu(vcpu));
    if (index == 0) {
      ASSIGN_OR_RETURN(tsc_khz_, vcpu.GetTscKhz());
      FilterReadableMsrs(vcpu);
    }
    return std::unique_ptr<Vcpu>(new KvmVcpuImpl(index, std::move(vcpu), &support_));
  }

  Result<VcpuState> ResetState(Vcpu& vcpu) override {
    ASSIGN_OR_RETURN(VcpuState s, vcpu.GetState());
    // With an in-kernel APIC, vCPUs other than 0 would wait for INIT/SIPI:
    // every vCPU starts at the entry point instead.
    s.mp_state = Bytes(kvm_mp_state{KVM_MP_STATE_RUNNABLE});
    return s;
  }

 private:
  void FilterReadableMsrs(const sys::KvmVcpu& vcpu) {
    std::vector<uint32_t> readable;
    for (uint32_t i : support_.msr_indices) {
      sys::MsrEntry entry{i, 0};
      Result<size_t> n = vcpu.GetMsrs({&entry, 1});
      if (n.has_value() && *n == 1) readable.push_back(i);
    }
    support_.msr_indices = std::move(readable);
  }

  sys::KvmSystem kvm_;
  sys::KvmVm vm_;
  KvmDirtyLog dirty_log_;
  StateSupport support_;
  std::vector<kvm_cpuid_entry2> cpuid_;
  VmCapabilities capabilities_;
  uint32_t max_memslots_ = 32;
  uint32_t tsc_khz_ = 0;
};

}  // namespace

Result<std::unique_ptr<Vm>> CreateKvmVm(const VmOptions&) {
  ASSIGN_OR_RETURN(sys::KvmSystem kvm, sys::KvmSystem::Open());
  ASSIGN_OR_RETURN(sys::KvmVm vm, kvm.CreateVm());
  auto machine = std::make_unique<KvmVmImpl>(std::move(kvm), std::move(vm));
  RETURN_IF_ERROR(machine->Init());
  return std::unique_ptr<Vm>(std::move(machine));
}

}  // namespace faultline::hv
