// faultline snapshot: write a running VMM's guest to a directory through its
// control socket (the "snapshot" command, docs/control.md), live or paused.
// `faultline migrate --to file:DIR` does the same.
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

#include <fmt/format.h>

#include "src/control/snapshot.h"
#include "tools/faultline/commands.h"
#include "tools/faultline/control_client.h"

namespace faultline::cli {

int TakeSnapshot(const std::string& control, const std::string& dir, bool paused, bool leave_paused,
                 bool json) {
  auto fail = [](const Status& s) {
    fmt::print(stderr, "faultline snapshot: error: {}\n", s.ToString());
    return 1;
  };
  control::SnapshotRequest request;
  request.dir = dir;
  request.live = !paused;
  request.resume = !leave_paused;
  // A snapshot of many GiB takes a while: the reply comes when it is done.
  Result<ControlClient> client = ControlClient::Connect(control, std::chrono::minutes(30));
  if (!client.has_value()) return fail(client.error());
  Result<nlohmann::json> reply = client->Execute("snapshot", nlohmann::json(request));
  if (!reply.has_value()) return fail(reply.error());
  if (json) {
    fmt::print("{}\n", reply->dump());
    return 0;
  }
  const uint64_t data = reply->value("data_pages", uint64_t{0});
  fmt::print(
      "snapshot written to {}: {} MiB of data in {} pass(es), {} zero pages left as holes; the "
      "guest was paused {:.1f} ms of {:.1f} ms{}\n",
      reply->value("dir", dir), (data * 4096) >> 20, reply->value("passes", 0),
      reply->value("zero_pages", uint64_t{0}), reply->value("pause_us", 0.0) / 1000.0,
      reply->value("total_us", 0.0) / 1000.0, leave_paused ? " (it stays paused)" : "");
  return 0;
}

void AddSnapshotCommand(CLI::App& app, Action& action) {
  struct SnapshotOptions {
    std::string control, to;
    bool paused = false, leave_paused = false, json = false;
  };
  auto o = std::make_shared<SnapshotOptions>();
  CLI::App* cmd = app.add_subcommand(
      "snapshot",
      "Write a running VMM's guest to a directory (memory, vCPU and device state, manifest), "
      "for `faultline run --restore DIR`");
  cmd->add_option("--control", o->control, "The VMM's control socket (faultline run --control)")
      ->required();
  cmd->add_option("--to", o->to, "The directory to create (its parent must exist); also file:DIR")
      ->required();
  cmd->add_flag("--paused", o->paused,
                "Pause the guest for the whole write (default: copy while it runs, then pause "
                "it only for the last dirty pages and its state)");
  cmd->add_flag("--leave-paused", o->leave_paused,
                "The guest stays paused afterwards (default: it runs on)");
  cmd->add_flag("--json", o->json, "Print the VMM's reply as one JSON object");
  cmd->footer("Exit status: 0 when the snapshot is complete; 1 on error (nothing is left at DIR).");
  cmd->callback([o, &action] {
    action = [o] {
      std::string dir = o->to.starts_with("file:") ? o->to.substr(5) : o->to;
      return TakeSnapshot(o->control, dir, o->paused, o->leave_paused, o->json);
    };
  });
}

}  // namespace faultline::cli
