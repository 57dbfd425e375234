#include "src/migration/vm_adapter.h"

namespace faultline::migration {
namespace {

HelloAccel WireAccel(const vmm::Vm& vm) {
  return vm.accel() == hv::Accel::kKvm ? HelloAccel::kKvm : HelloAccel::kTcg;
}

class VmSource final : public SourceVm {
 public:
  explicit VmSource(vmm::Vm& vm) : vm_(vm) {}

  HelloAccel accelerator() const override { return WireAccel(vm_); }
  std::vector<std::shared_ptr<RamBlock>> blocks() override { return vm_.memory().blocks(); }
  Status StartDirtyTracking() override { return vm_.memory().StartDirtyTracking(); }
  Status StopDirtyTracking() override { return vm_.memory().StopDirtyTracking(); }
  Status TakeDirty(const RamBlock& block, DirtyBitmap& out) override {
    RETURN_IF_ERROR(vm_.memory().HarvestDirty());
    return vm_.memory().TakeDirty(block.name(), out);
  }
  void Pause() override { vm_.Pause(); }
  void Resume() override { vm_.Resume(); }
  Result<std::vector<std::vector<uint8_t>>> SaveVcpus() override {
    ASSIGN_OR_RETURN(std::vector<hv::VcpuState> states, vm_.SaveVcpus());
    std::vector<std::vector<uint8_t>> out;
    for (const hv::VcpuState& s : states) out.push_back(s.Serialize());
    return out;
  }
  uint32_t vcpu_count() const override { return vm_.config().vcpus; }
  // The serial console and test port keep no state the guest depends on
  // across a migration (the guest's reports live in its memory); when
  // devices with real state exist, vmm::Vm needs Save/LoadDevices.
  Result<std::vector<DeviceBlob>> SaveDevices() override { return std::vector<DeviceBlob>{}; }

 private:
  vmm::Vm& vm_;
};

class VmDestination final : public DestinationVm {
 public:
  explicit VmDestination(vmm::Vm& vm) : vm_(vm) {}

  HelloAccel accelerator() const override { return WireAccel(vm_); }
  std::vector<std::shared_ptr<RamBlock>> blocks() override { return vm_.memory().blocks(); }
  bool memory_is_zero() const override { return !vm_.config().boot; }
  uint32_t vcpu_count() const override { return vm_.config().vcpus; }
  Status LoadVcpus(std::span<const std::vector<uint8_t>> blobs) override {
    std::vector<hv::VcpuState> states;
    for (size_t i = 0; i < blobs.size(); ++i) {
      Result<hv::VcpuState> s = hv::VcpuState::Deserialize(blobs[i]);
      if (!s) return s.error().WithContext(fmt::format("vCPU {}", i));
      states.push_back(std::move(*s));
    }
    return vm_.LoadVcpus(states);
  }
  Status LoadDevices(std::span<const DeviceBlob> devices) override {
    if (!devices.empty()) {
      return Error("device state for '{}' arrived, but this VMM has no migratable devices",
                   devices[0].name);
    }
    return Status::Ok();
  }

 private:
  vmm::Vm& vm_;
};

}  // namespace

std::unique_ptr<SourceVm> MakeSourceVm(vmm::Vm& vm) { return std::make_unique<VmSource>(vm); }

std::unique_ptr<DestinationVm> MakeDestinationVm(vmm::Vm& vm) {
  return std::make_unique<VmDestination>(vm);
}

}  // namespace faultline::migration
