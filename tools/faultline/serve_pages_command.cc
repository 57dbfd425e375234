// faultline serve-pages: serve a guest's memory to VMMs that hand over
// their userfaultfd, as Firecracker does for its page-fault handlers
// (docs/page_server.md). The memory is a snapshot's (--snapshot), or a
// migration's that arrives here (--from tcp:HOST:PORT: the socket is
// served from the switchover on, pages not here yet are fetched from the
// source when a VMM faults on them). Listens on --socket until SIGINT or
// SIGTERM, then releases every client and removes the socket. Each VMM is logged on
// stderr when it connects (PID, UID) and when it is released (faults, zero
// pages, removes, bytes); with --json each release is also one JSON line on
// stdout, and the end a summary line.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "src/control/incoming.h"
#include "src/control/served_incoming.h"
#include "src/migration/page_server.h"
#include "src/migration/served_memory.h"
#include "src/migration/snapshot.h"
#include "src/migration/socket_transport.h"
#include "src/migration/working_set.h"
#include "tools/faultline/cli_util.h"
#include "tools/faultline/commands.h"

namespace faultline::cli {
namespace {

using migration::PageClientReport;

struct ServePagesOptions {
  std::string socket;
  std::string snapshot;
  std::string from;               // tcp:HOST:PORT: a migration's memory
  std::vector<std::string> mem;   // with --from: [NAME:]SIZE per block
  std::string backing = "memfd";  // with --from
  std::string mode = "postcopy";  // with --from
  std::string installer;          // with --from: post-copy's; empty: auto
  uint32_t threads = 2;
  std::string prefetch;  // FILE of "offset length" lines
  bool prefetch_all = false;
  bool json = false;
  TlsOptions tls;  // with --from
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

// The signals the main thread takes synchronously: SIGINT and SIGTERM end
// the server; SIGUSR1 is the migration's thread saying something changed.
// Blocked in every thread, which the server's threads inherit: they are
// started after BlockSignals().
sigset_t HandledSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGUSR1);
  return set;
}

void BlockSignals() {
  const sigset_t set = HandledSignals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int WaitForSignal() {
  const sigset_t set = HandledSignals();
  int sig = 0;
  while (sigwait(&set, &sig) != 0) {
  }
  return sig;
}

// `result`, its error named after the option it came from.
template <typename T>
Result<T> ForOption(Result<T> result, std::string_view option) {
  if (!result.has_value()) return result.error().WithContext(option);
  return result;
}

Result<migration::PageServerOptions> ServerOptions(const ServePagesOptions& o, uint64_t size) {
  migration::PageServerOptions options;
  options.socket_path = o.socket;
  options.client.threads = o.threads;
  options.client.prefetch = o.prefetch_all || !o.prefetch.empty();
  if (!o.prefetch.empty()) {
    ASSIGN_OR_RETURN(options.client.prefetch_first,
                     ForOption(migration::LoadWorkingSet(o.prefetch, size), "--prefetch"));
  }
  options.client.log = [](const std::string& line) {
    fmt::print(stderr, "faultline serve-pages: {}\n", line);
  };
  options.on_client_end = [json = o.json](const PageClientReport& r) { PrintReport(r, json); };
  return options;
}

Result<std::unique_ptr<migration::PageServer>> StartServer(
    const ServePagesOptions& o, std::shared_ptr<const migration::ServedMemory> memory,
    const std::string& what) {
  ASSIGN_OR_RETURN(migration::PageServerOptions options, ServerOptions(o, memory->size()));
  auto server = migration::PageServer::Start(memory, std::move(options));
  if (!server.has_value()) return server.error().WithContext("--socket");
  fmt::print(stderr,
             "faultline serve-pages: serving {} ({} MiB) on {}; {} thread(s) per client; stop "
             "with Ctrl-C\n",
             what, memory->size() >> 20, o.socket, o.threads);
  return server;
}

void StopServer(migration::PageServer& server, int sig, bool json) {
  fmt::print(stderr, "faultline serve-pages: {}: releasing every client\n",
             sig == SIGINT ? "interrupted" : "terminated");
  server.Stop();
  if (json) {
    fmt::print("{}\n",
               nlohmann::json{{"clients", server.reports().size()}, {"stopped", true}}.dump());
  }
}

int ServeSnapshot(const ServePagesOptions& o) {
  Result<migration::SnapshotReader> snapshot = migration::SnapshotReader::Open(o.snapshot);
  if (!snapshot.has_value()) return Fail(snapshot.error().WithContext("--snapshot"));
  auto memory = migration::ServedMemory::FromSnapshot(*snapshot);
  if (!memory.has_value()) return Fail(memory.error());
  auto server = StartServer(o, *memory,
                            fmt::format("{} ({} data pages)", o.snapshot, (*memory)->data_pages()));
  if (!server.has_value()) return Fail(server.error());
  int sig = SIGUSR1;
  while (sig == SIGUSR1) sig = WaitForSignal();
  StopServer(**server, sig, o.json);
  return 0;
}

// --mem's blocks: [NAME:]SIZE each; unnamed ones are the reference VMM's
// (ram0, then ram1, ...).
Result<std::vector<RamBlockOptions>> ParseBlocks(const ServePagesOptions& o) {
  if (o.mem.empty()) {
    return Error(
        "--from needs --mem: the size of the guest's RAM (the source's --mem), so that "
        "the migration's blocks can be checked before any page moves");
  }
  ASSIGN_OR_RETURN(Backing backing, ForOption(ParseBacking(o.backing), "--backing"));
  std::vector<RamBlockOptions> blocks;
  for (const std::string& text : o.mem) {
    RamBlockOptions block;
    const size_t colon = text.find(':');
    block.name =
        colon == std::string::npos ? fmt::format("ram{}", blocks.size()) : text.substr(0, colon);
    const std::string size = colon == std::string::npos ? text : text.substr(colon + 1);
    ASSIGN_OR_RETURN(block.size, ForOption(ParseSize(size), "--mem"));
    block.backing = backing;
    blocks.push_back(std::move(block));
  }
  return blocks;
}

// --from: the migration runs on its own thread; the main thread starts the
// page server when the memory becomes servable, and reports the end.
class MigrationServer {
 public:
  explicit MigrationServer(const ServePagesOptions& o) : o_(o) {}

  int Run() {
    if (Status s = Prepare(); !s.ok()) return Fail(s);
    thread_ = std::thread([this] {
      result_ = incoming_->Run();
      done_.store(true, std::memory_order_release);
      pthread_kill(main_, SIGUSR1);
    });
    int status = -1;
    int sig = SIGUSR1;
    while (status < 0 && sig == SIGUSR1) {
      sig = WaitForSignal();
      if (sig == SIGUSR1) status = OnChange();
    }
    if (status < 0) status = 0;
    if (server_ && !(done_.load(std::memory_order_acquire) && result_.has_value())) {
      EndIncomplete(sig, status);
    }
    incoming_->Cancel();
    if (sig != SIGUSR1 && server_) StopServer(*server_, sig, o_.json);
    if (server_) server_->Stop();
    thread_.join();
    return status;
  }

 private:
  // Serving, with pages still missing (post-copy under way or paused, or
  // failed): a VMM's handler thread may be waiting in the pager for a page
  // only the source has, and releasing it would wait with it. Nothing more
  // can be served right, so the process ends here: the socket goes, and
  // every VMM sees its page server gone (its descriptors close with us).
  [[noreturn]] void EndIncomplete(int sig, int status) {
    fmt::print(stderr,
               "faultline serve-pages: {}: the migration has not brought every page, so the "
               "VMMs served cannot go on; ending without waiting for their faults\n",
               sig == SIGINT    ? "interrupted"
               : sig == SIGTERM ? "terminated"
                                : "stopping");
    ::unlink(o_.socket.c_str());
    if (o_.json) {
      fmt::print("{}\n", nlohmann::json{{"stopped", true}, {"complete", false}}.dump());
    }
    std::fflush(stdout);
    std::fflush(stderr);
    std::_Exit(status);
  }

  Status Prepare() {
    ASSIGN_OR_RETURN(std::vector<RamBlockOptions> blocks, ParseBlocks(o_));
    ASSIGN_OR_RETURN(migration::Address address,
                     ForOption(migration::ParseAddress(o_.from), "--from"));
    if (address.is_unix()) {
      return Error("--from {}: a page server receives a migration over tcp:HOST:PORT only",
                   o_.from);
    }
    ASSIGN_OR_RETURN(migration::TransportOptions transport, TransportFor(o_.tls, "serve-pages"));
    ASSIGN_OR_RETURN(listener_, ForOption(migration::MakeAcceptor(address, transport), "--from"));
    ASSIGN_OR_RETURN(vm_, control::ServedIncomingVm::Create(std::move(blocks), [this] {
                       servable_.store(true, std::memory_order_release);
                       pthread_kill(main_, SIGUSR1);
                     }));
    control::IncomingOptions options;
    options.mode =
        o_.mode == "precopy" ? control::MigrationMode::kPrecopy : control::MigrationMode::kPostcopy;
    for (const auto& block : vm_->blocks()) options.bytes_total += block->size();
    options.accept_timeout = std::chrono::hours(24);  // the source migrates when it is told
    options.installer = o_.installer;
    options.say = [](const std::string& line) {
      fmt::print(stderr, "faultline serve-pages: {}\n", line);
    };
    incoming_ = std::make_unique<control::IncomingControl>(*listener_, options);
    RETURN_IF_ERROR(incoming_->Prepare(*vm_));
    fmt::print(stderr, "faultline serve-pages: {} is served from the {} on\n", o_.socket,
               o_.mode == "precopy" ? "migration's end" : "switchover");
    return Status::Ok();
  }

  // The migration's thread said something: the memory became servable, or
  // the migration ended. An exit status, or -1 to go on.
  int OnChange() {
    if (servable_.load(std::memory_order_acquire) && !server_) {
      auto memory = vm_->Served();
      if (!memory.has_value()) return Fail(memory.error());
      auto server = StartServer(o_, *memory, fmt::format("the migration from {}", o_.from));
      if (!server.has_value()) return Fail(server.error());
      server_ = std::move(*server);
    }
    if (!done_.load(std::memory_order_acquire) || reported_) return -1;
    reported_ = true;
    if (!result_.has_value()) return Fail(result_.error().WithContext("the migration"));
    fmt::print(stderr, "faultline serve-pages: the migration completed: every page is here\n");
    if (o_.json) fmt::print("{}\n", nlohmann::json{{"migration", result_->figures}}.dump());
    std::fflush(stdout);
    return -1;
  }

  const ServePagesOptions& o_;
  const pthread_t main_ = pthread_self();
  std::unique_ptr<migration::Acceptor> listener_;
  std::unique_ptr<control::ServedIncomingVm> vm_;  // outlives incoming_ (its pager)
  std::unique_ptr<control::IncomingControl> incoming_;
  std::unique_ptr<migration::PageServer> server_;
  std::atomic<bool> servable_{false};
  std::atomic<bool> done_{false};
  Result<control::IncomingResult> result_ = Error("not run");  // the thread's until done_
  bool reported_ = false;
  std::thread thread_;
};

int ServePages(const ServePagesOptions& o) {
  if (o.snapshot.empty() && o.from.empty()) {
    return Fail(Error("say what memory to serve: --snapshot DIR or --from tcp:HOST:PORT"));
  }
  BlockSignals();
  if (!o.snapshot.empty()) return ServeSnapshot(o);
  return MigrationServer(o).Run();
}

}  // namespace

void AddServePagesCommand(CLI::App& app, Action& action) {
  auto options = std::make_shared<ServePagesOptions>();
  CLI::App* cmd = app.add_subcommand(
      "serve-pages",
      "Serve a snapshot's or an incoming migration's memory to VMMs that hand over their "
      "userfaultfd (Firecracker's page fault handler handshake)");
  cmd->add_option("--socket", options->socket, "Unix socket path to listen on")->required();
  CLI::Option* snapshot =
      cmd->add_option("--snapshot", options->snapshot,
                      "Snapshot directory; its blocks, in order, are the guest memory file the "
                      "VMMs' region offsets point into");
  CLI::Option* from =
      cmd->add_option("--from", options->from,
                      "tcp:HOST:PORT: receive the guest's memory by migration there (the "
                      "source's `faultline migrate --to tcp:HOST:PORT`) and serve it from the "
                      "switchover on; a page not here yet is fetched from the source when a VMM "
                      "faults on it");
  snapshot->excludes(from);
  AddTlsOptions(cmd, &options->tls)->needs(from);
  cmd->add_option("--mem", options->mem,
                  "With --from: the guest RAM's blocks, [NAME:]SIZE each, in order (the "
                  "reference VMM's: one, SIZE = its --mem); they are the memory file")
      ->needs(from);
  cmd->add_option("--backing", options->backing,
                  "With --from: where the received memory lives: memfd, anon or hugetlb")
      ->capture_default_str()
      ->needs(from);
  cmd->add_option("--mode", options->mode, "With --from: the migration's mode")
      ->capture_default_str()
      ->check(CLI::IsMember({"postcopy", "precopy"}))
      ->needs(from);
  cmd->add_option("--installer", options->installer,
                  "With --from, post-copy: how pages from the network are installed here (as "
                  "`run --incoming`'s; default: measured)")
      ->needs(from);
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
  cmd->footer(
      "One of --snapshot and --from. Ends on SIGINT or SIGTERM (exit status 0), removing the "
      "socket; with --from, also when the migration fails (exit status 1).");
  cmd->callback([options, &action] { action = [options] { return ServePages(*options); }; });
}

}  // namespace faultline::cli
