// The migration and status commands of the control socket, on top of two
// seams the VMM fills in: a MigrationControl (the migration engine's face
// towards the operator) and a function producing a VmStatus.
//
//   migrate                 MigrateRequest          -> {}
//   query-migrate           {}                      -> MigrationStatus
//   migrate-cancel, cancel  {}                      -> {}
//   migrate-resume          {"to"?: ADDRESS}        -> {}   (a paused post-copy)
//   migrate-start-postcopy  {}                      -> {}
//   query-status            {}                      -> VmStatus
//
// ADDRESS is tcp:HOST:PORT or unix:PATH (docs/control.md).
//
// Argument validation happens here, so every engine sees checked requests.
#pragma once

#include <functional>
#include <memory>
#include <optional>

#include "faultline/status.h"
#include "src/control/server.h"
#include "src/control/types.h"

namespace faultline::control {

// What the migration engine offers the control socket. Called from the
// server's connection threads, possibly concurrently: thread-safe.
class MigrationControl {
 public:
  virtual ~MigrationControl() = default;

  // Starts a migration in the background and returns once it is under way
  // (phase setup or later). WrongState() if one is already active.
  virtual Status Start(const MigrateRequest& request) = 0;
  // The current (or last) migration; phase none if there was none.
  virtual MigrationStatus Query() = 0;
  // Asks the active migration to stop; the phase becomes cancelled (or
  // completed/failed if it was too late) asynchronously. WrongState() if
  // nothing is active.
  virtual Status Cancel() = 0;

  // Reconnects a post-copy migration whose link broke, to `to` or to the
  // original destination. The default (an engine without post-copy) says
  // it is not supported.
  virtual Status Resume(const std::optional<MigrationTarget>& to);
  // Switches an active post-copy-mode migration from its pre-copy passes to
  // post-copy now. The default says it is not supported.
  virtual Status StartPostcopy();
};

// A MigrationControl for a VMM without a migration engine: "migrate" says
// so, query-migrate reports phase none.
std::shared_ptr<MigrationControl> MakeUnavailableMigrationControl();

// Registers migrate, query-migrate, migrate-cancel (alias cancel),
// migrate-resume and migrate-start-postcopy.
void RegisterMigrationCommands(ControlServer& server, std::shared_ptr<MigrationControl> control);

// Registers query-status. `status` is called on a connection thread.
void RegisterStatusCommand(ControlServer& server, std::function<VmStatus()> status);

}  // namespace faultline::control
