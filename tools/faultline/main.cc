// faultline: run guests, migrate them, and measure the memory machinery.
#include <cstdio>

#include "tools/faultline/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"faultline: KVM guest memory and live migration"};
  app.require_subcommand(1);
  faultline::cli::Action action;
  faultline::cli::AddRunCommand(app, action);
  faultline::cli::AddMigrateCommand(app, action);
  faultline::cli::AddQueryCommand(app, action);
  faultline::cli::AddBenchCommand(app, action);
  faultline::cli::AddDemoCommand(app, action);
  faultline::cli::AddSnapshotCommand(app, action);
  faultline::cli::AddServePagesCommand(app, action);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return action();
}
