// The faultline subcommands. Each Add*Command registers itself on the app
// and stores the code to run in `action`.
#pragma once

#include <functional>
#include <string>

#include <CLI/CLI.hpp>

namespace faultline::cli {

// Runs the selected subcommand; returns the process exit code.
using Action = std::function<int()>;

void AddRunCommand(CLI::App& app, Action& action);
void AddMigrateCommand(CLI::App& app, Action& action);
void AddQueryCommand(CLI::App& app, Action& action);
void AddBenchCommand(CLI::App& app, Action& action);
void AddDemoCommand(CLI::App& app, Action& action);
void AddSnapshotCommand(CLI::App& app, Action& action);
void AddServePagesCommand(CLI::App& app, Action& action);

// `faultline snapshot`, also what `faultline migrate --to file:DIR` runs:
// the exit code.
int TakeSnapshot(const std::string& control, const std::string& dir, bool paused, bool leave_paused,
                 bool json);

}  // namespace faultline::cli
