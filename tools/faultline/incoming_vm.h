// The reference VMM behind an incoming migration (control::IncomingVm):
// vm_adapter's migration interfaces over a vmm::Vm created with boot =
// false, for `faultline run --incoming` and `faultline demo`.
#pragma once

#include <memory>

#include "src/control/incoming.h"
#include "src/migration/wire.h"
#include "src/vmm/vm.h"

namespace faultline::cli {

class IncomingVmAdapter final : public control::IncomingVm {
 public:
  // `vm` must outlive this object.
  explicit IncomingVmAdapter(vmm::Vm& vm) : vm_(vm) {}

  Backing backing() const override;
  std::unique_ptr<migration::DestinationVm> MakeDestination() override;
  std::unique_ptr<migration::PostcopyDestinationVm> MakePostcopyDestination(
      migration::PostcopyVmOptions options) override;
  Status PrepareVcpus() override;
  Status Start() override;

 private:
  vmm::Vm& vm_;
};

// The RAM block a reference VM of `config` has: what a local update's offer
// is checked against before the VM exists.
migration::BlockInfo ExpectedRam(const vmm::VmConfig& config);

}  // namespace faultline::cli
