// The reference VMM (vmm::Vm) as a migration source or destination.
#pragma once

#include <memory>

#include "src/migration/migratable.h"
#include "src/migration/postcopy_vm.h"
#include "src/vmm/vm.h"

namespace faultline::vmm {

// `vm` must outlive the adapter. Dirty tracking goes through vm.memory();
// Pause/Resume are the VM's kick-and-hold.
std::unique_ptr<migration::SourceVm> MakeSourceVm(Vm& vm);

// `vm` must have been created with boot = false and not started: its memory
// is all zeros and its vCPUs wait for LoadVcpus.
std::unique_ptr<migration::DestinationVm> MakeDestinationVm(Vm& vm);

// A post-copy destination: `vm` as above; the adapter must outlive the VM's
// run (it owns the pager the VM's hooks call). The installer defaults to
// paging::BestInstaller for the VM's backing.
std::unique_ptr<migration::PostcopyDestinationVm> MakePostcopyDestinationVm(
    Vm& vm, migration::PostcopyVmOptions options = {});

}  // namespace faultline::vmm
