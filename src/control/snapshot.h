// The "snapshot" command of the control socket: writes the running VM to a
// directory (migration/snapshot.h, docs/snapshot.md), live or paused.
//
//   snapshot  {"dir": PATH, "live"?: true, "resume"?: true}
//             -> {"dir", "passes", "data_pages", "zero_pages", "pause_us", "total_us"}
//
// The reply comes when the snapshot is complete (renamed into place). One
// snapshot at a time, and never beside a migration: `may_start` says
// whether one may start now (WrongState() when not), and `done` is called
// when it has ended, whatever the outcome.
#pragma once

#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "faultline/status.h"
#include "src/control/server.h"
#include "src/migration/migratable.h"
#include "src/migration/snapshot.h"

namespace faultline::control {

struct SnapshotRequest {
  std::string dir;     // must not exist; its parent must
  bool live = true;    // dirty passes while the guest runs, then a short pause
  bool resume = true;  // false: the guest stays paused afterwards
};
Result<SnapshotRequest> ParseSnapshotRequest(const nlohmann::json& args);
void to_json(nlohmann::json& j, const SnapshotRequest& request);

nlohmann::json SnapshotReply(const std::string& dir, const migration::SnapshotStats& stats);

// Registers "snapshot" on `server` for `vm` (which must outlive the server).
void RegisterSnapshotCommand(ControlServer& server, migration::SourceVm& vm,
                             std::function<Status()> may_start, std::function<void()> done);

}  // namespace faultline::control
