#include "src/migration/memory_vm.h"

#include <utility>

namespace faultline::migration {
namespace {

class MemorySource final : public SourceVm {
 public:
  MemorySource(GuestMemory& memory, std::unique_ptr<VmControl> vm)
      : memory_(memory), vm_(std::move(vm)) {}

  HelloAccel accelerator() const override { return vm_->accelerator(); }
  std::vector<std::shared_ptr<RamBlock>> blocks() override { return memory_.blocks(); }
  Status StartDirtyTracking() override { return memory_.StartDirtyTracking(); }
  Status StopDirtyTracking() override { return memory_.StopDirtyTracking(); }
  Status TakeDirty(const RamBlock& block, DirtyBitmap& out) override {
    RETURN_IF_ERROR(memory_.HarvestDirty());
    return memory_.TakeDirty(block.name(), out);
  }
  void Pause() override { vm_->Pause(); }
  void Resume() override { vm_->Resume(); }
  Result<std::vector<std::vector<uint8_t>>> SaveVcpus() override { return vm_->SaveVcpus(); }
  uint32_t vcpu_count() const override { return vm_->vcpu_count(); }
  Result<std::vector<DeviceBlob>> SaveDevices() override { return vm_->SaveDevices(); }

 private:
  GuestMemory& memory_;
  const std::unique_ptr<VmControl> vm_;
};

class MemoryDestination final : public DestinationVm {
 public:
  MemoryDestination(GuestMemory& memory, std::unique_ptr<VmControl> vm)
      : memory_(memory), vm_(std::move(vm)) {}

  HelloAccel accelerator() const override { return vm_->accelerator(); }
  std::vector<std::shared_ptr<RamBlock>> blocks() override { return memory_.blocks(); }
  bool memory_is_zero() const override { return vm_->memory_is_zero(); }
  uint32_t vcpu_count() const override { return vm_->vcpu_count(); }
  Status LoadVcpus(std::span<const std::vector<uint8_t>> blobs) override {
    return vm_->LoadVcpus(blobs);
  }
  Status LoadDevices(std::span<const DeviceBlob> devices) override {
    return vm_->LoadDevices(devices);
  }

 private:
  GuestMemory& memory_;
  const std::unique_ptr<VmControl> vm_;
};

}  // namespace

std::unique_ptr<SourceVm> MakeMemorySource(GuestMemory& memory, std::unique_ptr<VmControl> vm) {
  return std::make_unique<MemorySource>(memory, std::move(vm));
}

std::unique_ptr<DestinationVm> MakeMemoryDestination(GuestMemory& memory,
                                                     std::unique_ptr<VmControl> vm) {
  return std::make_unique<MemoryDestination>(memory, std::move(vm));
}

}  // namespace faultline::migration
