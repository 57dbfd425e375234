// The reference VMM (vmm::Vm) as a migration source or destination.
#pragma once

#include <memory>

#include "src/migration/migratable.h"
#include "src/vmm/vm.h"

namespace faultline::migration {

// `vm` must outlive the adapter. Dirty tracking goes through vm.memory();
// Pause/Resume are the VM's kick-and-hold.
std::unique_ptr<SourceVm> MakeSourceVm(vmm::Vm& vm);

// `vm` must have been created with boot = false and not started: its memory
// is all zeros and its vCPUs wait for LoadVcpus.
std::unique_ptr<DestinationVm> MakeDestinationVm(vmm::Vm& vm);

}  // namespace faultline::migration
