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
#include <optional>
#include <string>

#include <fmt/format.h>

#include "src/control/destination.h"
#include "src/control/migration.h"
#include "src/control/server.h"
#include "src/migration/destination.h"
#include "src/migration/postcopy_destination.h"
#include "src/migration/postcopy_vm.h"
#include "src/migration/socket_transport.h"
#include "src/sys/mapping.h"
#include "src/vmm/vm.h"
#include "src/vmm/vm_adapter.h"
#include "tools/faultline/cli_util.h"
#include "tools/faultline/commands.h"
#include "tools/faultline/incoming_local.h"
#include "tools/faultline/live_vm.h"

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
  std::string control;    // serve the control socket here
  std::string incoming;   // tcp:HOST:PORT: receive the guest by migration
  bool prealloc = false;  // with --incoming: allocate all RAM before receiving
  bool postcopy = false;  // with --incoming: the migration is post-copy
  std::string installer;  // with --postcopy: override the default per backing
  int realtime_priority = sys::kDefaultRealtimePriority;  // post-copy fault path, both roles
  uint64_t test_cut_after = 0;           // test hook: break the first migration link after N bytes
  bool test_withhold_fds = false;        // test hook: a local update's offer without descriptors
  bool test_die_before_confirm = false;  // test hook: an incoming local update's process dies
};

using Clock = std::chrono::steady_clock;

// Exit codes besides 0 (the guest succeeded, or left by migration) and 1.
constexpr int kExitMigrationUnknown = 3;

int Fail(const Status& status) {
  fmt::print(stderr, "faultline run: error: {}\n", status.ToString());
  return 1;
}

std::chrono::milliseconds AcceptTimeout(const RunOptions& o) {
  // The source may be told to migrate long after this starts.
  return std::chrono::milliseconds(
      static_cast<int64_t>((o.timeout_s > 0 ? o.timeout_s : 3600) * 1000));
}

// --incoming: waits for one migration on `listener` and receives it into
// `vm` (created with boot = false).
Result<migration::DestinationStats> ReceiveGuest(vmm::Vm& vm, migration::SocketListener& listener,
                                                 const RunOptions& o,
                                                 control::IncomingStatus& status,
                                                 nlohmann::json& out) {
  const migration::Address& bound = listener.bound();
  if (!bound.is_unix()) {  // unix: said already, before the offer
    fmt::print(stderr, "faultline run: waiting for a migration on {}\n", bound.ToString());
    std::fflush(stderr);
  }
  std::unique_ptr<migration::DestinationVm> target = vmm::MakeDestinationVm(vm);
  migration::DestinationOptions options;
  options.accept.timeout = AcceptTimeout(o);
  migration::MigrationDestination destination(*target, options);
  // The pre-copy receiver keeps no live counters: query-migrate says
  // precopy (waiting or receiving) until it ends.
  status.SetPhase(control::MigrationPhase::kPrecopy);
  Result<migration::DestinationStats> stats = destination.Run(listener);
  status.Finish(
      stats.has_value() ? control::MigrationPhase::kCompleted : control::MigrationPhase::kFailed,
      stats.has_value() ? "" : stats.error().ToString());
  if (!stats.has_value()) {
    return Error(
        "incoming migration on {} refused: {}. The guest was not started here; the "
        "source keeps running it",
        bound.ToString(), stats.error().ToString());
  }
  out = {{"passes", stats->passes},
         {"data_pages", stats->data_pages},
         {"zero_pages", stats->zero_pages},
         {"bytes_received", stats->bytes_received},
         {"ms", stats->total.count() / 1000.0}};
  if (!o.quiet) {
    fmt::print(stderr,
               "faultline run: received the guest: {} MiB in {} passes ({} data, {} zero "
               "pages) in {:.0f} ms; running it\n",
               stats->bytes_received >> 20, stats->passes, stats->data_pages, stats->zero_pages,
               stats->total.count() / 1000.0);
  }
  return stats;
}

// --incoming --postcopy: waits for one post-copy migration into `vm`
// (created with boot = false) and runs it to the end; the engine starts the
// guest at the switchover. A broken link pauses it: the guest waits for its
// missing pages and this waits for the source's resumed session on the same
// listener. `target` keeps the pager, which must outlive the VM's run.
Result<migration::PostcopyDestinationStats> ReceivePostcopy(
    vmm::Vm& vm, migration::SocketListener& listener, const RunOptions& o,
    std::unique_ptr<migration::PostcopyDestinationVm>& target, control::IncomingStatus& status,
    nlohmann::json& out) {
  migration::PostcopyVmOptions vm_options;
  vm_options.realtime_priority = o.realtime_priority;
  nlohmann::json calibration;
  Result<paging::InstallerKind> kind =
      ChooseInstaller(o.installer, vm.config().backing, &calibration, o.quiet);
  if (!kind.has_value()) return kind.error().WithContext("--installer");
  vm_options.installer = *kind;
  // Refused here, before anyone waits on this destination, rather than when
  // a source connects (e.g. the zero installer, which never asks the source).
  target = vmm::MakePostcopyDestinationVm(vm, vm_options);
  RETURN_IF_ERROR(target->CheckPaging().WithContext("--installer"));
  const migration::Address& bound = listener.bound();
  fmt::print(stderr, "faultline run: waiting for a post-copy migration on {} ({} installer)\n",
             bound.ToString(), paging::InstallerName(target->installer()));
  std::fflush(stderr);
  migration::DestinationOptions options;
  options.accept.timeout = AcceptTimeout(o);
  options.realtime_priority = o.realtime_priority;
  migration::PostcopyDestination destination(*target, options);
  status.Attach(&destination);
  struct Detach {
    control::IncomingStatus& status;
    ~Detach() { status.Detach(); }  // before `destination` goes
  } detach{status};
  Result<migration::PostcopyDestinationStats> stats = destination.Run(listener);
  while (!stats.has_value() && destination.phase() == migration::PostcopyPhase::kPaused) {
    fmt::print(stderr,
               "faultline run: post-copy link broken ({}); the guest runs here and waits for "
               "its missing pages; waiting on {} for the source to resume (`faultline migrate "
               "--resume`)\n",
               stats.error().ToString(), bound.ToString());
    std::fflush(stderr);
    stats = destination.Resume(listener);
  }
  if (!stats.has_value()) {
    const migration::PostcopyDestinationStats last = destination.stats();
    status.Finish(control::MigrationPhase::kFailed, stats.error().ToString(), &last);
    if (destination.phase() == migration::PostcopyPhase::kPaused ||
        destination.phase() == migration::PostcopyPhase::kPostcopy) {
      return Error("post-copy migration on {} broke after the guest started here: {}",
                   bound.ToString(), stats.error().ToString());
    }
    return Error(
        "incoming post-copy migration on {} refused: {}. The guest was not started "
        "here; the source keeps running it",
        bound.ToString(), stats.error().ToString());
  }
  status.Finish(control::MigrationPhase::kCompleted, "", &*stats);
  out = {{"mode", "postcopy"},
         {"passes", stats->passes},
         {"precopy_pages", stats->precopy_pages},
         {"bytes_received", stats->bytes_received},
         {"sessions", stats->sessions},
         {"installer", paging::InstallerName(target->installer())},
         {"installer_calibration", calibration},
         {"start_vm_ms", stats->start_vm.count() / 1000.0},
         {"ms", stats->total.count() / 1000.0}};
  out.update(control::PostcopyFiguresJson(*stats));
  if (!o.quiet) {
    fmt::print(stderr,
               "faultline run: post-copy complete: {} MiB in {} ms over {} session(s); {}\n",
               stats->bytes_received >> 20, stats->total.count() / 1000, stats->sessions,
               control::PostcopyFiguresLine(*stats));
  }
  return stats;
}

// The control socket of a VM waiting for (then receiving) a migration:
// query-status and query-migrate, the latter from `incoming`.
Result<std::unique_ptr<control::ControlServer>> ServeIncoming(
    const std::string& path, vmm::Vm& vm, std::shared_ptr<control::IncomingStatus> incoming) {
  ASSIGN_OR_RETURN(std::unique_ptr<control::ControlServer> server,
                   control::ControlServer::Create(path));
  const auto created = Clock::now();
  server->Register("query-migrate", [incoming](const nlohmann::json&) -> Result<nlohmann::json> {
    return incoming->Status();
  });
  control::RegisterStatusCommand(*server, [&vm, incoming, created] {
    control::VmStatus s;
    const vmm::VmConfig& config = vm.config();
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
  RETURN_IF_ERROR(server->Start());
  return server;
}

int Run(const RunOptions& o) {
  vmm::VmConfig config;
  config.guest_path = o.guest;
  Result<uint64_t> mem = ParseSize(o.mem);
  if (!mem.has_value()) return Fail(mem.error().WithContext("--mem"));
  config.mem_size = *mem;
  config.vcpus = o.vcpus;
  Result<Backing> backing = ParseBacking(o.backing);
  if (!backing.has_value()) return Fail(backing.error().WithContext("--backing"));
  config.backing = *backing;
  if (Status s = ApplyAccelOptions(o.accel, config); !s.ok()) return Fail(s);
  Result<std::string> args = WorkloadToGuestArgs(o.workload, o.duration_s);
  if (!args.has_value()) return Fail(args.error().WithContext("--workload"));
  config.guest_args = *args;
  if (!o.quiet) {
    config.serial = [](const std::string& line) { fmt::print(stderr, "guest| {}\n", line); };
  }

  if (o.postcopy && o.incoming.empty()) {
    return Fail(
        Error("--postcopy goes with --incoming: it says the migration to receive is "
              "post-copy"));
  }
  if (!o.installer.empty() && !o.postcopy) {
    return Fail(Error("--installer goes with --incoming and --postcopy"));
  }
  auto start = Clock::now();
  Result<std::unique_ptr<vmm::Vm>> vm = Error("not created");
  // Post-copy: the pager behind the VM's memory; stopped (below) before it
  // goes, as the VM's vCPUs may call it.
  std::unique_ptr<migration::PostcopyDestinationVm> postcopy_target;
  struct StopFirst {
    Result<std::unique_ptr<vmm::Vm>>& vm;
    ~StopFirst() {
      if (vm.has_value() && *vm) (*vm)->Stop();
    }
  } stop_first{vm};
  bool started = false;
  nlohmann::json incoming_json;
  // --incoming with --control: the socket serves the incoming migration
  // from now on; LiveVm takes it over once the guest runs here.
  std::shared_ptr<control::IncomingStatus> incoming_status;
  std::unique_ptr<control::ControlServer> early_server;
  if (!o.incoming.empty()) {
    // The guest, its command line included, arrives with its memory.
    config.boot = false;
    Result<migration::Address> address = migration::ParseAddress(o.incoming);
    if (!address.has_value()) return Fail(address.error().WithContext("--incoming"));
    Result<std::unique_ptr<migration::SocketListener>> listener =
        migration::SocketListener::Listen(*address, {});
    if (!listener.has_value()) return Fail(listener.error().WithContext("--incoming"));
    // unix: the first connection offers the guest, and says how its memory
    // comes (passed, or copied by the migration that follows).
    std::unique_ptr<migration::LocalUpdateDestination> local;
    bool postcopy = o.postcopy;
    const LocalIncomingOptions local_options{AcceptTimeout(o), o.quiet, o.test_die_before_confirm};
    if (address->is_unix()) {
      Result<std::unique_ptr<migration::LocalUpdateDestination>> accepted =
          AcceptLocalOffer(**listener, local_options, config, postcopy);
      if (!accepted.has_value()) return Fail(accepted.error());
      local = std::move(*accepted);
    }
    vm = vmm::Vm::Create(config);
    if (local) {
      Status checked = CheckLocalVm(*local, vm);
      if (!checked.ok()) return Fail(checked);
    } else if (!vm.has_value()) {
      return Fail(vm.error());
    }
    incoming_status = std::make_shared<control::IncomingStatus>(
        postcopy ? control::MigrationMode::kPostcopy : control::MigrationMode::kPrecopy,
        config.mem_size);
    if (!o.control.empty()) {
      Result<std::unique_ptr<control::ControlServer>> server =
          ServeIncoming(o.control, **vm, incoming_status);
      if (!server.has_value()) {
        Status why = server.error().WithContext("--control");
        if (local) (void)local->Refuse(why, migration::ErrorCode::kResource);
        return Fail(why);
      }
      early_server = std::move(*server);
    }
    if (local && local->offer().memory == migration::LocalMemory::kFds) {
      Status received = ReceiveLocal(*local, **vm, local_options, *incoming_status, incoming_json);
      if (!received.ok()) return Fail(received);
      start = Clock::now();  // the guest's time here starts now
    } else {
      if (local) {
        if (Status ready = local->Ready(); !ready.ok()) return Fail(LocalRefused(ready));
        if (!o.quiet) {
          fmt::print(stderr,
                     "faultline run: the source's guest RAM cannot be passed (anonymous "
                     "memory): receiving it by {} migration over {}\n",
                     postcopy ? "post-copy" : "pre-copy", (*listener)->address());
        }
      }
      if (o.prealloc) {
        std::span<uint8_t> ram = (*vm)->ram();
        if (Status s = sys::PopulateWrite(ram.data(), ram.size()); !s.ok()) {
          return Fail(s.WithContext("--prealloc"));
        }
      }
      if (postcopy) {
        Result<migration::PostcopyDestinationStats> stats =
            ReceivePostcopy(**vm, **listener, o, postcopy_target, *incoming_status, incoming_json);
        if (!stats.has_value()) return Fail(stats.error());
        started = true;  // by the engine, at the switchover
        start = stats->vm_started_at;
      } else {
        Result<migration::DestinationStats> stats =
            ReceiveGuest(**vm, **listener, o, *incoming_status, incoming_json);
        if (!stats.has_value()) return Fail(stats.error());
        start = Clock::now();  // the guest's time here starts now
      }
    }
  } else {
    vm = vmm::Vm::Create(config);
    if (!vm.has_value()) return Fail(vm.error());
  }
  if (!started) {
    if (Status s = (*vm)->Start(); !s.ok()) return Fail(s);
  }

  std::optional<migration::FaultPlan> link_fault;
  if (o.test_cut_after > 0) {
    link_fault.emplace();
    link_fault->cut_after_bytes_sent = o.test_cut_after;
  }
  Result<std::unique_ptr<LiveVm>> live =
      LiveVm::Create(**vm, o.control, link_fault, std::move(early_server), incoming_status,
                     o.realtime_priority, o.test_withhold_fds);
  if (!live.has_value()) return Fail(live.error().WithContext("--control"));
  // Without an explicit timeout: generous for a fill and verify of 16 GiB on
  // these machines, plus the requested duration.
  double timeout = o.timeout_s > 0 ? o.timeout_s : 300 + o.duration_s * 2;
  auto deadline = start + std::chrono::milliseconds(static_cast<int64_t>(timeout * 1000));
  LiveVm::End end = (*live)->Wait(deadline, "faultline run");
  if (end == LiveVm::End::kMigrated || end == LiveVm::End::kUnknown) {
    control::MigrationStatus m = (*live)->migration_status();
    if (end == LiveVm::End::kMigrated) {
      // Let `faultline migrate` see "completed" before the socket goes.
      (*live)->WaitForCompletionSeen(std::chrono::seconds(3));
    }
    const GuestReport report = (*vm)->report();
    (*vm)->Stop();
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
  // Finished here (or timed out: Wait stops the VM and says so).
  Result<GuestReport> report =
      (*vm)->Wait(std::chrono::milliseconds(end == LiveVm::End::kTimeout ? 0 : 60'000));
  live->reset();
  if (!report.has_value()) return Fail(report.error());
  double elapsed_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  if (o.json) {
    nlohmann::json j = ReportToJson(*report);
    j["elapsed_ms"] = elapsed_ms;
    j["mem_bytes"] = config.mem_size;
    j["backing"] = BackingName(config.backing);
    j["accel"] = hv::AccelName((*vm)->accel());
    j["dirty"] = DirtyLogModeName((*vm)->dirty_mode());
    if (!incoming_json.is_null()) j["incoming"] = incoming_json;
    fmt::print("{}\n", j.dump());
  } else {
    fmt::print("{}", FormatReport(*report));
    fmt::print("elapsed {:.0f} ms ({} MiB, {} vCPUs, {} backing, {}{})\n", elapsed_ms,
               config.mem_size >> 20, config.vcpus, BackingName(config.backing),
               hv::AccelName((*vm)->accel()),
               o.incoming.empty()                           ? ""
               : incoming_json.value("mode", "") == "local" ? ", taken over by a local update"
                                                            : ", received by migration");
  }
  if (report->success()) return 0;
  for (size_t i = 0; i < report->vcpus.size(); ++i) {
    const GuestVcpuReport& v = report->vcpus[i];
    if (v.panic) fmt::print(stderr, "faultline run: vcpu {}: guest {}\n", i, *v.panic);
  }
  fmt::print(stderr, "faultline run: the guest reported failure ({} bad pages)\n",
             report->bad_page_count());
  return 1;
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
                  "NAME[,key=value...]: verify, fill, random, hotset, touch, triplefault; "
                  "options go to the guest (rate=MiBps, ops=N, hot_pages=N, seed=N)")
      ->capture_default_str();
  run->add_option("--duration", options->duration_s, "Seconds for random/hotset phases");
  AddAccelOptions(run, &options->accel);
  run->add_option("--backing", options->backing, "RAM backing: anon, memfd, hugetlb, gmem")
      ->capture_default_str();
  run->add_option("--timeout", options->timeout_s, "Give up after this many seconds");
  run->add_flag("--json", options->json, "Print one JSON object on stdout");
  run->add_flag("--quiet", options->quiet, "Do not echo the guest console");
  run->add_option("--control", options->control,
                  "Serve the control socket (query-status, migrate, query-migrate, "
                  "migrate-cancel) at this path; see `faultline migrate`");
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
  run->add_option("--installer", options->installer,
                  "With --postcopy: how fetched pages are installed: auto (default: the fastest "
                  "of the backing's candidates, measured at start in ~50 ms: copy or move on "
                  "anon, copy or continue on memfd and hugetlb, hole on gmem), continue, move, "
                  "copy or hole");
  // Hidden: for the tests of recovery (a link that breaks at a known point).
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
  run->add_flag("--prealloc", options->prealloc,
                "With --incoming: allocate all guest RAM before the migration starts, so that "
                "receiving takes no page faults");
  run->footer(
      "Exit status: 0 when the guest succeeded, or when it migrated away (with --control); "
      "1 on failure; 3 when the link broke after the final state was sent (the guest stays "
      "paused: the destination may be running it).");
  run->callback([options, &action] { action = [options] { return Run(*options); }; });
}

}  // namespace faultline::cli
