#include "tools/faultline/incoming_vm.h"

#include <utility>

#include "src/vmm/vm_adapter.h"

namespace faultline::cli {

Backing IncomingVmAdapter::backing() const { return vm_.config().backing; }

std::unique_ptr<migration::DestinationVm> IncomingVmAdapter::MakeDestination() {
  return vmm::MakeDestinationVm(vm_);
}

std::unique_ptr<migration::PostcopyDestinationVm> IncomingVmAdapter::MakePostcopyDestination(
    migration::PostcopyVmOptions options) {
  return vmm::MakePostcopyDestinationVm(vm_, std::move(options));
}

Status IncomingVmAdapter::PrepareVcpus() { return vm_.PrepareVcpus(); }

Status IncomingVmAdapter::Start() { return vm_.Start(); }

migration::BlockInfo ExpectedRam(const vmm::VmConfig& config) {
  migration::BlockInfo ram;
  ram.name = vmm::kRamBlockName;
  ram.size = config.mem_size;
  ram.backing = config.backing;
  ram.page_size = config.backing == Backing::kHugetlb ? kHugePageSize : kPageSize;
  return ram;
}

}  // namespace faultline::cli
