// The faultline subcommands. Each Add*Command registers itself on the app
// and stores the code to run in `action`.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

namespace faultline::cli {

// Runs the selected subcommand; returns the process exit code.
using Action = std::function<int()>;

void AddRunCommand(CLI::App& app, Action& action);
void AddMigrateCommand(CLI::App& app, Action& action);
void AddQueryCommand(CLI::App& app, Action& action);
void AddBenchCommand(CLI::App& app, Action& action);
void AddDemoCommand(CLI::App& app, Action& action);
void AddServePagesCommand(CLI::App& app, Action& action);

}  // namespace faultline::cli
