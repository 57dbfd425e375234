// faultline serve-pages: serve a snapshot's memory to VMMs that hand over
// their userfaultfd, as Firecracker does for its page-fault handlers
// (docs/page_server.md). Listens on --socket until SIGINT or SIGTERM, then
// releases every client and removes the socket. Each VMM is logged on
// stderr when it connects (PID, UID) and when it is released (faults, zero
// pages, removes, bytes); with --json each release is also one JSON line on
// stdout, and the end a summary line.
#include <signal.h>

#include <cerrno>
#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "src/migration/page_server.h"
#include "src/migration/served_memory.h"
#include "src/migration/snapshot.h"
#include "src/migration/working_set.h"
#include "tools/faultline/commands.h"

namespace faultline::cli {
namespace {

using migration::PageClientReport;

struct ServePagesOptions {
  std::string socket;
  std::string snapshot;
  uint32_t threads = 2;
  std::string prefetch;  // FILE of "offset length" lines
  bool prefetch_all = false;
  bool json = false;
};

int Fail(const Status& status) {
  fmt::print(stderr, "faultline serve-pages: error: {}\n", status.ToString());
  return 1;
}

nlohmann::json ReportJson(const PageClientReport& r) {
  return {{"client", r.id},
          {"pid", r.pid},
          {"uid", r.uid},
          {"served", r.served},
          {"end", r.end},
          {"regions", r.regions},
          {"region_bytes", r.region_bytes},
          {"faults", r.stats.faults},
          {"zero_pages", r.stats.zero_installs},
          {"removes", r.stats.remove_events},
          {"units_installed", r.stats.units_installed},
          {"bytes_installed", r.stats.bytes_installed},
          {"bytes_copied", r.stats.bytes_copied},
          {"pushes", r.stats.pushes},
          {"errors", r.stats.errors},
          {"seconds", r.seconds}};
}

void PrintReport(const PageClientReport& r, bool json) {
  if (r.served) {
    fmt::print(stderr,
               "faultline serve-pages: client {} (pid {}): released ({}): {} faults, {} zero "
               "pages, {} removes, {} pages installed ({} pushed), {} bytes copied, {:.2f} s\n",
               r.id, r.pid, r.end, r.stats.faults, r.stats.zero_installs, r.stats.remove_events,
               r.stats.units_installed, r.stats.pushes, r.stats.bytes_copied, r.seconds);
  }
  if (json) {
    fmt::print("{}\n", ReportJson(r).dump());
    std::fflush(stdout);
  }
}

// SIGINT or SIGTERM, taken synchronously (blocked in every thread, which
// the server's threads inherit: they are started after this).
int WaitForSignal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  int sig = 0;
  while (sigwait(&set, &sig) != 0) {
  }
  return sig;
}

int ServePages(const ServePagesOptions& o) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  Result<migration::SnapshotReader> snapshot = migration::SnapshotReader::Open(o.snapshot);
  if (!snapshot.has_value()) return Fail(snapshot.error().WithContext("--snapshot"));
  auto memory = migration::ServedMemory::FromSnapshot(*snapshot);
  if (!memory.has_value()) return Fail(memory.error());
  migration::PageServerOptions options;
  options.socket_path = o.socket;
  options.client.threads = o.threads;
  options.client.prefetch = o.prefetch_all || !o.prefetch.empty();
  if (!o.prefetch.empty()) {
    auto ranges = migration::LoadWorkingSet(o.prefetch, (*memory)->size());
    if (!ranges.has_value()) return Fail(ranges.error().WithContext("--prefetch"));
    for (const migration::MemoryRange& r : *ranges) {
      options.client.prefetch_first.emplace_back(r.offset, r.length);
    }
  }
  options.client.log = [](const std::string& line) {
    fmt::print(stderr, "faultline serve-pages: {}\n", line);
  };
  options.on_client_end = [json = o.json](const PageClientReport& r) { PrintReport(r, json); };
  auto server = migration::PageServer::Start(*memory, std::move(options));
  if (!server.has_value()) return Fail(server.error().WithContext("--socket"));
  fmt::print(stderr,
             "faultline serve-pages: serving {} ({} MiB, {} data pages) on {}; {} thread(s) per "
             "client; stop with Ctrl-C\n",
             o.snapshot, (*memory)->size() >> 20, (*memory)->data_pages(), o.socket, o.threads);
  const int sig = WaitForSignal();
  fmt::print(stderr, "faultline serve-pages: {}: releasing every client\n",
             sig == SIGINT ? "interrupted" : "terminated");
  (*server)->Stop();
  const auto reports = (*server)->reports();
  if (o.json) {
    fmt::print("{}\n", nlohmann::json{{"clients", reports.size()}, {"stopped", true}}.dump());
  }
  return 0;
}

}  // namespace

void AddServePagesCommand(CLI::App& app, Action& action) {
  auto options = std::make_shared<ServePagesOptions>();
  CLI::App* cmd = app.add_subcommand(
      "serve-pages",
      "Serve a snapshot's memory to VMMs that hand over their userfaultfd (Firecracker's page "
      "fault handler handshake)");
  cmd->add_option("--socket", options->socket, "Unix socket path to listen on")->required();
  cmd->add_option("--snapshot", options->snapshot,
                  "Snapshot directory; its blocks, in order, are the guest memory file the "
                  "VMMs' region offsets point into")
      ->required();
  cmd->add_option("--threads", options->threads, "Fault handler threads per VMM")
      ->capture_default_str()
      ->check(CLI::Range(1, 64));
  cmd->add_option("--prefetch", options->prefetch,
                  "FILE of \"OFFSET LENGTH\" lines (bytes of the memory file): after each "
                  "handshake, push these ranges first, then every other data page, in the "
                  "background");
  cmd->add_flag("--prefetch-all", options->prefetch_all,
                "After each handshake, push every data page in the background");
  cmd->add_flag("--json", options->json,
                "One JSON line on stdout per released VMM, and one at the end");
  cmd->footer("Ends on SIGINT or SIGTERM (exit status 0), removing the socket.");
  cmd->callback([options, &action] { action = [options] { return ServePages(*options); }; });
}

}  // namespace faultline::cli
