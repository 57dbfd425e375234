// faultline run: boot the test guest, run a workload, print its report.
// With --control PATH the VMM serves its control socket, so that `faultline
// migrate` can move the guest away; with --incoming tcp:HOST:PORT it boots
// nothing and waits for a migration, then runs the guest it received. With
// --incoming and --postcopy it expects a post-copy migration (the source's
// `faultline migrate --mode postcopy`): the guest runs here from the
// switchover on, its missing pages fetched over the network; if the link
// breaks, it waits (the vCPUs block on missing pages) for the source to
// reconnect (`faultline migrate --resume`), and finishes the migration.
// With --incoming and --control, the control socket is served from the
// start: query-migrate shows the incoming migration as it runs (post-copy:
// pages demanded and pushed, fault latency per vCPU, blocked time) and,
// once it ended, until the guest is migrated away again.
//
// --incoming unix:PATH receives the guest from a process on this host: a
// local update (`faultline migrate --local`) maps the source's own RAM,
// passed by descriptor, and takes only the vCPU and device state; memory
// that cannot be passed (anonymous) comes by an ordinary pre-copy or
// post-copy migration over the same socket, as the source's offer says.
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include <fmt/format.h>

#include "guest/abi.h"
#include "src/control/incoming.h"
#include "src/control/migration.h"
#include "src/control/server.h"
#include "src/migration/tls_transport.h"
#include "src/vmm/vm.h"
#include "tools/faultline/cli_util.h"
#include "tools/faultline/commands.h"
#include "tools/faultline/incoming_vm.h"
#include "tools/faultline/live_vm.h"
#include "tools/faultline/restore.h"

namespace faultline::cli {
namespace {

struct RunOptions {
  AccelOptions accel;
  std::string guest = FAULTLINE_DEFAULT_GUEST;
  std::string mem = "1G";
  uint32_t vcpus = 1;
  std::string workload = "verify";
  double duration_s = 0;
  double timeout_s = 0;
  std::string backing = "anon";
  bool json = false;
  bool quiet = false;
  std::string control;                    // serve the control socket here
  std::vector<uid_t> control_allow_uids;  // --control-allow-uid
  std::string incoming;                   // tcp:HOST:PORT: receive the guest by migration
  bool prealloc = false;                  // with --incoming: allocate all RAM before receiving
  bool postcopy = false;                  // with --incoming: the migration is post-copy
  std::string installer;                  // with --postcopy: override the default per backing
  int realtime_priority = sys::kDefaultRealtimePriority;  // post-copy fault path, both roles
  uint32_t link_timeout_ms = 30'000;     // TCP migration links, both roles (TransportOptions)
  uint64_t test_cut_after = 0;           // test hook: break the first migration link after N bytes
  bool test_withhold_fds = false;        // test hook: a local update's offer without descriptors
  bool test_die_before_confirm = false;  // test hook: an incoming local update's process dies
  std::string restore;                   // a snapshot directory to run instead of booting
  bool lazy = false;                     // with --restore
  std::string prefetch;                  // with --restore --lazy
  std::string record_ws;                 // with --restore --lazy
  bool verify = false;                   // with --restore --lazy
  std::string memory_backend;            // with --restore: uffd:PATH
  bool backing_given = false;
  bool guest_stop = false;  // the guest's open-ended phases end at once
  TlsOptions tls;           // --tls-dir: incoming and outgoing migrations
};

using Clock = std::chrono::steady_clock;

// Exit codes besides 0 (the guest succeeded, or left by migration) and 1.
constexpr int kExitMigrationUnknown = 3;

int Fail(const Status& status) {
  fmt::print(stderr, "faultline run: error: {}\n", status.ToString());
  return 1;
}

std::chrono::milliseconds Millis(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

// The VM the options describe, and the checks of the options that go
// together.
Result<vmm::VmConfig> MakeConfig(const RunOptions& o) {
  vmm::VmConfig config;
  RETURN_IF_ERROR(ApplyMachineOptions(o.guest, o.mem, o.vcpus, o.backing, o.accel, config));
  Result<std::string> args = WorkloadToGuestArgs(o.workload, o.duration_s);
  if (!args.has_value()) return args.error().WithContext("--workload");
  config.guest_args = *args;
  if (!o.quiet) {
    config.serial = [](const std::string& line) { fmt::print(stderr, "guest| {}\n", line); };
  }
  if (o.postcopy && o.incoming.empty()) {
    return Error("--postcopy goes with --incoming: it says the migration to receive is post-copy");
  }
  if (!o.installer.empty() && !o.postcopy && !o.lazy) {
    return Error("--installer goes with --incoming and --postcopy, or --restore and --lazy");
  }
  if (o.restore.empty() && (o.lazy || o.verify || !o.prefetch.empty() || !o.record_ws.empty() ||
                            !o.memory_backend.empty())) {
    return Error(
        "--lazy, --verify, --prefetch, --record-ws and --memory-backend go with --restore DIR");
  }
  return config;
}

// The VM this run hosts and, with --incoming, the migration that brings its
// guest (the post-copy pager lives in `incoming`).
struct Hosted {
  migration::TransportOptions transport;  // --tls-dir's, both directions
  std::unique_ptr<migration::Acceptor> listener;
  std::unique_ptr<vmm::Vm> vm;
  std::unique_ptr<IncomingVmAdapter> adapter;
  std::unique_ptr<control::IncomingControl> incoming;
  // --incoming with --control: the socket serves the incoming migration
  // from the start; LiveVm takes it over once the guest runs here.
  std::unique_ptr<control::ControlServer> server;
  // --restore: after the VM, so that it goes first (its pager and
  // background reader serve the VM until the VM has stopped).
  std::unique_ptr<RestoredVm> restored;
  nlohmann::json incoming_json;            // the report's "incoming"
  nlohmann::json restore_json;             // the report's "restore"
  Clock::time_point start = Clock::now();  // the guest's time here starts
  // The VM stops first: its vCPUs may call the pager.
  ~Hosted() {
    if (vm) vm->Stop();
  }
};

Status Boot(const vmm::VmConfig& config, Hosted& h) {
  ASSIGN_OR_RETURN(h.vm, vmm::Vm::Create(config));
  return h.vm->Start();
}

control::IncomingOptions IncomingOptionsFor(const RunOptions& o, const vmm::VmConfig& config) {
  control::IncomingOptions options;
  options.mode = o.postcopy ? control::MigrationMode::kPostcopy : control::MigrationMode::kPrecopy;
  options.bytes_total = config.mem_size;
  // The source may be told to migrate long after this starts.
  options.accept_timeout = Millis(o.timeout_s > 0 ? o.timeout_s : 3600);
  options.realtime_priority = o.realtime_priority;
  options.installer = o.installer;
  options.prealloc = o.prealloc;
  options.quiet = o.quiet;
  options.test_die_before_confirm = o.test_die_before_confirm;
  options.say = [](const std::string& line) {
    fmt::print(stderr, "faultline run: {}\n", line);
    std::fflush(stderr);
  };
  return options;
}

// --control's access: --control-allow-uid, and refused peers on stderr.
control::ControlServer::Options ControlOptions(const RunOptions& o) {
  control::ControlServer::Options options;
  options.allowed_uids = o.control_allow_uids;
  options.on_refused = [](const std::string& line) {
    fmt::print(stderr, "faultline run: {}\n", line);
    std::fflush(stderr);
  };
  return options;
}

// --incoming with --control: query-status and query-migrate (the incoming
// migration's status) while the guest is on its way.
Status ServeIncoming(const RunOptions& o, Hosted& h) {
  if (o.control.empty()) return Status::Ok();
  Result<std::unique_ptr<control::ControlServer>> server =
      control::ControlServer::Create(o.control, ControlOptions(o));
  if (!server.has_value()) {
    Status why = server.error().WithContext("--control");
    (void)h.incoming->Refuse(why, migration::ErrorCode::kResource);
    return why;
  }
  std::shared_ptr<control::IncomingStatus> incoming = h.incoming->status();
  (*server)->Register("query-migrate", [incoming](const nlohmann::json&) -> Result<nlohmann::json> {
    return incoming->Status();
  });
  const vmm::VmConfig& config = h.vm->config();
  control::RegisterStatusCommand(**server, [&config, incoming, created = Clock::now()] {
    control::VmStatus s;
    s.vcpus = config.vcpus;
    s.mem_bytes = config.mem_size;
    s.backing = BackingName(config.backing);
    s.migration = incoming->phase();
    // Post-copy runs the guest from the switchover on.
    const bool running = s.migration == control::MigrationPhase::kPostcopy ||
                         s.migration == control::MigrationPhase::kCompleted;
    s.state = running ? control::VmState::kRunning : control::VmState::kCreated;
    s.uptime_ms = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - created).count());
    return s;
  });
  RETURN_IF_ERROR((*server)->Start());
  h.server = std::move(*server);
  return Status::Ok();
}

// --incoming: boots nothing, waits for the guest and runs it once it is
// here (post-copy: from the switchover on).
Status Receive(const RunOptions& o, vmm::VmConfig config, Hosted& h) {
  config.boot = false;  // the guest, its command line included, comes with its memory
  Result<migration::Address> address = migration::ParseAddress(o.incoming);
  if (!address.has_value()) return address.error().WithContext("--incoming");
  Result<std::unique_ptr<migration::Acceptor>> listener =
      migration::MakeAcceptor(*address, h.transport);
  if (!listener.has_value()) return listener.error().WithContext("--incoming");
  h.listener = std::move(*listener);
  h.incoming =
      std::make_unique<control::IncomingControl>(*h.listener, IncomingOptionsFor(o, config));
  if (address->is_unix()) {
    // The first connection offers the guest, and says how its memory
    // comes (passed, or copied by the migration that follows).
    const migration::BlockInfo ram[] = {ExpectedRam(config)};
    RETURN_IF_ERROR(h.incoming->AcceptLocalOffer(ram, config.vcpus));
    if (!h.incoming->passed_fds().empty()) config.ram_fd = h.incoming->passed_fds()[0].get();
  }
  Result<std::unique_ptr<vmm::Vm>> vm = vmm::Vm::Create(config);
  if (!vm.has_value()) return h.incoming->Refuse(vm.error(), migration::ErrorCode::kResource);
  h.vm = std::move(*vm);
  h.adapter = std::make_unique<IncomingVmAdapter>(*h.vm);
  RETURN_IF_ERROR(ServeIncoming(o, h));
  RETURN_IF_ERROR(h.incoming->Prepare(*h.adapter));
  ASSIGN_OR_RETURN(control::IncomingResult arrived, h.incoming->Run());
  h.incoming_json = std::move(arrived.figures);
  if (h.transport.tls) h.incoming_json["tls"] = h.transport.tls->Describe();
  h.start = arrived.started_at;
  return Status::Ok();
}

// --restore: the VM the snapshot describes, loaded or lazily paged, running.
Status Restore(const RunOptions& o, vmm::VmConfig& config, Hosted& h) {
  RestoreOptions r;
  r.dir = o.restore;
  r.lazy = o.lazy;
  r.prefetch = o.prefetch;
  r.record_ws = o.record_ws;
  r.installer = o.installer;
  r.verify = o.verify;
  r.memory_backend = o.memory_backend;
  r.realtime_priority = o.realtime_priority;
  r.quiet = o.quiet;
  ASSIGN_OR_RETURN(h.restored, RestoredVm::Open(std::move(r), config, o.backing_given));
  h.start = h.restored->started();
  ASSIGN_OR_RETURN(h.vm, vmm::Vm::Create(config));
  return h.restored->Start(*h.vm).WithContext("--restore");
}

// The guest left by migration (or may have: kUnknown); the VM stays paused.
int ReportMigratedAway(const RunOptions& o, LiveVm& live, vmm::Vm& vm, LiveVm::End end,
                       Clock::time_point start) {
  control::MigrationStatus m = live.migration_status();
  if (end == LiveVm::End::kMigrated) {
    // Let `faultline migrate` see "completed" before the socket goes.
    live.WaitForCompletionSeen(std::chrono::seconds(3));
  }
  const GuestReport report = vm.report();
  vm.Stop();
  if (end == LiveVm::End::kUnknown) return kExitMigrationUnknown;
  uint64_t workload_pages = 0;
  for (const GuestVcpuReport& v : report.vcpus) workload_pages += v.pages;
  if (o.json) {
    nlohmann::json j = {
        {"migrated_to", m.to},
        {"migration", m},
        {"workload_pages", workload_pages},
        {"elapsed_ms", std::chrono::duration<double, std::milli>(Clock::now() - start).count()}};
    fmt::print("{}\n", j.dump());
  } else if (m.local && m.local_memory == "fds") {
    fmt::print(
        "the guest moved to the new VMM process at {} (local update: its RAM passed as {} "
        "descriptor(s), {} pages copied, paused {:.2f} ms); it runs there now, this VMM is "
        "done\n",
        m.to, m.fds_passed, m.pages_copied, m.downtime_us.value_or(0) / 1000.0);
  } else {
    std::string downtime = m.downtime_ms ? fmt::format(", downtime {} ms", *m.downtime_ms) : "";
    fmt::print(
        "the guest migrated to {} ({} MiB in {} passes{}); it runs there now, this VMM is "
        "done\n",
        m.to, m.bytes_sent >> 20, m.pass, downtime);
  }
  return 0;
}

// The guest ended here: its report, and the exit code it earns.
int ReportFinished(const RunOptions& o, const vmm::VmConfig& config, const Hosted& h,
                   const GuestReport& report) {
  double elapsed_ms = std::chrono::duration<double, std::milli>(Clock::now() - h.start).count();
  if (o.json) {
    nlohmann::json j = ReportToJson(report);
    j["elapsed_ms"] = elapsed_ms;
    j["mem_bytes"] = config.mem_size;
    j["backing"] = BackingName(config.backing);
    j["accel"] = hv::AccelName(h.vm->accel());
    j["dirty"] = DirtyLogModeName(h.vm->dirty_mode());
    if (!h.incoming_json.is_null()) j["incoming"] = h.incoming_json;
    if (!h.restore_json.is_null()) j["restore"] = h.restore_json;
    fmt::print("{}\n", j.dump());
  } else {
    fmt::print("{}", FormatReport(report));
    fmt::print("elapsed {:.0f} ms ({} MiB, {} vCPUs, {} backing, {}{})\n", elapsed_ms,
               config.mem_size >> 20, config.vcpus, BackingName(config.backing),
               hv::AccelName(h.vm->accel()),
               !o.restore.empty()                             ? ", restored from a snapshot"
               : o.incoming.empty()                           ? ""
               : h.incoming_json.value("mode", "") == "local" ? ", taken over by a local update"
                                                              : ", received by migration");
  }
  if (report.success()) return 0;
  for (size_t i = 0; i < report.vcpus.size(); ++i) {
    const GuestVcpuReport& v = report.vcpus[i];
    if (v.panic) fmt::print(stderr, "faultline run: vcpu {}: guest {}\n", i, *v.panic);
  }
  fmt::print(stderr, "faultline run: the guest reported failure ({} bad pages)\n",
             report.bad_page_count());
  return 1;
}

int Run(const RunOptions& o) {
  Result<vmm::VmConfig> config = MakeConfig(o);
  if (!config.has_value()) return Fail(config.error());
  Hosted h;
  Result<migration::TransportOptions> transport = TransportFor(o.tls, "run");
  if (!transport.has_value()) return Fail(transport.error());
  h.transport = std::move(*transport);
  // The migration links' options, incoming and outgoing alike.
  h.transport.link_timeout = std::chrono::milliseconds(o.link_timeout_ms);
  Status ready = !o.restore.empty()   ? Restore(o, *config, h)
                 : o.incoming.empty() ? Boot(*config, h)
                                      : Receive(o, *config, h);
  if (!ready.ok()) return Fail(ready);
  if (o.guest_stop) h.vm->SetGuestCommand(FL_CMD_STOP);

  std::optional<migration::FaultPlan> link_fault;
  if (o.test_cut_after > 0) {
    link_fault.emplace();
    link_fault->cut_after_bytes_sent = o.test_cut_after;
  }
  LiveVm::Options live_options;
  live_options.control_path = o.control;
  live_options.control = ControlOptions(o);
  live_options.first_link_fault = link_fault;
  live_options.server = std::move(h.server);
  live_options.incoming = h.incoming ? h.incoming->status() : nullptr;
  live_options.realtime_priority = o.realtime_priority;
  live_options.withhold_fds = o.test_withhold_fds;
  live_options.transport = h.transport;
  if (h.restored) {
    live_options.memory_ready = [r = h.restored.get()] { return r->MemoryReady(); };
  }
  Result<std::unique_ptr<LiveVm>> live = LiveVm::Create(*h.vm, std::move(live_options));
  if (!live.has_value()) return Fail(live.error().WithContext("--control"));
  // Without an explicit timeout: generous for a fill and verify of 16 GiB on
  // these machines, plus the requested duration.
  const double timeout = o.timeout_s > 0 ? o.timeout_s : 300 + o.duration_s * 2;
  const LiveVm::End end = (*live)->Wait(h.start + Millis(timeout), "faultline run");
  if (end == LiveVm::End::kMigrated || end == LiveVm::End::kUnknown) {
    return ReportMigratedAway(o, **live, *h.vm, end, h.start);
  }
  // Finished here (or timed out: Wait stops the VM and says so).
  Result<GuestReport> report =
      h.vm->Wait(std::chrono::milliseconds(end == LiveVm::End::kTimeout ? 0 : 60'000));
  live->reset();
  if (!report.has_value()) return Fail(report.error());
  if (h.restored) {
    Result<nlohmann::json> figures = h.restored->Finish();
    if (!figures.has_value()) return Fail(figures.error());
    h.restore_json = std::move(*figures);
  }
  return ReportFinished(o, *config, h, *report);
}

// Hidden from --help: for the tests of recovery (a link that breaks at a
// known point) and of local updates.
void AddTestHooks(CLI::App* run, RunOptions* options) {
  run->add_option("--test-cut-link-after", options->test_cut_after,
                  "Test hook: the first session of each outgoing migration breaks after this "
                  "many bytes sent")
      ->group("");
  run->add_flag("--test-withhold-fds", options->test_withhold_fds,
                "Test hook: an outgoing local update offers its memory without the descriptors")
      ->group("");
  run->add_flag("--test-die-before-confirm", options->test_die_before_confirm,
                "Test hook: an incoming local update's process exits just before it confirms")
      ->group("");
}

// --restore and what goes with it.
void AddRestoreOptions(CLI::App* run, RunOptions* options) {
  CLI::Option* restore = run->add_option(
      "--restore", options->restore,
      "A snapshot directory (`faultline snapshot`) to run instead of booting: the machine "
      "(memory, vCPUs, backing, accelerator) comes from it; eager unless --lazy");
  run->add_flag("--lazy", options->lazy,
                "With --restore: run the guest at once and page its memory in from the snapshot "
                "(zero pages at once, data pages on first touch, the rest by a background reader)");
  run->add_option("--prefetch", options->prefetch,
                  "With --restore --lazy: a working set (--record-ws of an earlier run) to load "
                  "first, in its order, while the guest starts");
  run->add_option("--memory-backend", options->memory_backend,
                  "With --restore: uffd:PATH: the guest's memory is paged in by the page server "
                  "listening at PATH (`faultline serve-pages`, or any handler that speaks "
                  "Firecracker's userfaultfd handshake) instead of read here; if it dies, this "
                  "VMM exits 1 at once with a message");
  run->add_flag("--verify", options->verify,
                "With --restore --lazy: check every memory checksum before the guest starts "
                "(reads all of the snapshot once; an eager restore always does)");
  run->add_option("--record-ws", options->record_ws,
                  "With --restore --lazy: save the order in which the guest first touched its "
                  "pages to this file (pages then come only on demand: no background reader)");
  for (const char* name : {"--incoming", "--mem", "--vcpus", "--workload", "--guest", "--duration",
                           "--prealloc", "--postcopy"}) {
    restore->excludes(name);
  }
}

}  // namespace

void AddRunCommand(CLI::App& app, Action& action) {
  auto options = std::make_shared<RunOptions>();
  CLI::App* run =
      app.add_subcommand("run", "Boot the test guest, run a workload, print its report");
  run->add_option("--guest", options->guest, "Guest ELF image (default: the one the build made)");
  run->add_option("--mem", options->mem, "Guest RAM, e.g. 1G (multiple of 2M, 64M..16G)")
      ->capture_default_str();
  run->add_option("--vcpus", options->vcpus, "Number of vCPUs, 1..8")->capture_default_str();
  run->add_option("--workload", options->workload,
                  "NAME[,key=value...]: verify, fill, random, hotset, random-hotset, touch, "
                  "triplefault; "
                  "options go to the guest (rate=MiBps, ops=N, hot_pages=N, seed=N)")
      ->capture_default_str();
  run->add_option("--duration", options->duration_s, "Seconds for random/hotset phases");
  AddAccelOptions(run, &options->accel);
  run->add_option("--backing", options->backing, "RAM backing: anon, memfd, hugetlb, gmem")
      ->capture_default_str();
  run->add_option("--timeout", options->timeout_s, "Give up after this many seconds");
  run->add_flag("--json", options->json, "Print one JSON object on stdout");
  AddTlsOptions(run, &options->tls);
  run->add_flag("--quiet", options->quiet, "Do not echo the guest console");
  run->add_option("--control", options->control,
                  "Serve the control socket (query-status, migrate, query-migrate, "
                  "migrate-cancel) at this path; see `faultline migrate`");
  run->add_option("--control-allow-uid", options->control_allow_uids,
                  "Another user id that may use the control socket (repeatable); the socket "
                  "is 0600 and refuses every other uid, root included")
      ->needs("--control");
  run->add_option("--incoming", options->incoming,
                  "tcp:HOST:PORT: boot nothing, wait for a migration there, then run the guest "
                  "that arrived (--mem, --vcpus and --backing must match the source); "
                  "unix:PATH: the same from a process on this host, which with `faultline "
                  "migrate --local` hands over its RAM without copying it");
  run->add_flag("--postcopy", options->postcopy,
                "With --incoming: the migration is post-copy (the source runs `faultline migrate "
                "--mode postcopy`); the guest runs here from the switchover on and a broken link "
                "waits for `faultline migrate --resume`");
  run->add_option("--realtime-priority", options->realtime_priority,
                  "Post-copy (either end): the SCHED_FIFO priority of the threads a guest page "
                  "fault waits on and of the switchover; 0 leaves them to the default scheduler "
                  "(needs CAP_SYS_NICE; without it they run as before)")
      ->check(CLI::Range(0, 99));
  run->add_option("--link-timeout-ms", options->link_timeout_ms,
                  "Migration over TCP (either end): a link that acknowledges nothing, neither "
                  "data nor keepalive probes, for this long is broken (a post-copy migration "
                  "pauses for `faultline migrate --resume`, any other fails); 1000 to 3600000")
      ->check(CLI::Range(1'000, 3'600'000))
      ->capture_default_str();
  run->add_option("--installer", options->installer,
                  "With --postcopy: how fetched pages are installed: auto (default: the fastest "
                  "of the backing's candidates, measured at start in ~50 ms: copy or move on "
                  "anon, copy or continue on memfd and hugetlb, hole on gmem), continue, move, "
                  "copy or hole");
  AddTestHooks(run, options.get());
  run->add_flag("--prealloc", options->prealloc,
                "With --incoming: allocate all guest RAM before the migration starts, so that "
                "receiving takes no page faults");
  AddRestoreOptions(run, options.get());
  run->add_flag("--guest-stop", options->guest_stop,
                "Tell the test guest at once to end its open-ended phases (random, and hotset "
                "without hot_ops): e.g. a guest restored from a snapshot taken during the random "
                "phase of --workload random-hotset goes on to its hot-set phase");
  run->footer(
      "Exit status: 0 when the guest succeeded, or when it migrated away (with --control); "
      "1 on failure; 3 when the link broke after the final state was sent (the guest stays "
      "paused: the destination may be running it).");
  run->callback([options, run, &action] {
    options->backing_given = run->count("--backing") > 0;
    action = [options] { return Run(*options); };
  });
}

}  // namespace faultline::cli
