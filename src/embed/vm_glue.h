// The embedding API's view of the VMM, shared by embed.cc (migrations) and
// snapshot.cc: its RAM as a GuestMemory whose memslots stay the VMM's and
// whose dirty pages userfaultfd write-protect tracks, and its VmHandle as
// the engines' VmControl.
#pragma once

#include <memory>
#include <span>
#include <vector>

#include <fmt/format.h>

#include "faultline/embed.h"
#include "src/memory/guest_memory.h"
#include "src/memory/memslot_backend.h"
#include "src/migration/memory_vm.h"

namespace faultline::embed {

inline constexpr char kDeviceBlob[] = "vmm";  // the VmHandle's devices, as one blob

// The VMM's RAM: its blocks placed at their addresses.
struct Ram {
  VmmOwnedMemslots memslots;
  std::unique_ptr<GuestMemory> memory;

  Status Init(const std::vector<GuestRegion>& regions) {
    if (regions.empty()) return Error("no guest RAM: describe at least one GuestRegion");
    GuestMemoryOptions options;
    options.dirty_mode = DirtyLogMode::kUffdWp;
    options.memslot_granule = 0;
    ASSIGN_OR_RETURN(memory, GuestMemory::Create(&memslots, options));
    for (const GuestRegion& r : regions) {
      if (r.block == nullptr) return Error("a GuestRegion at {:#x} has no RAM block", r.gpa);
      RETURN_IF_ERROR(
          memory->Place(r.block, Gpa(r.gpa))
              .WithContext(fmt::format("guest RAM block '{}' at {:#x}", r.block->name(), r.gpa)));
    }
    return Status::Ok();
  }
};

// The VmHandle as the engines see a VMM.
class HandleControl final : public migration::VmControl {
 public:
  HandleControl(VmHandle& vm, bool memory_is_zero) : vm_(vm), memory_is_zero_(memory_is_zero) {}

  uint32_t vcpu_count() const override { return vm_.vcpu_count(); }
  void Pause() override { vm_.Pause(); }
  void Resume() override { vm_.Resume(); }
  Result<std::vector<std::vector<uint8_t>>> SaveVcpus() override {
    std::vector<std::vector<uint8_t>> out;
    for (uint32_t i = 0; i < vm_.vcpu_count(); ++i) {
      Result<std::vector<uint8_t>> blob = vm_.SaveVcpu(i);
      if (!blob.has_value()) return blob.error().WithContext(fmt::format("saving vCPU {}", i));
      out.push_back(std::move(*blob));
    }
    return out;
  }
  Status LoadVcpus(std::span<const std::vector<uint8_t>> states) override {
    if (states.size() != vm_.vcpu_count()) {
      return Error("{} vCPU states arrived for a VM of {} vCPUs", states.size(), vm_.vcpu_count());
    }
    for (uint32_t i = 0; i < states.size(); ++i) {
      RETURN_IF_ERROR(vm_.LoadVcpu(i, states[i]).WithContext(fmt::format("loading vCPU {}", i)));
    }
    return Status::Ok();
  }
  Result<std::vector<migration::DeviceBlob>> SaveDevices() override {
    ASSIGN_OR_RETURN(std::vector<uint8_t> blob, vm_.SaveDevices());
    std::vector<migration::DeviceBlob> out;
    if (!blob.empty()) out.push_back({kDeviceBlob, std::move(blob)});
    return out;
  }
  Status LoadDevices(std::span<const migration::DeviceBlob> devices) override {
    for (const migration::DeviceBlob& d : devices) {
      if (d.name != kDeviceBlob) {
        return Error(
            "device state '{}' arrived: not from an embedding VMM (its source is "
            "another kind of VMM)",
            d.name);
      }
      RETURN_IF_ERROR(vm_.LoadDevices(d.state).WithContext("loading device state"));
    }
    return Status::Ok();
  }
  bool memory_is_zero() const override { return memory_is_zero_; }
  // The VMM's vCPUs and its own accesses fault through userfaultfd on its
  // mappings, which the pager serves: nothing to wire.
  void AttachPager(paging::GuestPager*) override {}
  Status PrepareVcpus(paging::GuestPager&) override { return Status::Ok(); }
  Status Start() override { return vm_.Start(); }

 private:
  VmHandle& vm_;
  const bool memory_is_zero_;
};

}  // namespace faultline::embed
