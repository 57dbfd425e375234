// MemslotBackend: what GuestMemory needs from the accelerator below it. The
// hypervisor layer (src/hypervisor/) implements it for KVM and for the
// software CPU; tests implement it with a table.
#pragma once

#include <cstdint>

#include "faultline/status.h"
#include "src/sys/kvm.h"

namespace faultline {

class MemslotBackend {
 public:
  virtual ~MemslotBackend() = default;

  // How many memslot ids the accelerator takes.
  virtual uint32_t max_memslots() const = 0;
  // Creates, moves or (size 0) deletes one memslot. `flags`: KVM's
  // (LOG_DIRTY_PAGES is ignored where there is no KVM dirty log;
  // GUEST_MEMFD is refused where guest_memfd does not exist).
  virtual Status SetMemslot(const sys::UserMemoryRegion& region) = 0;
  // KVM's VM for the dirty log and dirty rings; nullptr on an accelerator
  // without them (then only userfaultfd write-protect tracks writes).
  virtual sys::KvmVm* kvm_dirty_log() = 0;
};

}  // namespace faultline
