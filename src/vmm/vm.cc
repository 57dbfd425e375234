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

Status CheckAccelFeatures(const VmConfig& c, hv::Accel accel) {
  if (accel == hv::Accel::kKvm) return Status::Ok();
  if (c.backing == Backing::kGuestMemfd) {
    return Error(
        "--backing gmem needs KVM: guest_memfd is a KVM object, and this VM runs on the software "
        "CPU (tcg) — use --backing memfd or anon, or --accel kvm on a host with /dev/kvm");
  }
  if (c.dirty_mode && *c.dirty_mode != DirtyLogMode::kUffdWp) {
    return Error(
        "--dirty {} is KVM's dirty log, and this VM runs on the software CPU (tcg) — use --dirty "
        "uffd-wp (the default there)",
        DirtyLogModeName(*c.dirty_mode));
  }
  return Status::Ok();
}

Vm::Vm(VmConfig config, std::unique_ptr<hv::Vm> machine)
    : config_(std::move(config)), machine_(std::move(machine)) {}

Vm::~Vm() { Stop(); }

Result<std::unique_ptr<Vm>> Vm::Create(VmConfig config) {
  RETURN_IF_ERROR(ValidateConfig(config));
  // Parse the guest before creating the VM: a bad file is the likeliest error.
  std::optional<GuestImage> image;
  if (config.boot) {
    ASSIGN_OR_RETURN(image, GuestImage::Load(config.guest_path));
    if (image->image_end().value + kHugePageSize >= config.mem_size) {
      return Error("guest image ends at {:#x}: {} MiB of RAM leaves no room for the workload",
                   image->image_end().value, config.mem_size >> 20);
    }
  }
  if (config.accel == hv::AccelChoice::kTcg) {
    RETURN_IF_ERROR(CheckAccelFeatures(config, hv::Accel::kTcg));
  }
  hv::VmOptions options;
  options.accel = config.accel;
  options.vcpus = config.vcpus;
  options.on_fallback = config.on_accel_fallback;
  ASSIGN_OR_RETURN(std::unique_ptr<hv::Vm> machine, hv::CreateVm(options));
  RETURN_IF_ERROR(CheckAccelFeatures(config, machine->accel()));
  std::unique_ptr<Vm> vm(new Vm(std::move(config), std::move(machine)));
  RETURN_IF_ERROR(vm->Init());
  if (image) {
    RETURN_IF_ERROR(image->CopyInto(vm->ram()));
    RETURN_IF_ERROR(vm->Boot(image->entry64().value));
  }
  return vm;
}

Status Vm::Init() {
  GuestMemoryOptions memory_options;
  memory_options.dirty_mode = config_.dirty_mode.value_or(
      machine_->capabilities().kvm_dirty_log ? DirtyLogMode::kBitmap : DirtyLogMode::kUffdWp);
  memory_options.memslot_granule = config_.memslot_granule;
  ASSIGN_OR_RETURN(memory_, GuestMemory::Create(machine_.get(), memory_options));
  RamBlockOptions options;
  options.name = kRamBlockName;
  options.size = config_.mem_size;
  options.backing = config_.backing;
  options.adopt_fd = config_.ram_fd;
  options.vm_fd = machine_->kvm_vm_fd();
  ASSIGN_OR_RETURN(ram_, RamBlock::Create(options));
  RETURN_IF_ERROR(memory_->Place(ram_, Gpa(0)));

  std::vector<std::unique_ptr<hv::Vcpu>> vcpus;
  for (uint32_t i = 0; i < config_.vcpus; ++i) {
    ASSIGN_OR_RETURN(std::unique_ptr<hv::Vcpu> vcpu, machine_->CreateVcpu(i));
    vcpus.push_back(std::move(vcpu));
  }
  vcpus_ = std::make_unique<VcpuSet>(std::move(vcpus));
  memory_->SetPauser(vcpus_.get());

  serial_ = std::make_unique<Serial>(config_.vcpus, config_.serial);
  test_port_ = std::make_unique<TestPort>(
      config_.vcpus, tsc_khz(),
      [this](Gpa gpa, std::span<uint8_t> out) { return ReadGuest(gpa, out); }, config_.on_event);
  return Status::Ok();
}

Status Vm::Boot(uint64_t entry64) {
  std::string cmdline = fmt::format("{} tsc_khz={}", config_.guest_args, tsc_khz());
  RETURN_IF_ERROR(WriteBootStructures(ram(), config_.mem_size, cmdline));
  for (uint32_t i = 0; i < config_.vcpus; ++i) {
    hv::Vcpu& vcpu = vcpus_->vcpu(i);
    ASSIGN_OR_RETURN(hv::VcpuState state, machine_->ResetState(vcpu));
    SetupLongModeEntry(state, entry64, i, config_.vcpus);
    RETURN_IF_ERROR(vcpu.SetState(state));
  }
  return Status::Ok();
}

void Vm::AttachPager(paging::GuestPager* pager) {
  exits_ = pager;
  if (pager == nullptr) {
    memory_->SetAccessHook(nullptr);
    return;
  }
  memory_->SetAccessHook(
      [pager](Gpa gpa, uint64_t length) { return pager->EnsurePresent(gpa, length); });
}

Status Vm::Start() {
  if (exits_ != nullptr) {
    paging::VcpuExitHandler* exits = exits_;
    vcpus_->SetThreadHooks([exits](uint32_t index) { exits->OnVcpuThreadStarted(index); },
                           [exits](hv::Vcpu& vcpu) -> Result<ExitAction> {
                             RETURN_IF_ERROR(exits->OnInterrupted(vcpu));
                             return ExitAction::kContinue;
                           });
  } else {
    vcpus_->SetThreadHooks(nullptr, nullptr);
  }
  return vcpus_->Start(
      [this](hv::Vcpu& vcpu, hv::VcpuExit& exit) { return HandleExit(vcpu, exit); });
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

Result<std::vector<hv::VcpuState>> Vm::SaveVcpus() {
  std::vector<hv::VcpuState> states;
  for (uint32_t i = 0; i < vcpus_->size(); ++i) {
    ASSIGN_OR_RETURN(hv::VcpuState s, vcpus_->vcpu(i).GetState());
    states.push_back(std::move(s));
  }
  return states;
}

Status Vm::LoadVcpus(const std::vector<hv::VcpuState>& states) {
  if (vcpus_->started()) return Error("LoadVcpus: the VM is already running");
  if (states.size() != vcpus_->size()) {
    return Error("LoadVcpus: {} vCPU states for a VM with {} vCPUs", states.size(), vcpus_->size());
  }
  for (uint32_t i = 0; i < states.size(); ++i) {
    RETURN_IF_ERROR(vcpus_->vcpu(i).SetState(states[i]));
  }
  return Status::Ok();
}

Status Vm::PrepareVcpus() {
  for (uint32_t i = 0; i < vcpus_->size(); ++i) {
    RETURN_IF_ERROR(vcpus_->vcpu(i).PrepareForState());
  }
  return Status::Ok();
}

Status Vm::VcpuError(hv::Vcpu& vcpu, std::string what) const {
  return Error("vcpu {}: {}\n{}", vcpu.index(), what, FormatRegisters(vcpu));
}

Result<ExitAction> Vm::HandleExit(hv::Vcpu& vcpu, hv::VcpuExit& exit) {
  using Kind = hv::VcpuExit::Kind;
  switch (exit.kind) {
    case Kind::kIo:
      return HandleIo(vcpu, exit.io);
    case Kind::kShutdown:
      return VcpuError(vcpu, fmt::format("the guest triple-faulted ({})", exit.detail));
    case Kind::kException:
      // The software CPU does not deliver exceptions through the guest's
      // IDT: one that reaches the VMM ends the guest, as a triple fault would.
      return VcpuError(vcpu, fmt::format("the guest took CPU exception {} (vector {}), which the "
                                         "software CPU reports instead of delivering; the guest "
                                         "would have panicked or triple-faulted",
                                         ExceptionName(exit.vector), exit.vector));
    case Kind::kMmio:
      if (exits_ != nullptr) {
        ASSIGN_OR_RETURN(bool handled, exits_->OnMmio(vcpu, exit.mmio));
        if (handled) return ExitAction::kContinue;
      }
      return HandleMmio(vcpu, exit.mmio);
    case Kind::kDirtyRingFull:
      RETURN_IF_ERROR(memory_->DrainDirtyRings());
      return ExitAction::kContinue;
    case Kind::kHalt:
      return VcpuError(vcpu, fmt::format("the guest halted ({})", exit.detail));
    case Kind::kFailed:
      break;
  }
  return VcpuError(vcpu, exit.detail);
}

Result<ExitAction> Vm::HandleIo(hv::Vcpu& vcpu, hv::IoExit& io) {
  const uint32_t index = vcpu.index();
  uint8_t* data = io.data;
  ExitAction action = ExitAction::kContinue;
  for (uint32_t n = 0; n < io.count; ++n, data += io.size) {
    uint32_t value = 0;
    if (io.out) std::memcpy(&value, data, io.size);
    if (Serial::Handles(io.port)) {
      if (io.out) {
        serial_->Out(index, io.port, static_cast<uint8_t>(value));
      } else {
        *data = serial_->In(io.port);
      }
    } else if (io.port == FL_PORT_REPORT && io.out && io.size == 4) {
      RETURN_IF_ERROR(test_port_->Report(index, value));
    } else if (io.port == FL_PORT_COMMAND && !io.out && io.size == 4) {
      uint32_t command = test_port_->Command();
      std::memcpy(data, &command, 4);
    } else if (io.port == FL_PORT_EXIT && io.out) {
      test_port_->Exit(index, static_cast<uint8_t>(value));
      action = ExitAction::kFinish;
    } else {
      return VcpuError(vcpu, fmt::format("unexpected port I/O: {} port {:#x}, {} bytes{}",
                                         io.out ? "OUT to" : "IN from", io.port, io.size,
                                         io.out ? fmt::format(", value {:#x}", value) : ""));
    }
  }
  return action;
}

Result<ExitAction> Vm::HandleMmio(hv::Vcpu& vcpu, hv::MmioExit& mmio) {
  // A hole punched into RAM (an MMIO window) reads as all-ones and ignores
  // writes, like a bus with nothing behind it. Anywhere else there is no RAM
  // and no device: the guest is broken.
  std::shared_ptr<const MemoryMap> map = memory_->map();
  for (const GpaRange& hole : map->holes()) {
    if (!hole.Contains(mmio.gpa)) continue;
    if (!mmio.is_write) std::memset(mmio.data, 0xff, sizeof(mmio.data));
    hole_accesses_.fetch_add(1, std::memory_order_relaxed);
    return ExitAction::kContinue;
  }
  return VcpuError(vcpu,
                   fmt::format("{} of {} bytes at guest-physical {:#x}, where there is no RAM",
                               mmio.is_write ? "write" : "read", mmio.len, mmio.gpa.value));
}

std::string FormatRegisters(const hv::Vcpu& vcpu) {
  Result<hv::VcpuState> state = vcpu.GetState();
  if (!state.has_value()) return "  (registers unavailable)";
  return hv::FormatRegisters(*state);
}

}  // namespace faultline::vmm
