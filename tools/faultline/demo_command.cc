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
// `faultline migrate`) dials a real SocketListener, and control's
// IncomingControl (what `faultline run --incoming` receives with) runs
// MigrationDestination (pre-copy) or PostcopyDestination (post-copy, the
// default) into guest memory and starts the guest. The acceptance tests run
// the same with separate processes.
//
// Post-copy: after one pre-copy pass the source stops, the destination runs
// the guest at once and its missing pages fault and are fetched over the
// network while the rest is pushed; the report adds the guest-observed
// fault latency (the pager's: fault read -> installed and woken; p50/p99,
// overall and per vCPU), the vCPUs' blocked time and pages demanded
// against pages pushed (src/control/destination.h). The pre-copy engine's
// downtime (engine_downtime_ms) is left out in post-copy: the source's
// pause ends when the destination runs the guest, which
// switchover_pause_ms measures.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "guest/abi.h"
#include "src/control/destination.h"
#include "src/control/incoming.h"
#include "src/control/source.h"
#include "src/migration/tls_transport.h"
#include "src/vmm/vm.h"
#include "tools/faultline/cli_util.h"
#include "tools/faultline/commands.h"
#include "tools/faultline/incoming_vm.h"
#include "tools/faultline/live_vm.h"
#include "tools/faultline/loopback.h"

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
  TlsOptions tls;  // both ends use the same directory
};

int Fail(const Status& status) {
  fmt::print(stderr, "faultline demo: error: {}\n", status.ToString());
  return 1;
}

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

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

// What the report shows, derived from what the run measured.
struct Figures {
  bool postcopy = false;
  // What the destination received; pre-copy's page counts, or post-copy's.
  uint32_t passes = 0;
  uint64_t bytes_sent = 0;
  uint64_t data_pages = 0;
  uint64_t zero_pages = 0;
  uint64_t precopy_pages = 0;
  migration::PostcopyDestinationStats pc;  // post-copy only
  double total_ms = 0;
  double pause_ms = -1;
  double migration_cpu_ms = 0;
  double demo_ms = 0;
  uint64_t workload_pages = 0;
  uint64_t pages_verified = 0;
  uint64_t bad_pages = 0;
  bool all_verified = false;  // every page the guest wrote on the source was checked here
  bool ok = false;
  std::optional<LoopbackRate> loopback;  // with --tcp-baseline
  double wire_ms = 0;                    // the bytes alone at the loopback rate
  double sent_gib = 0;
};

// One demo: two VMs in this process, the migration between them, and the
// destination guest's verdict.
class Demo {
 public:
  explicit Demo(const DemoOptions& o) : o_(o) {}
  // The destination's pager goes before its VM: stop the VM first.
  ~Demo() {
    if (destination_) destination_->Stop();
  }

  int Run();

 private:
  Status Configure();
  // Both VMs; the source's guest runs until its memory is filled.
  Status StartSource();
  Status AwaitFill();
  // The destination's engine (as `faultline run --incoming` makes it) and
  // the first loopback baseline.
  Status PrepareDestination();
  Result<LoopbackRate> MeasureBaseline();
  Status Migrate();
  control::MigrateRequest Request() const;
  // The migration did not complete: the guest goes on and verifies here.
  Status StayedOnSource(const Result<control::IncomingResult>& received);
  // The guest keeps writing on the destination for a while, then verifies.
  Status Verify();
  // Source stopped -> destination running (-1: not measured).
  double PauseMs() const { return paused_at_ ? Ms(received_.started_at - *paused_at_) : -1; }
  Figures Measured() const;
  void PrintJson(const Figures& f) const;
  void PrintText(const Figures& f) const;
  int Verdict(const Figures& f) const;
  void Say(std::string_view text) const {
    if (!o_.json) fmt::print(stderr, "demo: {}\n", text);
  }

  const DemoOptions& o_;
  control::MigrationMode mode_ = control::MigrationMode::kPostcopy;
  vmm::VmConfig config_;       // the source's
  vmm::VmConfig dest_config_;  // the destination's: nothing booted
  uint32_t rate_ = 0;          // the guest's random writes, MiB/s
  Clock::time_point demo_start_;
  std::unique_ptr<vmm::Vm> source_;
  std::unique_ptr<vmm::Vm> destination_;
  migration::TransportOptions transport_;  // --tls-dir's, both ends
  std::unique_ptr<migration::Acceptor> listener_;
  std::unique_ptr<LiveVm> live_;
  std::unique_ptr<IncomingVmAdapter> adapter_;
  std::unique_ptr<control::IncomingControl> incoming_;
  const char* accel_ = "";
  const char* dirty_ = "";
  uint64_t workload_pages_ = 0;
  std::vector<LoopbackRate> baselines_;
  // The migration.
  Clock::time_point migrate_start_;
  Clock::time_point migrated_at_;
  double migration_cpu_ms_ = 0;
  control::MigrationStatus migration_;  // the source's final status
  std::optional<Clock::time_point> paused_at_;
  control::IncomingResult received_;
  GuestReport report_;  // the destination guest's
  Clock::time_point verified_at_;
};

int Demo::Run() {
  if (Status s = Configure(); !s.ok()) return Fail(s);
  demo_start_ = Clock::now();
  if (Status s = StartSource(); !s.ok()) return Fail(s);
  if (Status s = PrepareDestination(); !s.ok()) return Fail(s);
  if (Status s = Migrate(); !s.ok()) return Fail(s);
  if (Status s = Verify(); !s.ok()) return Fail(s);
  const Figures f = Measured();
  if (o_.json) {
    PrintJson(f);
  } else {
    PrintText(f);
  }
  return Verdict(f);
}

Status Demo::Configure() {
  Result<control::MigrationMode> mode = control::ParseMigrationMode(o_.mode);
  if (!mode.has_value()) return Status(0, mode.error().message()).WithContext("--mode");
  mode_ = *mode;
  // Before anything boots: say so at once if this build cannot do it.
  if (Status s = control::SourceMigrationControl::CheckMode(mode_); !s.ok()) {
    return Status(0, s.message()).WithContext("--mode");
  }
  if (o_.channels < 1 || o_.channels > control::kMaxMigrationChannels) {
    return Error("--channels: {} is out of range 1..{}", o_.channels,
                 control::kMaxMigrationChannels);
  }
  RETURN_IF_ERROR(ApplyMachineOptions(o_.guest, o_.mem, o_.vcpus, o_.backing, o_.accel, config_));
  rate_ = o_.idle ? 1 : o_.rate_mibps;
  // The guest writes until the VMM says stop (on the destination), then
  // verifies every page against its ledger.
  config_.guest_args =
      fmt::format("workload=fill,random,verify until_command=1 rate={} quiet=1", rate_);
  if (o_.verbose) {
    config_.serial = [](const std::string& line) { fmt::print(stderr, "guest| {}\n", line); };
  }
  RETURN_IF_ERROR(vmm::ValidateConfig(config_));
  dest_config_ = config_;
  dest_config_.boot = false;
  if (o_.verbose) {
    dest_config_.serial = [](const std::string& line) {
      fmt::print(stderr, "destination guest| {}\n", line);
    };
  }
  return Status::Ok();
}

Status Demo::StartSource() {
  Result<std::unique_ptr<vmm::Vm>> source = vmm::Vm::Create(config_);
  if (!source.has_value()) return source.error().WithContext("source VM");
  source_ = std::move(*source);
  accel_ = hv::AccelName(source_->accel());
  dirty_ = DirtyLogModeName(source_->dirty_mode());
  Result<std::unique_ptr<vmm::Vm>> destination = vmm::Vm::Create(dest_config_);
  if (!destination.has_value()) return destination.error().WithContext("destination VM");
  destination_ = std::move(*destination);
  ASSIGN_OR_RETURN(transport_, TransportFor(o_.tls, "demo"));
  Result<std::unique_ptr<migration::Acceptor>> listener =
      migration::MakeAcceptor({"tcp", "127.0.0.1", 0}, transport_);
  if (!listener.has_value()) return listener.error().WithContext("destination");
  listener_ = std::move(*listener);

  if (Status s = source_->Start(); !s.ok()) return s.WithContext("source VM");
  LiveVm::Options live;
  live.realtime_priority = o_.realtime_priority;
  live.transport = transport_;
  ASSIGN_OR_RETURN(live_, LiveVm::Create(*source_, std::move(live)));
  Say(fmt::format("source VM: {} MiB, {} vCPUs, {} backing; the guest fills its memory",
                  config_.mem_size >> 20, o_.vcpus, BackingName(config_.backing)));
  RETURN_IF_ERROR(AwaitFill());
  for (const GuestVcpuReport& v : source_->report().vcpus) workload_pages_ += v.pages;
  return Status::Ok();
}

Status Demo::AwaitFill() {
  // Fill at first-touch speed on these machines is some hundreds of MiB/s
  // per vCPU; give it plenty.
  const auto fill_deadline = Clock::now() + std::chrono::seconds(60 + (config_.mem_size >> 26));
  while (!FillDone(source_->report(), o_.vcpus)) {
    if (source_->vcpus().WaitFinished(std::chrono::milliseconds(20))) {
      Result<GuestReport> r = source_->Wait(std::chrono::milliseconds(0));
      return r.has_value() ? Error("the source guest ended before its fill was done") : r.error();
    }
    if (Clock::now() > fill_deadline) return Error("the source guest's fill timed out");
  }
  return Status::Ok();
}

Status Demo::PrepareDestination() {
  if (o_.idle) {
    // An idle guest: on a real host its vCPUs would sit in HLT, using no
    // CPU and dirtying nothing. The test guest cannot halt at CPL3 (PVM), so
    // its vCPUs are held instead (kick-and-hold, which the engine's own
    // pause nests in); the destination runs them.
    source_->Pause();
  }
  // The destination as `faultline run --incoming` makes it: with
  // --prealloc its RAM allocated before the migration starts (as a VMM that
  // preallocates guest memory would), its engine and, for post-copy, its
  // installer chosen. It receives, then runs the guest at once (post-copy:
  // the engine starts it at the switchover).
  control::IncomingOptions options;
  options.mode = mode_;
  options.bytes_total = dest_config_.mem_size;
  options.realtime_priority = o_.realtime_priority;
  options.installer = o_.installer;
  options.prealloc = o_.prealloc;
  options.quiet = o_.json;
  incoming_ = std::make_unique<control::IncomingControl>(*listener_, std::move(options));
  adapter_ = std::make_unique<IncomingVmAdapter>(*destination_);
  RETURN_IF_ERROR(incoming_->Prepare(*adapter_));
  // The baseline is measured before and after the migration; the mean of
  // the two is what the migration is compared with.
  if (!o_.tcp_baseline) return Status::Ok();
  ASSIGN_OR_RETURN(LoopbackRate rate, MeasureBaseline());
  baselines_.push_back(rate);
  return Status::Ok();
}

Result<LoopbackRate> Demo::MeasureBaseline() {
  ASSIGN_OR_RETURN(LoopbackRate r,
                   MeasureLoopback(std::min<uint64_t>(config_.mem_size, 2ull << 30)));
  Say(fmt::format("loopback TCP: {:.0f} MiB/s", r.bytes_per_sec / 1048576.0));
  return r;
}

control::MigrateRequest Demo::Request() const {
  control::MigrateRequest request;
  // The listener's own address, which it printed itself: it parses.
  request.to = {"127.0.0.1", migration::ParseAddress(listener_->address())->port};
  request.mode = mode_;
  request.channels = o_.channels;
  request.downtime_ms = o_.downtime_ms;
  request.precopy_passes = o_.precopy_passes;
  return request;
}

Status Demo::Migrate() {
  Result<control::IncomingResult> received = Error("not received");
  std::thread dest_thread([&] { received = incoming_->Run(); });
  const control::MigrateRequest request = Request();
  if (mode_ == control::MigrationMode::kPostcopy) {
    Say(
        fmt::format("migrating to {} over {} page channel(s) and a priority channel: {} "
                    "pre-copy pass(es), then post-copy",
                    request.to.ToString(), o_.channels, o_.precopy_passes));
  } else {
    Say(fmt::format("migrating to {} over {} page channel(s), downtime target {} ms",
                    request.to.ToString(), o_.channels, o_.downtime_ms));
  }
  migrate_start_ = Clock::now();
  const double cpu_start = ProcessCpuMs();
  if (Status s = live_->migration().Start(request); !s.ok()) {
    incoming_->Cancel();
    dest_thread.join();
    return s;
  }
  LiveVm::End end = live_->Wait(Clock::now() + std::chrono::minutes(10), "faultline demo");
  migration_ = live_->migration_status();
  paused_at_ = live_->paused_at();
  if (end != LiveVm::End::kMigrated) incoming_->Cancel();
  dest_thread.join();
  migrated_at_ = Clock::now();
  migration_cpu_ms_ = ProcessCpuMs() - cpu_start;
  if (end != LiveVm::End::kMigrated) return StayedOnSource(received);
  live_.reset();
  source_->Stop();
  source_.reset();  // the guest lives on the destination only now
  if (!received.has_value()) return received.error().WithContext("destination");
  received_ = std::move(*received);
  Say(fmt::format(
      "migrated in {:.0f} ms; the guest runs on the destination, switchover pause {:.1f} ms",
      Ms(migrated_at_ - migrate_start_), PauseMs()));
  return Status::Ok();
}

Status Demo::StayedOnSource(const Result<control::IncomingResult>& received) {
  // Wait has said why; the guest ran on here: let it verify and show that.
  if (o_.idle) source_->Resume();
  source_->SetGuestCommand(FL_CMD_STOP);
  Result<GuestReport> r = source_->Wait(std::chrono::minutes(5));
  if (r.has_value()) {
    fmt::print(stderr,
               "faultline demo: the guest stayed on the source: {} pages verified, {} bad\n",
               r->pages_verified(), r->bad_page_count());
  }
  if (!received.has_value()) {
    fmt::print(stderr, "faultline demo: destination: {}\n", received.error().ToString());
  }
  return Error("the migration did not complete ({})",
               control::MigrationPhaseName(migration_.phase));
}

Status Demo::Verify() {
  if (o_.tcp_baseline) {
    if (o_.idle) destination_->Pause();  // the same conditions as the first time
    Result<LoopbackRate> r = MeasureBaseline();
    if (o_.idle) destination_->Resume();
    if (!r.has_value()) return r.error();
    baselines_.push_back(*r);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(static_cast<int64_t>(o_.after_s * 1000)));
  destination_->SetGuestCommand(FL_CMD_STOP);
  Result<GuestReport> report = destination_->Wait(std::chrono::minutes(10));
  if (!report.has_value()) return report.error().WithContext("destination guest");
  report_ = std::move(*report);
  verified_at_ = Clock::now();
  return Status::Ok();
}

Figures Demo::Measured() const {
  Figures f;
  f.postcopy = received_.postcopy.has_value();
  if (received_.precopy) {
    const migration::DestinationStats& d = *received_.precopy;
    f.passes = d.passes;
    f.bytes_sent = d.bytes_received;
    f.data_pages = d.data_pages;
    f.zero_pages = d.zero_pages;
    f.precopy_pages = d.data_pages + d.zero_pages;
  } else if (received_.postcopy) {
    f.pc = *received_.postcopy;
    f.passes = f.pc.passes;
    f.bytes_sent = f.pc.bytes_received;
    f.precopy_pages = f.pc.precopy_pages;
  }
  f.total_ms = Ms(migrated_at_ - migrate_start_);
  f.pause_ms = PauseMs();
  f.migration_cpu_ms = migration_cpu_ms_;
  f.demo_ms = Ms(verified_at_ - demo_start_);
  f.workload_pages = workload_pages_;
  f.pages_verified = report_.pages_verified();
  f.bad_pages = report_.bad_page_count();
  f.all_verified = f.pages_verified == f.workload_pages;
  f.ok = report_.success() && f.bad_pages == 0 && f.all_verified;
  f.sent_gib = static_cast<double>(f.bytes_sent) / (1ull << 30);
  if (baselines_.size() == 2) {
    f.loopback = Mean(baselines_);
    f.wire_ms = static_cast<double>(f.bytes_sent) / f.loopback->bytes_per_sec * 1000.0;
  }
  return f;
}

void Demo::PrintJson(const Figures& f) const {
  nlohmann::json j = {
      {"mode", o_.mode},
      {"backing", BackingName(config_.backing)},
      {"accel", accel_},
      {"dirty", dirty_},
      {"mem_bytes", config_.mem_size},
      {"vcpus", o_.vcpus},
      {"channels", o_.channels},
      {"tls", transport_.tls ? nlohmann::json(transport_.tls->Describe()) : nlohmann::json()},
      {"prealloc", o_.prealloc},
      {"guest_write_rate_mibps", rate_},
      {"downtime_target_ms", o_.downtime_ms},
      {"total_ms", f.total_ms},
      {"switchover_pause_ms", f.pause_ms},
      {"bytes_sent", f.bytes_sent},
      // Pre-copy only (post-copy counts pages by how they came, below).
      {"page_bytes_sent", f.postcopy ? nlohmann::json() : nlohmann::json(f.data_pages * 4096)},
      {"data_pages", f.postcopy ? nlohmann::json() : nlohmann::json(f.data_pages)},
      {"zero_pages", f.postcopy ? nlohmann::json() : nlohmann::json(f.zero_pages)},
      {"precopy_pages", f.precopy_pages},
      {"passes", f.passes},
      {"installer", f.postcopy ? nlohmann::json(received_.installer) : nlohmann::json()},
      {"installer_calibration", received_.installer_calibration},
      {"workload_pages", f.workload_pages},
      {"pages_verified", f.pages_verified},
      {"bad_pages", f.bad_pages},
      {"success", f.ok},
      {"demo_ms", f.demo_ms},
  };
  if (f.postcopy) {
    j.update(control::PostcopyFiguresJson(f.pc));
  } else {
    // The pre-copy engine's: its pause until the destination acknowledged.
    j["engine_downtime_ms"] =
        migration_.downtime_ms ? nlohmann::json(*migration_.downtime_ms) : nlohmann::json();
  }
  j["migration_cpu_ms"] = f.migration_cpu_ms;
  if (f.loopback) {
    j["tcp_loopback_bytes_per_sec"] = f.loopback->bytes_per_sec;
    j["tcp_loopback_runs_bytes_per_sec"] = {baselines_[0].bytes_per_sec,
                                            baselines_[1].bytes_per_sec};
    j["wire_time_ms"] = f.wire_ms;
    j["total_over_wire_time"] = f.total_ms / f.wire_ms;
    j["tcp_loopback_cpu_ms_per_gib"] = f.loopback->cpu_ms_per_gib;
    j["migration_cpu_ms_per_gib"] = f.migration_cpu_ms / f.sent_gib;
    j["cpu_over_loopback_cpu"] = f.migration_cpu_ms / f.sent_gib / f.loopback->cpu_ms_per_gib;
  }
  fmt::print("{}\n", j.dump());
}

// Post-copy's lines of the report for people.
void PrintPostcopyText(const Figures& f, const std::string& installer) {
  const paging::PagingStats& paging = f.pc.paging;
  fmt::print("  pre-copy pages    {:9}     (the rest came after the switchover)\n",
             f.precopy_pages);
  fmt::print("  pages demanded    {:9}     (by the destination's faults)\n",
             f.pc.network.pages_demanded);
  fmt::print("  pages pushed      {:9}     (in the background)\n", f.pc.network.pages_pushed);
  fmt::print("  fault latency     {:9.0f} us p50, {:.0f} us p99 ({} faults, {} installer)\n",
             paging.latency.p50_us, paging.latency.p99_us, paging.faults, installer);
  for (size_t i = 0; i < paging.vcpu_latency.size(); ++i) {
    fmt::print("    vcpu {}          {:9.0f} us p50, {:.0f} us p99, {:.0f} us max ({} faults)\n", i,
               paging.vcpu_latency[i].p50_us, paging.vcpu_latency[i].p99_us,
               paging.vcpu_latency[i].max_us, paging.vcpu_faults[i]);
  }
  fmt::print(
      "  request latency   {:9.0f} us p50, {:.0f} us p99 (network: request -> data in "
      "place)\n",
      f.pc.network.fault_latency.p50_us, f.pc.network.fault_latency.p99_us);
  fmt::print("  vCPUs blocked     {:9.1f} ms   (summed over the faults)\n",
             paging.blocked_seconds() * 1000.0);
}

void Demo::PrintText(const Figures& f) const {
  fmt::print("live migration ({}), {} MiB guest, {} vCPUs, {} backing, {} channel(s), {}\n",
             o_.mode, config_.mem_size >> 20, o_.vcpus, BackingName(config_.backing), o_.channels,
             accel_);
  fmt::print("  total time        {:9.1f} ms\n", f.total_ms);
  fmt::print("  switchover pause  {:9.1f} ms   (source stopped -> destination running)\n",
             f.pause_ms);
  if (f.postcopy) {
    fmt::print("  bytes sent        {:9.1f} MiB\n", static_cast<double>(f.bytes_sent) / 1048576.0);
  } else {
    fmt::print("  bytes sent        {:9.1f} MiB  ({} data pages, {} zero pages as markers)\n",
               static_cast<double>(f.bytes_sent) / 1048576.0, f.data_pages, f.zero_pages);
  }
  fmt::print("  passes            {:9}\n", f.passes);
  if (f.postcopy) PrintPostcopyText(f, received_.installer);
  fmt::print("  pages verified    {:9}     (of {} the guest wrote; on the destination)\n",
             f.pages_verified, f.workload_pages);
  fmt::print("  wrong pages       {:9}\n", f.bad_pages);
  if (f.loopback) {
    fmt::print(
        "  loopback TCP      {:9.0f} MiB/s (mean of {:.0f} before and {:.0f} after): the "
        "bytes alone take {:.1f} ms, total is {:.2f}x that\n",
        f.loopback->bytes_per_sec / 1048576.0, baselines_[0].bytes_per_sec / 1048576.0,
        baselines_[1].bytes_per_sec / 1048576.0, f.wire_ms, f.total_ms / f.wire_ms);
    fmt::print("  CPU per GiB sent  {:9.0f} ms   (loopback TCP alone {:.0f} ms: {:.2f}x)\n",
               f.migration_cpu_ms / f.sent_gib, f.loopback->cpu_ms_per_gib,
               f.migration_cpu_ms / f.sent_gib / f.loopback->cpu_ms_per_gib);
  }
  fmt::print("{}\n", f.ok ? "OK: the guest verified every page after the migration"
                          : "FAILED: the guest did not verify correctly on the destination");
}

int Demo::Verdict(const Figures& f) const {
  if (!f.ok && !report_.success()) {
    for (size_t i = 0; i < report_.vcpus.size(); ++i) {
      const GuestVcpuReport& v = report_.vcpus[i];
      if (v.panic) fmt::print(stderr, "faultline demo: vcpu {}: guest {}\n", i, *v.panic);
    }
  } else if (!f.ok && !f.all_verified) {
    fmt::print(stderr, "faultline demo: the guest verified {} pages, but had written {}\n",
               f.pages_verified, f.workload_pages);
  }
  return f.ok ? 0 : 1;
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
  AddTlsOptions(cmd, &o->tls);
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
  cmd->callback([o, &action] { action = [o] { return Demo(*o).Run(); }; });
}

}  // namespace faultline::cli
