// What the migration engines need from a VMM, as two small interfaces: the
// source reads guest memory through dirty tracking and stops the vCPUs; the
// destination writes guest memory and loads vCPU state. memory_vm.h fits
// them to a VMM whose RAM is a GuestMemory (the reference VMM: vmm/
// vm_adapter.h; an embedder: src/embed/); tests substitute fakes, so the
// engines' pass, switchover and failure logic runs without /dev/kvm.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "faultline/ram_block.h"
#include "faultline/status.h"
#include "src/memory/dirty_bitmap.h"
#include "src/migration/wire.h"

namespace faultline::migration {

// A device's migratable state (serial port, test port, ...).
struct DeviceBlob {
  std::string name;
  std::vector<uint8_t> state;
};

class SourceVm {
 public:
  virtual ~SourceVm() = default;

  // Whose vCPU state SaveVcpus produces (said in the Hello).
  virtual HelloAccel accelerator() const { return HelloAccel::kUnspecified; }

  // The RAM blocks to migrate, in a stable order. Their host() mappings are
  // read while the guest runs; dirty tracking makes that safe.
  virtual std::vector<std::shared_ptr<RamBlock>> blocks() = 0;

  // Dirty tracking in 4 KiB pages of each block. TakeDirty harvests (the
  // hypervisor's log is read and re-armed first) and moves the block's dirty
  // bits into `out`, sized to the block's 4 KiB pages. A page written after
  // TakeDirty returned is dirty in the next TakeDirty.
  virtual Status StartDirtyTracking() = 0;
  virtual Status StopDirtyTracking() = 0;
  virtual Status TakeDirty(const RamBlock& block, DirtyBitmap& out) = 0;

  // No vCPU runs between Pause() and Resume(); guest memory is still.
  virtual void Pause() = 0;
  virtual void Resume() = 0;

  // Requires Pause(). One opaque blob per vCPU, in index order.
  virtual Result<std::vector<std::vector<uint8_t>>> SaveVcpus() = 0;
  virtual uint32_t vcpu_count() const = 0;
  // Requires Pause().
  virtual Result<std::vector<DeviceBlob>> SaveDevices() = 0;
};

class DestinationVm {
 public:
  virtual ~DestinationVm() = default;

  // Whose vCPU state LoadVcpus takes (a Hello of another is refused).
  virtual HelloAccel accelerator() const { return HelloAccel::kUnspecified; }

  // The blocks incoming pages are written to, through host(). The VM must
  // not run until LoadVcpus succeeded.
  virtual std::vector<std::shared_ptr<RamBlock>> blocks() = 0;
  // True if every page of every block reads as zero now (a VM created for
  // an incoming migration): zero pages of the first pass need no write.
  virtual bool memory_is_zero() const = 0;

  // 0: a destination that runs no vCPUs (a page server, which serves the
  // memory to VMMs that bring their own state): it takes any count.
  virtual uint32_t vcpu_count() const = 0;
  // One blob per vCPU from SourceVm::SaveVcpus, in index order.
  virtual Status LoadVcpus(std::span<const std::vector<uint8_t>> states) = 0;
  virtual Status LoadDevices(std::span<const DeviceBlob> devices) = 0;
};

}  // namespace faultline::migration
