// faultline demo: live migration end to end in one command. A source VM
// runs the test guest's random-write workload; a destination VM waits on
// loopback TCP; the guest is migrated while it writes, keeps running on the
// destination, and there verifies every page against its ledger.
//
// Both VMs live in this process, on purpose: the switchover pause (the
// source's vCPUs stopped until the destination's run) is measured between
// two events on one clock, and one process cleans up both VMs whatever
// fails. The migration itself is the production path: LiveVm's
// SourceMigrationControl (what `faultline run --control` serves to
// `faultline migrate`) dials a real SocketListener, and MigrationDestination
// (pre-copy) or PostcopyDestination (post-copy, the default) receives into
// guest memory as `faultline run --incoming` does. The acceptance tests run
// the same with separate processes.
//
// Post-copy: after one pre-copy pass the source stops, the destination runs
// the guest at once and its missing pages fault and are fetched over the
// network while the rest is pushed; the report adds the guest-observed
// fault latency (the pager's: fault read -> installed and woken; p50/p99,
// overall and per vCPU), the vCPUs' blocked time and pages demanded
// against pages pushed (src/control/destination.h). The pre-copy engine's downtime
// (engine_downtime_ms) is left out in post-copy: the source's pause ends
// when the destination runs the guest, which switchover_pause_ms measures.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "guest/abi.h"
#include "src/control/destination.h"
#include "src/control/source.h"
#include "src/migration/destination.h"
#include "src/migration/postcopy_destination.h"
#include "src/migration/postcopy_vm.h"
#include "src/migration/socket_transport.h"
#include "src/sys/mapping.h"
#include "src/vmm/vm.h"
#include "src/vmm/vm_adapter.h"
#include "tools/faultline/cli_util.h"
#include "tools/faultline/commands.h"
#include "tools/faultline/live_vm.h"

namespace faultline::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct DemoOptions {
  AccelOptions accel;
  std::string guest = FAULTLINE_DEFAULT_GUEST;
  std::string mode = "postcopy";
  std::string installer;        // post-copy: the destination's, default per backing
  uint32_t precopy_passes = 1;  // post-copy: pre-copy passes before the switch
  int realtime_priority = sys::kDefaultRealtimePriority;  // post-copy fault path, both ends
  std::string backing = "anon";
  std::string mem = "2G";
  uint32_t vcpus = 2;
  uint32_t channels = 2;
  uint32_t rate_mibps = 64;  // the guest's random writes; 0 with --idle
  bool idle = false;
  uint64_t downtime_ms = control::kDefaultDowntimeMs;
  double after_s = 1.0;  // how long the guest keeps writing on the destination
  bool tcp_baseline = false;
  bool prealloc = false;
  bool json = false;
  bool verbose = false;
};

int Fail(const Status& status) {
  fmt::print(stderr, "faultline demo: error: {}\n", status.ToString());
  return 1;
}

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

// CPU time of this process, all threads, in ms: the cost of a transfer
// whatever else the machine is running (the shared 2-core machines here
// often have other jobs that take the CPU away from both measurements).
double ProcessCpuMs() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::nanoseconds(std::clock() * (1'000'000'000 / CLOCKS_PER_SEC)))
      .count();
}

struct LoopbackRate {
  double bytes_per_sec = 0;
  double cpu_ms_per_gib = 0;
};

// True once every vCPU has filled its memory (the guest reports a phase when
// it ends) and is in its open-ended random phase.
bool FillDone(const GuestReport& r, uint32_t vcpus) {
  if (r.vcpus.size() != vcpus) return false;
  for (const GuestVcpuReport& v : r.vcpus) {
    if (v.done || v.phases.empty() ||
        v.phases.back().phase != static_cast<uint32_t>(GuestPhaseKind::kFill)) {
      return false;
    }
  }
  return true;
}

// Loopback TCP through the migration's own SocketChannel, one connection, no
// protocol: 1 MiB sends into a 1 MiB receive buffer. The rate a migration's bytes are compared
// against. Measured in the same run, with the source guest running, so both see the same machine.
Result<LoopbackRate> MeasureLoopback(uint64_t bytes) {
  const migration::Address any_port{"tcp", "127.0.0.1", 0};
  ASSIGN_OR_RETURN(std::unique_ptr<migration::SocketListener> listener,
                   migration::SocketListener::Listen(any_port, migration::TransportOptions()));
  migration::SocketConnector connector({"tcp", "127.0.0.1", listener->port()}, {});
  Result<std::unique_ptr<migration::Channel>> accepted = Error("not accepted");
  std::thread acceptor([&] { accepted = listener->Accept(std::chrono::seconds(10)); });
  Result<std::unique_ptr<migration::Channel>> dialled = connector.Connect();
  acceptor.join();
  if (!dialled.has_value()) return dialled.error();
  if (!accepted.has_value()) return accepted.error();
  constexpr size_t kChunk = 1 << 20;
  const double cpu_start = ProcessCpuMs();
  auto start = Clock::now();
  Status receive_status = Status::Ok();
  std::thread receiver([&] {
    std::vector<uint8_t> buffer(kChunk);
    for (uint64_t got = 0; got < bytes && receive_status.ok(); got += kChunk) {
      receive_status = (*accepted)->Receive(std::span(buffer));
    }
  });
  std::vector<uint8_t> data(kChunk, 0x5a);
  Status send_status = Status::Ok();
  for (uint64_t sent = 0; sent < bytes && send_status.ok(); sent += kChunk) {
    send_status = (*dialled)->Send(std::span<const uint8_t>(data));
  }
  receiver.join();
  RETURN_IF_ERROR(send_status);
  RETURN_IF_ERROR(receive_status);
  double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const double gib = static_cast<double>(bytes) / (1ull << 30);
  return LoopbackRate{static_cast<double>(bytes) / seconds, (ProcessCpuMs() - cpu_start) / gib};
}

int Demo(const DemoOptions& o) {
  Result<control::MigrationMode> mode = control::ParseMigrationMode(o.mode);
  if (!mode.has_value()) return Fail(Status(0, mode.error().message()).WithContext("--mode"));
  // Before anything boots: say so at once if this build cannot do it.
  if (Status s = control::SourceMigrationControl::CheckMode(*mode); !s.ok()) {
    return Fail(Status(0, s.message()).WithContext("--mode"));
  }
  if (o.channels < 1 || o.channels > control::kMaxMigrationChannels) {
    return Fail(
        Error("--channels: {} is out of range 1..{}", o.channels, control::kMaxMigrationChannels));
  }
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
  const uint32_t rate = o.idle ? 1 : o.rate_mibps;
  // The guest writes until the VMM says stop (on the destination), then
  // verifies every page against its ledger.
  config.guest_args =
      fmt::format("workload=fill,random,verify until_command=1 rate={} quiet=1", rate);
  if (o.verbose) {
    config.serial = [](const std::string& line) { fmt::print(stderr, "guest| {}\n", line); };
  }
  if (Status s = vmm::ValidateConfig(config); !s.ok()) return Fail(s);
  vmm::VmConfig incoming = config;
  incoming.boot = false;
  if (o.verbose) {
    incoming.serial = [](const std::string& line) {
      fmt::print(stderr, "destination guest| {}\n", line);
    };
  }
  auto say = [&](std::string_view text) {
    if (!o.json) fmt::print(stderr, "demo: {}\n", text);
  };

  const auto demo_start = Clock::now();
  Result<std::unique_ptr<vmm::Vm>> source = vmm::Vm::Create(config);
  if (!source.has_value()) return Fail(source.error().WithContext("source VM"));
  const char* accel = hv::AccelName((*source)->accel());
  const char* dirty = DirtyLogModeName((*source)->dirty_mode());
  Result<std::unique_ptr<vmm::Vm>> destination = vmm::Vm::Create(incoming);
  if (!destination.has_value()) return Fail(destination.error().WithContext("destination VM"));
  Result<std::unique_ptr<migration::SocketListener>> listener =
      migration::SocketListener::Listen({"tcp", "127.0.0.1", 0}, {});
  if (!listener.has_value()) return Fail(listener.error().WithContext("destination"));
  const uint16_t port = (*listener)->port();

  if (Status s = (*source)->Start(); !s.ok()) return Fail(s.WithContext("source VM"));
  Result<std::unique_ptr<LiveVm>> live =
      LiveVm::Create(**source, "", std::nullopt, nullptr, nullptr, o.realtime_priority);
  if (!live.has_value()) return Fail(live.error());
  say(fmt::format("source VM: {} MiB, {} vCPUs, {} backing; the guest fills its memory", *mem >> 20,
                  o.vcpus, BackingName(config.backing)));
  // Fill at first-touch speed on these machines is some hundreds of MiB/s
  // per vCPU; give it plenty.
  const auto fill_deadline = Clock::now() + std::chrono::seconds(60 + (*mem >> 26));
  while (!FillDone((*source)->report(), o.vcpus)) {
    if ((*source)->vcpus().WaitFinished(std::chrono::milliseconds(20))) {
      Result<GuestReport> r = (*source)->Wait(std::chrono::milliseconds(0));
      return Fail(r.has_value() ? Error("the source guest ended before its fill was done")
                                : r.error());
    }
    if (Clock::now() > fill_deadline) return Fail(Error("the source guest's fill timed out"));
  }
  const GuestReport before = (*source)->report();
  uint64_t workload_pages = 0;
  for (const GuestVcpuReport& v : before.vcpus) workload_pages += v.pages;

  if (o.idle) {
    // An idle guest: on a real host its vCPUs would sit in HLT, using no
    // CPU and dirtying nothing. The test guest cannot halt at CPL3 (PVM), so
    // its vCPUs are held instead (kick-and-hold, which the engine's own
    // pause nests in); the destination runs them.
    (*source)->Pause();
  }
  if (o.prealloc) {
    // As `faultline run --incoming --prealloc`: the destination allocates
    // its RAM before the migration starts, as a VMM that preallocates
    // guest memory would.
    std::span<uint8_t> ram = (*destination)->ram();
    if (Status s = sys::PopulateWrite(ram.data(), ram.size()); !s.ok()) {
      return Fail(s.WithContext("--prealloc"));
    }
  }
  // The baseline is measured before and after the migration; the mean of
  // the two is what the migration is compared with.
  const uint64_t baseline_bytes = std::min<uint64_t>(*mem, 2ull << 30);
  std::vector<LoopbackRate> baselines;
  if (o.tcp_baseline) {
    Result<LoopbackRate> r = MeasureLoopback(baseline_bytes);
    if (!r.has_value()) return Fail(r.error());
    baselines.push_back(*r);
    say(fmt::format("loopback TCP: {:.0f} MiB/s", r->bytes_per_sec / 1048576.0));
  }

  // The destination: receive, then run at once (as `faultline run
  // --incoming` does), noting when its vCPUs were started. Post-copy: the
  // engine starts them at the switchover and Run returns once every page is
  // here.
  const bool postcopy = *mode == control::MigrationMode::kPostcopy;
  std::unique_ptr<migration::DestinationVm> target;
  std::unique_ptr<migration::PostcopyDestinationVm> postcopy_target;
  std::unique_ptr<migration::MigrationDestination> precopy_receiver;
  std::unique_ptr<migration::PostcopyDestination> postcopy_receiver;
  nlohmann::json calibration;  // --installer auto's trials
  if (postcopy) {
    migration::PostcopyVmOptions vm_options;
    vm_options.realtime_priority = o.realtime_priority;
    Result<paging::InstallerKind> kind =
        ChooseInstaller(o.installer, config.backing, &calibration, o.json);
    if (!kind.has_value()) return Fail(kind.error().WithContext("--installer"));
    vm_options.installer = *kind;
    postcopy_target = vmm::MakePostcopyDestinationVm(**destination, vm_options);
    migration::DestinationOptions receiver_options;
    receiver_options.realtime_priority = o.realtime_priority;
    postcopy_receiver =
        std::make_unique<migration::PostcopyDestination>(*postcopy_target, receiver_options);
  } else {
    target = vmm::MakeDestinationVm(**destination);
    precopy_receiver =
        std::make_unique<migration::MigrationDestination>(*target, migration::DestinationOptions{});
  }
  auto cancel_receiver = [&] {
    if (postcopy_receiver) postcopy_receiver->Cancel();
    if (precopy_receiver) precopy_receiver->Cancel();
  };
  Result<migration::DestinationStats> received = Error("not received");
  Result<migration::PostcopyDestinationStats> postcopy_received = Error("not received");
  Status dest_start = Status::Ok();
  std::optional<Clock::time_point> dest_running_at;
  std::thread dest_thread([&] {
    if (postcopy) {
      postcopy_received = postcopy_receiver->Run(**listener);
      if (!postcopy_received.has_value()) {
        received = postcopy_received.error();
        return;
      }
      const migration::PostcopyDestinationStats& p = *postcopy_received;
      dest_running_at = p.vm_started_at;
      migration::DestinationStats d;
      d.passes = p.passes;
      d.bytes_received = p.bytes_received;
      d.total = std::chrono::duration_cast<std::chrono::microseconds>(p.total);
      received = d;
      return;
    }
    received = precopy_receiver->Run(**listener);
    if (!received.has_value()) return;
    dest_start = (*destination)->Start();
    if (dest_start.ok()) dest_running_at = Clock::now();
  });

  control::MigrateRequest request;
  request.to = {"127.0.0.1", port};
  request.mode = *mode;
  request.channels = o.channels;
  request.downtime_ms = o.downtime_ms;
  request.precopy_passes = o.precopy_passes;
  if (postcopy) {
    say(
        fmt::format("migrating to {} over {} page channel(s) and a priority channel: {} "
                    "pre-copy pass(es), then post-copy",
                    request.to.ToString(), o.channels, o.precopy_passes));
  } else {
    say(fmt::format("migrating to {} over {} page channel(s), downtime target {} ms",
                    request.to.ToString(), o.channels, o.downtime_ms));
  }
  const auto migrate_start = Clock::now();
  const double cpu_start = ProcessCpuMs();
  if (Status s = (*live)->migration().Start(request); !s.ok()) {
    cancel_receiver();
    dest_thread.join();
    return Fail(s);
  }
  LiveVm::End end = (*live)->Wait(Clock::now() + std::chrono::minutes(10), "faultline demo");
  const control::MigrationStatus m = (*live)->migration_status();
  const std::optional<Clock::time_point> paused_at = (*live)->paused_at();
  if (end != LiveVm::End::kMigrated) cancel_receiver();
  dest_thread.join();
  const auto migrated_at = Clock::now();
  const double migration_cpu_ms = ProcessCpuMs() - cpu_start;
  if (end != LiveVm::End::kMigrated) {
    // Wait has said why; the guest ran on here: let it verify and show that.
    if (o.idle) (*source)->Resume();
    (*source)->SetGuestCommand(FL_CMD_STOP);
    Result<GuestReport> r = (*source)->Wait(std::chrono::minutes(5));
    if (r.has_value()) {
      fmt::print(stderr,
                 "faultline demo: the guest stayed on the source: {} pages verified, {} bad\n",
                 r->pages_verified(), r->bad_page_count());
    }
    if (!received.has_value()) {
      fmt::print(stderr, "faultline demo: destination: {}\n", received.error().ToString());
    }
    return Fail(Error("the migration did not complete ({})", control::MigrationPhaseName(m.phase)));
  }
  live->reset();
  (*source)->Stop();
  source->reset();  // the guest lives on the destination only now
  if (!received.has_value()) return Fail(received.error().WithContext("destination"));
  if (!dest_start.ok()) return Fail(dest_start.WithContext("destination VM"));
  const double pause_ms = paused_at && dest_running_at ? Ms(*dest_running_at - *paused_at) : -1;
  say(
      fmt::format("migrated in {:.0f} ms; the guest runs on the destination, switchover pause "
                  "{:.1f} ms",
                  Ms(migrated_at - migrate_start), pause_ms));

  if (o.tcp_baseline) {
    if (o.idle) (*destination)->Pause();  // the same conditions as the first time
    Result<LoopbackRate> r = MeasureLoopback(baseline_bytes);
    if (o.idle) (*destination)->Resume();
    if (!r.has_value()) return Fail(r.error());
    baselines.push_back(*r);
    say(fmt::format("loopback TCP: {:.0f} MiB/s", r->bytes_per_sec / 1048576.0));
  }
  std::optional<LoopbackRate> loopback;
  if (!baselines.empty()) {
    loopback = LoopbackRate{(baselines[0].bytes_per_sec + baselines[1].bytes_per_sec) / 2,
                            (baselines[0].cpu_ms_per_gib + baselines[1].cpu_ms_per_gib) / 2};
  }

  // The guest keeps writing on the destination for a while, then verifies.
  std::this_thread::sleep_for(std::chrono::milliseconds(static_cast<int64_t>(o.after_s * 1000)));
  (*destination)->SetGuestCommand(FL_CMD_STOP);
  Result<GuestReport> report = (*destination)->Wait(std::chrono::minutes(10));
  if (!report.has_value()) return Fail(report.error().WithContext("destination guest"));
  const auto verified_at = Clock::now();

  const migration::DestinationStats& d = *received;
  // Post-copy figures (none for pre-copy).
  uint64_t precopy_pages = d.data_pages + d.zero_pages;
  std::string installer = "";
  migration::PostcopyDestinationStats pc;
  if (postcopy) {
    pc = *postcopy_received;
    precopy_pages = pc.precopy_pages;
    installer = paging::InstallerName(postcopy_target->installer());
  }
  const paging::PagingStats& paging = pc.paging;
  const uint64_t pages_verified = report->pages_verified();
  const uint64_t bad_pages = report->bad_page_count();
  // Every page the guest wrote on the source must have been checked here.
  const bool all_verified = pages_verified == workload_pages;
  const bool ok = report->success() && bad_pages == 0 && all_verified;
  const double total_ms = Ms(migrated_at - migrate_start);
  const double sent_gib = static_cast<double>(d.bytes_received) / (1ull << 30);
  const double wire_ms =
      loopback ? static_cast<double>(d.bytes_received) / loopback->bytes_per_sec * 1000.0 : 0;

  if (o.json) {
    nlohmann::json j = {
        {"mode", o.mode},
        {"backing", BackingName(config.backing)},
        {"accel", accel},
        {"dirty", dirty},
        {"mem_bytes", *mem},
        {"vcpus", o.vcpus},
        {"channels", o.channels},
        {"prealloc", o.prealloc},
        {"guest_write_rate_mibps", rate},
        {"downtime_target_ms", o.downtime_ms},
        {"total_ms", total_ms},
        {"switchover_pause_ms", pause_ms},
        {"bytes_sent", d.bytes_received},
        // Pre-copy only (post-copy counts pages by how they came, below).
        {"page_bytes_sent", postcopy ? nlohmann::json() : nlohmann::json(d.data_pages * 4096)},
        {"data_pages", postcopy ? nlohmann::json() : nlohmann::json(d.data_pages)},
        {"zero_pages", postcopy ? nlohmann::json() : nlohmann::json(d.zero_pages)},
        {"precopy_pages", precopy_pages},
        {"passes", d.passes},
        {"installer", postcopy ? nlohmann::json(installer) : nlohmann::json()},
        {"installer_calibration", calibration},
        {"workload_pages", workload_pages},
        {"pages_verified", pages_verified},
        {"bad_pages", bad_pages},
        {"success", ok},
        {"demo_ms", Ms(verified_at - demo_start)},
    };
    if (postcopy) {
      j.update(control::PostcopyFiguresJson(pc));
    } else {
      // The pre-copy engine's: its pause until the destination acknowledged.
      j["engine_downtime_ms"] = m.downtime_ms ? nlohmann::json(*m.downtime_ms) : nlohmann::json();
    }
    j["migration_cpu_ms"] = migration_cpu_ms;
    if (loopback) {
      j["tcp_loopback_bytes_per_sec"] = loopback->bytes_per_sec;
      j["tcp_loopback_runs_bytes_per_sec"] = {baselines[0].bytes_per_sec,
                                              baselines[1].bytes_per_sec};
      j["wire_time_ms"] = wire_ms;
      j["total_over_wire_time"] = total_ms / wire_ms;
      j["tcp_loopback_cpu_ms_per_gib"] = loopback->cpu_ms_per_gib;
      j["migration_cpu_ms_per_gib"] = migration_cpu_ms / sent_gib;
      j["cpu_over_loopback_cpu"] = migration_cpu_ms / sent_gib / loopback->cpu_ms_per_gib;
    }
    fmt::print("{}\n", j.dump());
  } else {
    fmt::print("live migration ({}), {} MiB guest, {} vCPUs, {} backing, {} channel(s), {}\n",
               o.mode, *mem >> 20, o.vcpus, BackingName(config.backing), o.channels, accel);
    fmt::print("  total time        {:9.1f} ms\n", total_ms);
    fmt::print("  switchover pause  {:9.1f} ms   (source stopped -> destination running)\n",
               pause_ms);
    if (postcopy) {
      fmt::print("  bytes sent        {:9.1f} MiB\n",
                 static_cast<double>(d.bytes_received) / 1048576.0);
    } else {
      fmt::print("  bytes sent        {:9.1f} MiB  ({} data pages, {} zero pages as markers)\n",
                 static_cast<double>(d.bytes_received) / 1048576.0, d.data_pages, d.zero_pages);
    }
    fmt::print("  passes            {:9}\n", d.passes);
    if (postcopy) {
      fmt::print("  pre-copy pages    {:9}     (the rest came after the switchover)\n",
                 precopy_pages);
      fmt::print("  pages demanded    {:9}     (by the destination's faults)\n",
                 pc.network.pages_demanded);
      fmt::print("  pages pushed      {:9}     (in the background)\n", pc.network.pages_pushed);
      fmt::print("  fault latency     {:9.0f} us p50, {:.0f} us p99 ({} faults, {} installer)\n",
                 paging.latency.p50_us, paging.latency.p99_us, paging.faults, installer);
      for (size_t i = 0; i < paging.vcpu_latency.size(); ++i) {
        fmt::print(
            "    vcpu {}          {:9.0f} us p50, {:.0f} us p99, {:.0f} us max ({} faults)\n", i,
            paging.vcpu_latency[i].p50_us, paging.vcpu_latency[i].p99_us,
            paging.vcpu_latency[i].max_us, paging.vcpu_faults[i]);
      }
      fmt::print(
          "  request latency   {:9.0f} us p50, {:.0f} us p99 (network: request -> data in "
          "place)\n",
          pc.network.fault_latency.p50_us, pc.network.fault_latency.p99_us);
      fmt::print("  vCPUs blocked     {:9.1f} ms   (summed over the faults)\n",
                 paging.blocked_seconds() * 1000.0);
    }
    fmt::print("  pages verified    {:9}     (of {} the guest wrote; on the destination)\n",
               pages_verified, workload_pages);
    fmt::print("  wrong pages       {:9}\n", bad_pages);
    if (loopback) {
      fmt::print(
          "  loopback TCP      {:9.0f} MiB/s (mean of {:.0f} before and {:.0f} after): the "
          "bytes alone take {:.1f} ms, total is {:.2f}x that\n",
          loopback->bytes_per_sec / 1048576.0, baselines[0].bytes_per_sec / 1048576.0,
          baselines[1].bytes_per_sec / 1048576.0, wire_ms, total_ms / wire_ms);
      fmt::print("  CPU per GiB sent  {:9.0f} ms   (loopback TCP alone {:.0f} ms: {:.2f}x)\n",
                 migration_cpu_ms / sent_gib, loopback->cpu_ms_per_gib,
                 migration_cpu_ms / sent_gib / loopback->cpu_ms_per_gib);
    }
    fmt::print("{}\n", ok ? "OK: the guest verified every page after the migration"
                          : "FAILED: the guest did not verify correctly on the destination");
  }
  if (!ok && !report->success()) {
    for (size_t i = 0; i < report->vcpus.size(); ++i) {
      const GuestVcpuReport& v = report->vcpus[i];
      if (v.panic) fmt::print(stderr, "faultline demo: vcpu {}: guest {}\n", i, *v.panic);
    }
  } else if (!ok && !all_verified) {
    fmt::print(stderr, "faultline demo: the guest verified {} pages, but had written {}\n",
               pages_verified, workload_pages);
  }
  return ok ? 0 : 1;
}

}  // namespace

void AddDemoCommand(CLI::App& app, Action& action) {
  auto o = std::make_shared<DemoOptions>();
  CLI::App* cmd = app.add_subcommand(
      "demo",
      "Live-migrate a guest that writes random pages to a destination on loopback TCP, and have "
      "it verify all of its memory there");
  cmd->add_option("--guest", o->guest, "Guest ELF image (default: the one the build made)");
  cmd->add_option("--mode", o->mode, "postcopy or precopy")->capture_default_str();
  cmd->add_option("--precopy-passes", o->precopy_passes,
                  "Post-copy: pre-copy passes before the switch (0: at once)")
      ->capture_default_str();
  cmd->add_option("--realtime-priority", o->realtime_priority,
                  "Post-copy: the SCHED_FIFO priority of the threads a guest page fault waits on "
                  "and of the switchover, at both ends; 0 leaves them to the default scheduler")
      ->check(CLI::Range(0, 99))
      ->capture_default_str();
  cmd->add_option("--installer", o->installer,
                  "Post-copy: how the destination installs fetched pages: auto (default: the "
                  "fastest of the backing's candidates, measured at start in ~50 ms), continue, "
                  "move, copy or hole");
  AddAccelOptions(cmd, &o->accel);
  cmd->add_option("--backing", o->backing, "RAM backing: anon, memfd, hugetlb, gmem")
      ->capture_default_str();
  cmd->add_option("--mem", o->mem, "Guest RAM, e.g. 2G")->capture_default_str();
  cmd->add_option("--vcpus", o->vcpus, "Number of vCPUs, 1..8")->capture_default_str();
  cmd->add_option("--channels", o->channels, "Page channels (TCP connections), 1..16")
      ->capture_default_str();
  cmd->add_option("--rate", o->rate_mibps, "The guest's random writes, MiB/s (0: unthrottled)")
      ->capture_default_str();
  cmd->add_flag("--idle", o->idle,
                "An idle guest: after its fill the source's vCPUs are held (PVM cannot halt a "
                "vCPU at CPL3); they run again on the destination");
  cmd->add_option("--downtime-ms", o->downtime_ms, "Downtime target of the pre-copy engine")
      ->capture_default_str();
  cmd->add_option("--after", o->after_s, "Seconds the guest keeps writing on the destination")
      ->capture_default_str();
  cmd->add_flag("--tcp-baseline", o->tcp_baseline,
                "Also measure plain loopback TCP in the same run and compare the total time "
                "with the time the bytes alone take");
  cmd->add_flag("--prealloc", o->prealloc,
                "Allocate the destination's RAM before migrating (no page faults on receipt)");
  cmd->add_flag("--json", o->json, "Print one JSON object on stdout");
  cmd->add_flag("--verbose", o->verbose, "Echo both guests' consoles");
  cmd->footer("Exit status: 0 when the migration completed and the guest verified every page.");
  cmd->callback([o, &action] { action = [o] { return Demo(*o); }; });
}

}  // namespace faultline::cli
