// LiveVm: a running reference VM that can be migrated away. It owns the
// source's control of a migration behind the control commands
// (control::SourceMigrationControl, which picks the engine: pre-copy,
// post-copy by request.mode, or a local update to a unix: target) and, when
// asked, the control socket that serves them with query-status; `faultline
// run` and `faultline demo` share it, so the demo drives the same engines,
// transport and control code as `faultline migrate`.
//
// A VM that arrived by migration (`faultline run --incoming --control`)
// hands over the control socket that served the incoming migration, and
// its control::IncomingStatus: query-migrate shows that migration's end until
// this VM is migrated away in turn.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "faultline/status.h"
#include "src/control/destination.h"
#include "src/control/server.h"
#include "src/control/source.h"
#include "src/migration/source.h"
#include "src/migration/transport.h"
#include "src/sys/mutex.h"
#include "src/vmm/vm.h"

namespace faultline::cli {

class LiveVm {
 public:
  using Clock = std::chrono::steady_clock;

  struct Options {
    // Serve the control socket here; empty: none (the demo drives
    // migration() directly).
    std::string control_path;
    // Its access: who besides this process's uid may use it, and what to
    // say of a refused peer (control::ControlServer::Options).
    control::ControlServer::Options control;
    // A test hook, see SourceMigrationControl::Options.
    std::optional<migration::FaultPlan> first_link_fault;
    // A control socket already serving (at control_path), whose commands
    // are replaced by this object's.
    std::unique_ptr<control::ControlServer> server;
    std::shared_ptr<control::IncomingStatus> incoming;  // see the top
    int realtime_priority = sys::kDefaultRealtimePriority;
    bool withhold_fds = false;  // a test hook, see SourceMigrationControl::Options
    // Outgoing migrations' channels: TLS (run --tls-dir) or plaintext, and
    // the link timeout.
    migration::TransportOptions transport;
    // A lazily restored VM: OK once its memory is all here, else why a
    // migration or snapshot cannot read it yet (it may wait a while for
    // the background reader). Null: always OK.
    std::function<Status()> memory_ready;
  };

  // `vm` has been started and must outlive this object.
  static Result<std::unique_ptr<LiveVm>> Create(vmm::Vm& vm, Options options);
  ~LiveVm();

  control::MigrationControl& migration();
  // The current or last migration, for the VMM itself (not counted as a
  // client having seen it, see WaitForCompletionSeen).
  control::MigrationStatus migration_status();

  enum class End {
    kGuestFinished,  // every vCPU ended here: Vm::Wait has the report
    kMigrated,       // a migration completed: the destination runs the guest
    kUnknown,        // link lost after Complete: the VM stays paused here
    kTimeout,
  };
  // Waits for the guest to finish or a migration to complete. A migration
  // that fails or is cancelled is reported on stderr (with `who`, e.g.
  // "faultline run") and the wait goes on: the guest kept running here.
  End Wait(Clock::time_point deadline, const char* who);

  // When the engine last paused the VM (the switchover), if it did.
  std::optional<Clock::time_point> paused_at() const;

  // After End::kMigrated: gives control-socket clients up to `grace` to
  // fetch the completed status before the VMM goes away.
  void WaitForCompletionSeen(std::chrono::milliseconds grace);

 private:
  class TimedSource;  // records the switchover's pause
  class SeenControl;  // notes when a client has seen a terminal phase

  explicit LiveVm(vmm::Vm& vm);
  void RegisterCommands(const std::shared_ptr<control::IncomingStatus>& incoming);
  control::VmStatus CurrentStatus() const;
  // One migration or snapshot at a time: OK if `what` may start now, else
  // WrongState saying why not.
  Status MayStartLocked(const char* what) REQUIRES(exclusive_mu_);
  Status StartSnapshot();  // marks one as running when it may
  void SnapshotEnded();

  vmm::Vm& vm_;
  // Declared before the engine, which calls on_done until it is destroyed.
  sys::Mutex mu_;
  std::condition_variable cv_;
  std::optional<migration::SourceOutcome> outcome_ GUARDED_BY(mu_);  // set by the engine
  std::unique_ptr<TimedSource> source_;
  std::shared_ptr<control::SourceMigrationControl> engine_;
  std::shared_ptr<SeenControl> control_;
  std::unique_ptr<control::ControlServer> server_;
  std::function<Status()> memory_ready_;
  sys::Mutex exclusive_mu_;  // taken before the engine's (SourceMigrationControl::mu_)
  bool snapshotting_ GUARDED_BY(exclusive_mu_) = false;
  Clock::time_point started_;
};

}  // namespace faultline::cli
