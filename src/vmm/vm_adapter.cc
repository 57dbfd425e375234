#include "src/vmm/vm_adapter.h"

#include "src/migration/memory_vm.h"

namespace faultline::vmm {
namespace {

using migration::DeviceBlob;
using migration::HelloAccel;

// The reference VMM's vCPUs and devices, for the memory adapters.
class VmControl final : public migration::VmControl {
 public:
  explicit VmControl(Vm& vm) : vm_(vm) {}

  HelloAccel accelerator() const override {
    return vm_.accel() == hv::Accel::kKvm ? HelloAccel::kKvm : HelloAccel::kTcg;
  }
  uint32_t vcpu_count() const override { return vm_.config().vcpus; }
  void Pause() override { vm_.Pause(); }
  void Resume() override { vm_.Resume(); }
  Result<std::vector<std::vector<uint8_t>>> SaveVcpus() override {
    ASSIGN_OR_RETURN(std::vector<hv::VcpuState> states, vm_.SaveVcpus());
    std::vector<std::vector<uint8_t>> out;
    for (const hv::VcpuState& s : states) out.push_back(s.Serialize());
    return out;
  }
  Status LoadVcpus(std::span<const std::vector<uint8_t>> blobs) override {
    std::vector<hv::VcpuState> states;
    for (size_t i = 0; i < blobs.size(); ++i) {
      Result<hv::VcpuState> s = hv::VcpuState::Deserialize(blobs[i]);
      if (!s) return s.error().WithContext(fmt::format("vCPU {}", i));
      states.push_back(std::move(*s));
    }
    return vm_.LoadVcpus(states);
  }
  // The serial console and test port keep no state the guest depends on
  // across a migration (the guest's reports live in its memory); when
  // devices with real state exist, vmm::Vm needs Save/LoadDevices.
  Result<std::vector<DeviceBlob>> SaveDevices() override { return std::vector<DeviceBlob>{}; }
  Status LoadDevices(std::span<const DeviceBlob> devices) override {
    if (!devices.empty()) {
      return Error("device state for '{}' arrived, but this VMM has no migratable devices",
                   devices[0].name);
    }
    return Status::Ok();
  }
  bool memory_is_zero() const override { return !vm_.config().boot; }
  void AttachPager(paging::GuestPager* pager) override { vm_.AttachPager(pager); }
  Status PrepareVcpus(paging::GuestPager& pager) override {
    for (uint32_t i = 0; i < vm_.config().vcpus; ++i) {
      RETURN_IF_ERROR(pager.PrepareVcpu(vm_.vcpus().vcpu(i)));
    }
    return Status::Ok();
  }
  Status Start() override { return vm_.Start(); }

 private:
  Vm& vm_;
};

}  // namespace

std::unique_ptr<migration::SourceVm> MakeSourceVm(Vm& vm) {
  return migration::MakeMemorySource(vm.memory(), std::make_unique<VmControl>(vm));
}

std::unique_ptr<migration::DestinationVm> MakeDestinationVm(Vm& vm) {
  return migration::MakeMemoryDestination(vm.memory(), std::make_unique<VmControl>(vm));
}

std::unique_ptr<migration::PostcopyDestinationVm> MakePostcopyDestinationVm(
    Vm& vm, migration::PostcopyVmOptions options) {
  return migration::MakeMemoryPostcopyDestination(vm.memory(), std::make_unique<VmControl>(vm),
                                                  std::move(options));
}

}  // namespace faultline::vmm
