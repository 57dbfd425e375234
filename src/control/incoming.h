// IncomingControl: the destination's control of an incoming migration, for
// any VMM: `faultline run --incoming` and `faultline demo` both receive
// their guest through it. It accepts the connections, runs the engine the
// mode asks for (migration::MigrationDestination for pre-copy,
// migration::PostcopyDestination for post-copy, with the source's resumed
// sessions after a broken link; or a local update's state, when a process
// on this host passes its RAM), keeps the IncomingStatus that query-migrate
// reports, starts the guest and returns the final figures.
//
// Its steps, in order (a tcp: destination skips the offer):
//
//   IncomingControl incoming(acceptor, options);
//   incoming.AcceptLocalOffer(blocks, vcpus);  // unix: the first connection
//   ... the VMM creates its VM (with passed_fds() as its RAM, if any) ...
//   incoming.Prepare(vm);                      // the engine, over `vm`
//   incoming.Run();                            // receive, start the guest
//
// Refuse() says no to an offer's source when the VMM fails in between;
// Cancel() may come from any thread.
//
// The VMM stays behind IncomingVm: this module knows migration's VM
// interfaces (migratable.h, postcopy_vm.h), not the VMM's types.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "faultline/ram_block.h"
#include "faultline/status.h"
#include "src/control/destination.h"
#include "src/control/types.h"
#include "src/migration/destination.h"
#include "src/migration/local_update.h"
#include "src/migration/postcopy_destination.h"
#include "src/migration/postcopy_vm.h"
#include "src/migration/transport.h"
#include "src/sys/sched.h"
#include "src/sys/unique_fd.h"

namespace faultline::control {

// What the destination needs from the VMM: the migration adapters over its
// VM (created with its memory zero and its vCPUs waiting for their state)
// and the two things only the VMM can do. The reference VMM's is
// tools/faultline/incoming_vm.h.
class IncomingVm {
 public:
  virtual ~IncomingVm() = default;

  // The RAM's backing: what --installer auto measures for post-copy.
  virtual Backing backing() const = 0;
  // Pre-copy and a local update receive into this one.
  virtual std::unique_ptr<migration::DestinationVm> MakeDestination() = 0;
  // Post-copy: it owns the pager the VM's vCPUs call, so it must outlive
  // the guest's run here (IncomingControl keeps it).
  virtual std::unique_ptr<migration::PostcopyDestinationVm> MakePostcopyDestination(
      migration::PostcopyVmOptions options) = 0;
  // A local update, while the guest still runs at the source: what makes
  // the state load at once in the pause (the software CPU maps guest
  // memory into its engines).
  virtual Status PrepareVcpus() = 0;
  // Runs the received guest (pre-copy, local update); post-copy's engine
  // starts it itself, through the PostcopyDestinationVm, at the switchover.
  virtual Status Start() = 0;
};

struct IncomingOptions {
  // A unix: destination takes the mode from the source's offer, refusing a
  // pre-copy offer when this says post-copy.
  MigrationMode mode = MigrationMode::kPrecopy;
  uint64_t bytes_total = 0;  // the guest's RAM, for query-migrate
  // How long to wait for each connection, the first one included.
  std::chrono::milliseconds accept_timeout = migration::AcceptOptions{}.timeout;
  // Post-copy: the SCHED_FIFO priority of the fault path and the switchover
  // (DestinationOptions, PostcopyVmOptions; 0: the default scheduler).
  int realtime_priority = sys::kDefaultRealtimePriority;
  // Post-copy, the --installer text: a name, or "auto"/empty for the
  // fastest of the backing's candidates, measured in Prepare (~50 ms).
  std::string installer;
  bool prealloc = false;  // --prealloc: allocate all RAM before receiving
  // Said as it happens, one line each without a prefix: where this waits,
  // a broken post-copy link waiting for the source's resume, and (unless
  // `quiet`) how the guest arrived. Null: nothing is said. Unless `quiet`,
  // --installer auto's trials also go to stderr.
  std::function<void(const std::string&)> say;
  bool quiet = false;
  // Test hook: a local update's process dies (SIGKILL) with the state
  // loaded, just before it confirms.
  bool test_die_before_confirm = false;
};

// The guest arrived and runs here.
struct IncomingResult {
  std::chrono::steady_clock::time_point started_at;             // its vCPUs ran here from then
  std::optional<migration::DestinationStats> precopy;           // a pre-copy migration's
  std::optional<migration::PostcopyDestinationStats> postcopy;  // a post-copy migration's
  std::string installer;                                        // post-copy's
  nlohmann::json installer_calibration;  // post-copy with --installer auto: the trials
  // For `faultline run --incoming --json` ("incoming"): the mode's figures,
  // with PostcopyFiguresJson's keys in post-copy.
  nlohmann::json figures;
};

class IncomingControl {
 public:
  // `acceptor` (the listener, whose address is said and named in errors)
  // must outlive this object.
  IncomingControl(migration::Acceptor& acceptor, IncomingOptions options);
  ~IncomingControl();

  // unix: the first connection offers the guest (docs/protocol.md section
  // 11), checked against the VM the caller will create: its `blocks` and
  // `vcpus`. Passed memory: passed_fds() holds the RAM until Prepare.
  // Copied memory: mode() becomes the offer's. Refusals are said to the
  // source, which keeps running the guest.
  Status AcceptLocalOffer(std::span<const migration::BlockInfo> blocks, uint32_t vcpus);
  // The RAM an accepted offer passed, one descriptor per block; else empty.
  std::span<const sys::UniqueFd> passed_fds() const;
  // Before Prepare: tells an offer's source `why` not (the VM could not be
  // made, ...) and returns the error to report; without an offer, `why`.
  Status Refuse(const Status& why, migration::ErrorCode code);

  MigrationMode mode() const { return mode_; }
  // For query-migrate and query-status, from AcceptLocalOffer on (or from
  // the start on tcp:): it lives as long as its holders.
  const std::shared_ptr<IncomingStatus>& status() const { return status_; }

  // Takes the VM the guest goes to (it must outlive this object). Post-copy
  // first chooses the installer and refuses one that cannot page from the
  // network. A local update's offer is checked against the VM's
  // accelerator; with copied memory the source is then told to go on.
  // Unless the RAM was passed: preallocates it (--prealloc) and creates the
  // engine.
  Status Prepare(IncomingVm& vm);
  // Receives the guest and runs it; post-copy waits for the source to
  // resume after a broken link, until the migration ends. An error says
  // whether the guest started here and who runs it (after Cancel: the
  // engine's error alone).
  Result<IncomingResult> Run();
  // Any thread, after Prepare: ends the migration (pre-copy, and post-copy
  // before the switchover: it fails; after it: the link breaks and no
  // resume is waited for). A local update is not cancelled.
  void Cancel();

 private:
  // Post-copy: the installer, the VM with its pager, and whether it can
  // page from the network.
  Status MakePostcopyTarget();
  // A local update's checks of the VM made for it, and for copied memory
  // the answer that the migration may come.
  Status AcceptLocalVm(migration::DestinationVm& target);
  Status Prealloc(migration::DestinationVm& target);
  Result<IncomingResult> ReceiveLocal();
  Result<IncomingResult> RunPrecopy();
  Result<IncomingResult> RunPostcopy();
  // The post-copy engine's Run, then its Resume after each broken link.
  Result<migration::PostcopyDestinationStats> FollowPostcopy();
  // Starts the guest (pre-copy, local update) and notes when.
  Status StartGuest(IncomingResult& result);
  // An engine's refusal as the operator reads it: the guest did not start.
  Status Refused(const Status& why, std::string_view what) const;
  // A local update whose RAM is passed by descriptor (no engine runs).
  bool PassesFds() const;
  void Say(const std::string& line) const;

  migration::Acceptor& acceptor_;
  const IncomingOptions options_;
  MigrationMode mode_;
  std::shared_ptr<IncomingStatus> status_;
  std::unique_ptr<migration::LocalUpdateDestination> local_;  // unix: the offer
  IncomingVm* vm_ = nullptr;                                  // from Prepare on
  // Made by Prepare and not replaced, so that Cancel reads them unlocked.
  std::unique_ptr<migration::DestinationVm> target_;                   // pre-copy, local
  std::unique_ptr<migration::PostcopyDestinationVm> postcopy_target_;  // post-copy
  std::unique_ptr<migration::MigrationDestination> precopy_;
  std::unique_ptr<migration::PostcopyDestination> postcopy_;
  nlohmann::json calibration_;  // --installer auto's trials
  std::atomic<bool> cancelled_{false};
};

// --installer: a name (checked against the backing), or "auto"/empty: the
// fastest candidate for the backing measured now (paging::CalibrateInstaller,
// ~50 ms), with the trials in `calibration` ({"chosen", "why", "ms",
// "trials": [{"installer", "pages_per_sec", "runs"}]}) and on stderr unless
// `quiet`.
Result<paging::InstallerKind> ChooseInstaller(std::string_view text, Backing backing,
                                              nlohmann::json& calibration, bool quiet);

}  // namespace faultline::control
