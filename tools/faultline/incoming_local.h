// `faultline run --incoming unix:PATH`: the first connection on the socket
// offers the guest (docs/protocol.md section 11). With passed memory (a
// local update of memfd or hugetlb RAM) the new VM maps the source's own
// RAM and takes only the vCPU and device state; with copied memory
// (anonymous RAM) an ordinary migration follows on the same socket, in the
// mode the offer says. Every refusal is said to the source, which keeps
// running the guest, and returned as "incoming local update refused: ...".
#pragma once

#include <chrono>
#include <memory>

#include <nlohmann/json.hpp>

#include "faultline/status.h"
#include "src/control/destination.h"
#include "src/migration/local_update.h"
#include "src/vmm/vm.h"

namespace faultline::cli {

struct LocalIncomingOptions {
  std::chrono::milliseconds accept_timeout{3'600'000};
  bool quiet = false;
  // Test hook (run --test-die-before-confirm): SIGKILL with the state
  // loaded, just before the confirmation.
  bool die_before_confirm = false;
};

// Says where it waits ("waiting for a local update or migration on
// unix:PATH"), accepts the offer and checks it against `config`: with
// passed memory sets config.ram_fd (the descriptor lives as long as the
// returned object, until the VM is created); with copied memory sets
// `postcopy` to the offer's mode (refused if --postcopy asked for it and
// the offer is pre-copy).
Result<std::unique_ptr<migration::LocalUpdateDestination>> AcceptLocalOffer(
    migration::Acceptor& acceptor, const LocalIncomingOptions& options, vmm::VmConfig& config,
    bool& postcopy);

// After vmm::Vm::Create(config): refuses the offer if the VM could not be
// made or runs on another accelerator than the source's.
Status CheckLocalVm(migration::LocalUpdateDestination& local,
                    const Result<std::unique_ptr<vmm::Vm>>& vm);

// Passed memory, once `vm` maps it: accepts, takes the vCPU and device
// state, confirms; `out` gets the report's "incoming". The caller starts
// the guest at once.
Status ReceiveLocal(migration::LocalUpdateDestination& local, vmm::Vm& vm,
                    const LocalIncomingOptions& options, control::IncomingStatus& status,
                    nlohmann::json& out);

// `why` as "incoming local update refused: ... the source keeps running it".
Status LocalRefused(const Status& why);

}  // namespace faultline::cli
