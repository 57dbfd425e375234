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
#include <memory>
#include <optional>
#include <string>

#include "faultline/status.h"
#include "src/control/destination.h"
#include "src/control/server.h"
#include "src/control/source.h"
#include "src/migration/source.h"
#include "src/sys/mutex.h"
#include "src/vmm/vm.h"

namespace faultline::cli {

class LiveVm {
 public:
  using Clock = std::chrono::steady_clock;

  // `vm` has been started and must outlive this object. An empty
  // `control_path` serves no socket (the demo drives migration() directly).
  // `first_link_fault`: a test hook, see SourceMigrationControl::Options.
  // `server`: a control socket already serving (at `control_path`), whose
  // commands are replaced by this object's; `incoming`: see the top.
  // `withhold_fds`: a test hook, see SourceMigrationControl::Options.
  static Result<std::unique_ptr<LiveVm>> Create(
      vmm::Vm& vm, const std::string& control_path,
      std::optional<migration::FaultPlan> first_link_fault = std::nullopt,
      std::unique_ptr<control::ControlServer> server = nullptr,
      std::shared_ptr<control::IncomingStatus> incoming = nullptr,
      int realtime_priority = sys::kDefaultRealtimePriority, bool withhold_fds = false);
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

  vmm::Vm& vm_;
  // Declared before the engine, which calls on_done until it is destroyed.
  sys::Mutex mu_;
  std::condition_variable cv_;
  std::optional<migration::SourceOutcome> outcome_ GUARDED_BY(mu_);  // set by the engine
  std::unique_ptr<TimedSource> source_;
  std::shared_ptr<control::SourceMigrationControl> engine_;
  std::shared_ptr<SeenControl> control_;
  std::unique_ptr<control::ControlServer> server_;
  Clock::time_point started_;
};

}  // namespace faultline::cli
