#include "tools/faultline/incoming_local.h"

#include <signal.h>

#include <cstdio>

#include <fmt/format.h>

#include "src/vmm/vm_adapter.h"

namespace faultline::cli {
namespace {

using Clock = std::chrono::steady_clock;

// The block the reference VMM will have, from its configuration.
migration::BlockInfo ExpectedRam(const vmm::VmConfig& config) {
  migration::BlockInfo ram;
  ram.name = vmm::kRamBlockName;
  ram.size = config.mem_size;
  ram.backing = config.backing;
  ram.page_size = config.backing == Backing::kHugetlb ? kHugePageSize : kPageSize;
  return ram;
}

// The test hook: killed with the whole state loaded, before confirming.
class DieBeforeConfirm final : public migration::DestinationVm {
 public:
  explicit DieBeforeConfirm(std::unique_ptr<migration::DestinationVm> inner)
      : inner_(std::move(inner)) {}
  std::vector<std::shared_ptr<RamBlock>> blocks() override { return inner_->blocks(); }
  bool memory_is_zero() const override { return inner_->memory_is_zero(); }
  uint32_t vcpu_count() const override { return inner_->vcpu_count(); }
  Status LoadVcpus(std::span<const std::vector<uint8_t>> states) override {
    return inner_->LoadVcpus(states);
  }
  Status LoadDevices(std::span<const migration::DeviceBlob> devices) override {
    RETURN_IF_ERROR(inner_->LoadDevices(devices));
    fmt::print(stderr, "faultline run: test hook: killed before confirming the local update\n");
    std::fflush(stderr);
    raise(SIGKILL);
    return Error("unreachable: SIGKILL returned");
  }

 private:
  std::unique_ptr<migration::DestinationVm> inner_;
};

}  // namespace

Status LocalRefused(const Status& why) {
  return Error(
      "incoming local update refused: {}. The guest was not started here; the source keeps "
      "running it",
      why.ToString());
}

Result<std::unique_ptr<migration::LocalUpdateDestination>> AcceptLocalOffer(
    migration::Acceptor& acceptor, const LocalIncomingOptions& options, vmm::VmConfig& config,
    bool& postcopy) {
  fmt::print(stderr, "faultline run: waiting for a local update or migration on {}\n",
             acceptor.address());
  std::fflush(stderr);
  Result<std::unique_ptr<migration::LocalUpdateDestination>> accepted =
      migration::LocalUpdateDestination::Accept(acceptor, options.accept_timeout);
  if (!accepted.has_value()) return accepted.error().WithContext("--incoming");
  migration::LocalUpdateDestination& local = **accepted;
  const migration::LocalOffer& offer = local.offer();
  const migration::BlockInfo expected[] = {ExpectedRam(config)};
  Status checked = migration::CheckLocalOffer(offer, local.fds().size(), expected, config.vcpus,
                                              migration::HelloAccel::kUnspecified);
  if (checked.ok() && offer.memory == migration::LocalMemory::kCopy && postcopy &&
      offer.mode != migration::SwitchoverMode::kPostcopy) {
    checked = Error(
        "this destination was started with --postcopy, and the source offers a pre-copy "
        "migration");
  }
  if (!checked.ok()) {
    return LocalRefused(local.Refuse(checked, migration::ErrorCode::kBlockMismatch));
  }
  if (offer.memory == migration::LocalMemory::kFds) {
    config.ram_fd = local.fds()[0].get();
  } else {
    postcopy = offer.mode == migration::SwitchoverMode::kPostcopy;
  }
  return accepted;
}

Status CheckLocalVm(migration::LocalUpdateDestination& local,
                    const Result<std::unique_ptr<vmm::Vm>>& vm) {
  local.fds().clear();  // the VM, if made, holds its own duplicate
  if (!vm.has_value()) {
    return LocalRefused(local.Refuse(vm.error(), migration::ErrorCode::kResource));
  }
  const migration::HelloAccel accel =
      (*vm)->accel() == hv::Accel::kKvm ? migration::HelloAccel::kKvm : migration::HelloAccel::kTcg;
  Status checked = migration::CheckLocalAccel(local.offer(), accel);
  if (!checked.ok()) return LocalRefused(local.Refuse(checked, migration::ErrorCode::kFeatures));
  return Status::Ok();
}

Status ReceiveLocal(migration::LocalUpdateDestination& local, vmm::Vm& vm,
                    const LocalIncomingOptions& options, control::IncomingStatus& status,
                    nlohmann::json& out) {
  const auto begin = Clock::now();
  status.SetPhase(control::MigrationPhase::kSwitchover);
  // While the guest still runs at the source: the state then loads at once.
  if (Status prepared = vm.PrepareVcpus(); !prepared.ok()) {
    return LocalRefused(local.Refuse(prepared, migration::ErrorCode::kInternal));
  }
  if (Status ready = local.Ready(); !ready.ok()) return LocalRefused(ready);
  std::unique_ptr<migration::DestinationVm> target = vmm::MakeDestinationVm(vm);
  if (options.die_before_confirm) {
    target = std::make_unique<DieBeforeConfirm>(std::move(target));
  }
  Status received = local.ReceiveState(*target);
  status.Finish(
      received.ok() ? control::MigrationPhase::kCompleted : control::MigrationPhase::kFailed,
      received.ok() ? "" : received.ToString());
  if (!received.ok()) return LocalRefused(received);
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - begin).count();
  out = {{"mode", "local"},
         {"memory", "fds"},
         {"fds", local.offer().blocks.size()},
         {"pages_copied", 0},
         {"bytes_received", local.bytes_received()},
         {"ms", ms}};
  if (!options.quiet) {
    fmt::print(stderr,
               "faultline run: local update from {}: the guest's {} MiB of RAM taken over from "
               "the source process ({} descriptor(s), nothing copied), {} bytes of state; "
               "running it\n",
               local.peer(), vm.config().mem_size >> 20, local.offer().blocks.size(),
               local.bytes_received());
  }
  return Status::Ok();
}

}  // namespace faultline::cli
