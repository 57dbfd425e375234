#include "src/vmm/vm.h"

#include <cstring>

#include "guest/abi.h"
#include "src/sys/linux_abi.h"
#include "src/vmm/guest_image.h"
#include "src/vmm/x86_boot.h"

namespace faultline::vmm {

Status ValidateConfig(const VmConfig& c) {
  if (c.mem_size == 0) return Error("memory size is zero — give e.g. --mem 1G");
  if (!IsAligned(c.mem_size, kHugePageSize)) {
    return Error("memory size {} bytes is not a multiple of 2 MiB — round it (e.g. --mem 1G)",
                 c.mem_size);
  }
  if (c.mem_size < kMinMemory || c.mem_size > kMaxMemory) {
    return Error("memory size {} MiB is outside [{} MiB, {} GiB]", c.mem_size >> 20,
                 kMinMemory >> 20, kMaxMemory >> 30);
  }
  if (c.vcpus == 0 || c.vcpus > kMaxVcpus) {
    return Error("{} vCPUs: the VMM runs 1 to {}", c.vcpus, kMaxVcpus);
  }
  return Status::Ok();
}

Vm::Vm(VmConfig config, sys::KvmSystem kvm, sys::KvmVm vm)
    : config_(std::move(config)), kvm_(std::move(kvm)), vm_(std::move(vm)) {}

Vm::~Vm() { Stop(); }

Result<std::unique_ptr<Vm>> Vm::Create(VmConfig config) {
  RETURN_IF_ERROR(ValidateConfig(config));
  // Parse the guest before touching KVM: a bad file is the likeliest error.
  std::optional<GuestImage> image;
  if (config.boot) {
    ASSIGN_OR_RETURN(image, GuestImage::Load(config.guest_path));
    if (image->image_end().value + kHugePageSize >= config.mem_size) {
      return Error("guest image ends at {:#x}: {} MiB of RAM leaves no room for the workload",
                   image->image_end().value, config.mem_size >> 20);
    }
  }
  ASSIGN_OR_RETURN(sys::KvmSystem kvm, sys::KvmSystem::Open());
  ASSIGN_OR_RETURN(sys::KvmVm kvm_vm, kvm.CreateVm());
  std::unique_ptr<Vm> vm(new Vm(std::move(config), std::move(kvm), std::move(kvm_vm)));
  RETURN_IF_ERROR(vm->Init());
  if (image) {
    RETURN_IF_ERROR(image->CopyInto(vm->ram()));
    RETURN_IF_ERROR(vm->Boot());
    // Boot() left the registers at 0; now point them at the entry.
    for (uint32_t i = 0; i < vm->config_.vcpus; ++i) {
      RETURN_IF_ERROR(vm->vcpus_->vcpu(i).SetRegs(
          LongModeEntryRegs(image->entry64().value, i, vm->config_.vcpus)));
    }
  }
  return vm;
}

Status Vm::Init() {
  GuestMemoryOptions memory_options;
  memory_options.dirty_mode = config_.dirty_mode;
  memory_options.memslot_granule = config_.memslot_granule;
  ASSIGN_OR_RETURN(memory_, GuestMemory::Create(&vm_, memory_options));
  RamBlockOptions options;
  options.name = "ram0";
  options.size = config_.mem_size;
  options.backing = config_.backing;
  options.vm_fd = vm_.fd();
  ASSIGN_OR_RETURN(ram_, RamBlock::Create(options));
  RETURN_IF_ERROR(memory_->Place(ram_, Gpa(0)));

  // An in-kernel irqchip gives every vCPU a local APIC whose state is part
  // of the vCPU's. Not fatal where the host has none.
  state_support_.lapic = vm_.CreateIrqchip().ok();
  state_support_.xsave2_size = kvm_.CheckExtension(KVM_CAP_XSAVE2);
  state_support_.xcrs = kvm_.CheckExtension(KVM_CAP_XCRS) > 0;
  ASSIGN_OR_RETURN(state_support_.msr_indices, kvm_.MsrIndexList());
  ASSIGN_OR_RETURN(std::vector<kvm_cpuid_entry2> cpuid, kvm_.SupportedCpuid());

  std::vector<sys::KvmVcpu> vcpus;
  for (uint32_t i = 0; i < config_.vcpus; ++i) {
    ASSIGN_OR_RETURN(sys::KvmVcpu vcpu, vm_.CreateVcpu(i));
    RETURN_IF_ERROR(vcpu.SetCpuid(CpuidForVcpu(cpuid, i)));
    RETURN_IF_ERROR(memory_->AddDirtyRing(vcpu));
    vcpus.push_back(std::move(vcpu));
  }
  ASSIGN_OR_RETURN(tsc_khz_, vcpus[0].GetTscKhz());
  FilterReadableMsrs(vcpus[0], state_support_);
  vcpus_ = std::make_unique<VcpuSet>(std::move(vcpus));
  memory_->SetPauser(vcpus_.get());

  serial_ = std::make_unique<Serial>(config_.vcpus, config_.serial);
  test_port_ = std::make_unique<TestPort>(
      config_.vcpus, tsc_khz_,
      [this](Gpa gpa, std::span<uint8_t> out) { return ReadGuest(gpa, out); }, config_.on_event);
  return Status::Ok();
}

Status Vm::Boot() {
  std::string cmdline = fmt::format("{} tsc_khz={}", config_.guest_args, tsc_khz_);
  RETURN_IF_ERROR(WriteBootStructures(ram(), config_.mem_size, cmdline));
  for (uint32_t i = 0; i < config_.vcpus; ++i) {
    sys::KvmVcpu& vcpu = vcpus_->vcpu(i);
    ASSIGN_OR_RETURN(kvm_sregs sregs, vcpu.GetSregs());
    SetupLongModeSregs(sregs);
    RETURN_IF_ERROR(vcpu.SetSregs(sregs));
    // With an in-kernel APIC, vCPUs other than 0 would wait for INIT/SIPI:
    // every vCPU starts at the entry point instead.
    RETURN_IF_ERROR(vcpu.SetMpState({KVM_MP_STATE_RUNNABLE}));
  }
  return Status::Ok();
}

Status Vm::Start() {
  vcpus_->SetThreadHooks(hooks_.started, hooks_.interrupted);
  return vcpus_->Start(
      [this](uint32_t index, sys::KvmVcpu& vcpu) { return HandleExit(index, vcpu); });
}

Result<GuestReport> Vm::Wait(std::chrono::milliseconds timeout) {
  if (!vcpus_->WaitFinished(timeout)) {
    Stop();
    GuestReport partial = report();
    std::string waiting;
    for (uint32_t i = 0; i < partial.vcpus.size(); ++i) {
      if (!partial.vcpus[i].exit_code) waiting += fmt::format(" {}", i);
    }
    return Error(
        "the guest did not finish within {:.1f} s (vCPUs still running:{}) — give it "
        "more time or a smaller workload",
        timeout.count() / 1000.0, waiting);
  }
  vcpus_->Join();
  serial_->Flush();
  RETURN_IF_ERROR(vcpus_->first_error());
  return report();
}

void Vm::Stop() {
  if (!vcpus_) return;
  vcpus_->Stop();
  vcpus_->Join();
}

Result<std::vector<VcpuState>> Vm::SaveVcpus() {
  std::vector<VcpuState> states;
  for (uint32_t i = 0; i < vcpus_->size(); ++i) {
    ASSIGN_OR_RETURN(VcpuState s, CaptureVcpuState(vcpus_->vcpu(i), state_support_));
    states.push_back(std::move(s));
  }
  return states;
}

Status Vm::LoadVcpus(const std::vector<VcpuState>& states) {
  if (vcpus_->started()) return Error("LoadVcpus: the VM is already running");
  if (states.size() != vcpus_->size()) {
    return Error("LoadVcpus: {} vCPU states for a VM with {} vCPUs", states.size(), vcpus_->size());
  }
  for (uint32_t i = 0; i < states.size(); ++i) {
    RETURN_IF_ERROR(RestoreVcpuState(vcpus_->vcpu(i), states[i]));
  }
  return Status::Ok();
}

Status Vm::VcpuError(sys::KvmVcpu& vcpu, std::string what) const {
  return Error("vcpu {}: {}\n{}", vcpu.id(), what, FormatRegisters(vcpu));
}

Result<ExitAction> Vm::HandleExit(uint32_t index, sys::KvmVcpu& vcpu) {
  kvm_run* run = vcpu.run();
  switch (run->exit_reason) {
    case KVM_EXIT_IO:
      return HandleIo(index, vcpu);
    case KVM_EXIT_SHUTDOWN:
      return VcpuError(vcpu, "the guest triple-faulted (KVM_EXIT_SHUTDOWN)");
    case KVM_EXIT_MMIO:
      if (hooks_.mmio) {
        ASSIGN_OR_RETURN(std::optional<ExitAction> action, hooks_.mmio(index, vcpu));
        if (action) return *action;
      }
      return HandleMmio(vcpu);
    case KVM_EXIT_DIRTY_RING_FULL:
      RETURN_IF_ERROR(memory_->DrainDirtyRings());
      return ExitAction::kContinue;
    case KVM_EXIT_HLT:
      return VcpuError(vcpu, "the guest halted (KVM_EXIT_HLT)");
    case KVM_EXIT_FAIL_ENTRY:
      return VcpuError(vcpu, fmt::format("KVM_EXIT_FAIL_ENTRY, hardware reason {:#x}",
                                         run->fail_entry.hardware_entry_failure_reason));
    case KVM_EXIT_INTERNAL_ERROR:
      return VcpuError(vcpu,
                       fmt::format("KVM_EXIT_INTERNAL_ERROR, suberror {}", run->internal.suberror));
    default:
      return VcpuError(vcpu, fmt::format("unexpected exit {} ({})",
                                         sys::KvmExitName(run->exit_reason), run->exit_reason));
  }
}

Result<ExitAction> Vm::HandleIo(uint32_t index, sys::KvmVcpu& vcpu) {
  kvm_run* run = vcpu.run();
  const auto& io = run->io;
  uint8_t* data = reinterpret_cast<uint8_t*>(run) + io.data_offset;
  const bool out = io.direction == KVM_EXIT_IO_OUT;
  ExitAction action = ExitAction::kContinue;
  for (uint32_t n = 0; n < io.count; ++n, data += io.size) {
    uint32_t value = 0;
    if (out) std::memcpy(&value, data, io.size);
    if (Serial::Handles(io.port)) {
      if (out) {
        serial_->Out(index, io.port, static_cast<uint8_t>(value));
      } else {
        *data = serial_->In(io.port);
      }
    } else if (io.port == FL_PORT_REPORT && out && io.size == 4) {
      RETURN_IF_ERROR(test_port_->Report(index, value));
    } else if (io.port == FL_PORT_COMMAND && !out && io.size == 4) {
      uint32_t command = test_port_->Command();
      std::memcpy(data, &command, 4);
    } else if (io.port == FL_PORT_EXIT && out) {
      test_port_->Exit(index, static_cast<uint8_t>(value));
      action = ExitAction::kFinish;
    } else {
      return VcpuError(vcpu, fmt::format("unexpected port I/O: {} port {:#x}, {} bytes{}",
                                         out ? "OUT to" : "IN from", io.port, io.size,
                                         out ? fmt::format(", value {:#x}", value) : ""));
    }
  }
  return action;
}

Result<ExitAction> Vm::HandleMmio(sys::KvmVcpu& vcpu) {
  kvm_run* run = vcpu.run();
  const Gpa gpa(run->mmio.phys_addr);
  // A hole punched into RAM (an MMIO window) reads as all-ones and ignores
  // writes, like a bus with nothing behind it. Anywhere else there is no RAM
  // and no device: the guest is broken.
  std::shared_ptr<const MemoryMap> map = memory_->map();
  for (const GpaRange& hole : map->holes()) {
    if (!hole.Contains(gpa)) continue;
    if (!run->mmio.is_write) std::memset(run->mmio.data, 0xff, sizeof(run->mmio.data));
    hole_accesses_.fetch_add(1, std::memory_order_relaxed);
    return ExitAction::kContinue;
  }
  return VcpuError(vcpu,
                   fmt::format("{} of {} bytes at guest-physical {:#x}, where there is no "
                               "RAM (KVM_EXIT_MMIO)",
                               run->mmio.is_write ? "write" : "read", run->mmio.len, gpa.value));
}

std::string FormatRegisters(const sys::KvmVcpu& vcpu) {
  Result<kvm_regs> regs = vcpu.GetRegs();
  Result<kvm_sregs> sregs = vcpu.GetSregs();
  if (!regs.has_value() || !sregs.has_value()) return "  (registers unavailable)";
  const kvm_regs& r = *regs;
  const kvm_sregs& s = *sregs;
  return fmt::format(
      "  rip={:#018x} rsp={:#018x} rflags={:#x} cs={:#x} (dpl {}) ss={:#x}\n"
      "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n"
      "  rsi={:#018x} rdi={:#018x} rbp={:#018x} r8={:#018x}\n"
      "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
      r.rip, r.rsp, r.rflags, s.cs.selector, s.cs.dpl, s.ss.selector, r.rax, r.rbx, r.rcx, r.rdx,
      r.rsi, r.rdi, r.rbp, r.r8, s.cr0, s.cr2, s.cr3, s.cr4, s.efer);
}

}  // namespace faultline::vmm
