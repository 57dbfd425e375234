#include "tools/faultline/live_vm.h"

#include <algorithm>
#include <cstdio>
#include <thread>
#include <utility>

#include <fmt/format.h>

#include "src/control/args.h"
#include "src/control/migration.h"
#include "src/control/snapshot.h"
#include "src/vmm/vm_adapter.h"

namespace faultline::cli {

// The vm_adapter's SourceVm, noting when the engine pauses the VM: the
// start of the switchover pause the demo reports.
class LiveVm::TimedSource final : public migration::SourceVm {
 public:
  explicit TimedSource(vmm::Vm& vm) : inner_(vmm::MakeSourceVm(vm)) {}

  std::vector<std::shared_ptr<RamBlock>> blocks() override { return inner_->blocks(); }
  migration::HelloAccel accelerator() const override { return inner_->accelerator(); }
  Status StartDirtyTracking() override { return inner_->StartDirtyTracking(); }
  Status StopDirtyTracking() override { return inner_->StopDirtyTracking(); }
  Status TakeDirty(const RamBlock& block, DirtyBitmap& out) override {
    return inner_->TakeDirty(block, out);
  }
  // Stamped before the vCPUs are kicked: the pause counts from the moment
  // the stop was asked for, however long the kick-and-hold takes.
  void Pause() override {
    paused_at_.store(Clock::now().time_since_epoch().count(), std::memory_order_release);
    inner_->Pause();
  }
  void Resume() override { inner_->Resume(); }
  Result<std::vector<std::vector<uint8_t>>> SaveVcpus() override { return inner_->SaveVcpus(); }
  uint32_t vcpu_count() const override { return inner_->vcpu_count(); }
  Result<std::vector<migration::DeviceBlob>> SaveDevices() override {
    return inner_->SaveDevices();
  }

  std::optional<Clock::time_point> paused_at() const {
    auto ticks = paused_at_.load(std::memory_order_acquire);
    if (ticks == 0) return std::nullopt;
    return Clock::time_point(Clock::duration(ticks));
  }

 private:
  std::unique_ptr<migration::SourceVm> inner_;
  std::atomic<Clock::rep> paused_at_{0};
};

// Forwards to the engine; remembers whether a client has been told that the
// migration ended, so that the VMM does not vanish before `faultline
// migrate` has seen "completed".
class LiveVm::SeenControl final : public control::MigrationControl {
 public:
  SeenControl(std::shared_ptr<control::MigrationControl> inner, LiveVm& owner)
      : inner_(std::move(inner)), owner_(owner) {}

  Status Start(const control::MigrateRequest& request) override {
    // The engine refuses a second migration itself; this also refuses one
    // beside a snapshot, or of memory a lazy restore has not brought in.
    sys::MutexLock lock(owner_.exclusive_mu_);
    RETURN_IF_ERROR(owner_.MayStartLocked("a migration"));
    seen_terminal_.store(false);
    return inner_->Start(request);
  }
  control::MigrationStatus Query() override {
    control::MigrationStatus s = inner_->Query();
    if (control::IsTerminal(s.phase)) seen_terminal_.store(true);
    return s;
  }
  Status Cancel() override { return inner_->Cancel(); }
  Status Resume(const std::optional<control::MigrationTarget>& to) override {
    return inner_->Resume(to);
  }
  Status StartPostcopy() override { return inner_->StartPostcopy(); }

  bool seen_terminal() const { return seen_terminal_.load(); }

 private:
  std::shared_ptr<control::MigrationControl> inner_;
  LiveVm& owner_;
  std::atomic<bool> seen_terminal_{false};
};

LiveVm::LiveVm(vmm::Vm& vm) : vm_(vm), started_(Clock::now()) {}

LiveVm::~LiveVm() {
  // The socket first: its handlers call into the engine.
  if (server_) server_->Stop();
}

Result<std::unique_ptr<LiveVm>> LiveVm::Create(vmm::Vm& vm, Options o) {
  std::unique_ptr<LiveVm> live(new LiveVm(vm));
  live->source_ = std::make_unique<TimedSource>(vm);
  live->memory_ready_ = std::move(o.memory_ready);
  control::SourceMigrationControl::Options options;
  options.first_link_fault = o.first_link_fault;
  options.realtime_priority = o.realtime_priority;
  options.transport = o.transport;
  options.local_withhold_fds = o.withhold_fds;
  options.transport = o.transport;
  LiveVm* self = live.get();
  options.on_done = [self](migration::SourceOutcome outcome) {
    sys::MutexLock lock(self->mu_);
    self->outcome_ = outcome;
    self->cv_.notify_all();
  };
  live->engine_ =
      std::make_shared<control::SourceMigrationControl>(*live->source_, std::move(options));
  live->control_ = std::make_shared<SeenControl>(live->engine_, *live);
  if (o.control_path.empty() && o.server == nullptr) return live;

  const bool serving = o.server != nullptr;
  if (serving) {
    live->server_ = std::move(o.server);
  } else {
    ASSIGN_OR_RETURN(live->server_, control::ControlServer::Create(o.control_path, o.control));
  }
  live->RegisterCommands(o.incoming);
  if (!serving) RETURN_IF_ERROR(live->server_->Start());
  return live;
}

void LiveVm::RegisterCommands(const std::shared_ptr<control::IncomingStatus>& incoming) {
  control::RegisterMigrationCommands(*server_, control_);
  if (incoming != nullptr) {
    // The migration that brought the guest here, until one takes it away.
    server_->Register("query-migrate",
                      [this, incoming](const nlohmann::json&) -> Result<nlohmann::json> {
                        control::MigrationStatus out = control_->Query();
                        if (out.phase == control::MigrationPhase::kNone) return incoming->Status();
                        return nlohmann::json(out);
                      });
  }
  control::RegisterStatusCommand(*server_, [this] { return CurrentStatus(); });
  control::RegisterSnapshotCommand(
      *server_, *source_, [this] { return StartSnapshot(); }, [this] { SnapshotEnded(); });
}

control::VmStatus LiveVm::CurrentStatus() const {
  control::VmStatus s;
  const vmm::VmConfig& config = vm_.config();
  s.vcpus = config.vcpus;
  s.mem_bytes = config.mem_size;
  s.backing = BackingName(config.backing);
  s.uptime_ms = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started_).count());
  const GuestReport report = vm_.report();
  bool all_done = !report.vcpus.empty();
  for (const GuestVcpuReport& v : report.vcpus) {
    control::GuestVcpuProgress p;
    p.booted = v.booted;
    p.done = v.done;
    if (!v.phases.empty()) {
      p.phase = GuestPhaseName(v.phases.back().phase);
      p.generation = v.phases.back().generation;
      p.ops = v.phases.back().ops;
    }
    all_done = all_done && v.done;
    s.guest.push_back(std::move(p));
  }
  s.pages_verified = report.pages_verified();
  s.bad_pages = report.bad_page_count();
  control::MigrationStatus m = engine_->Query();
  s.migration = m.phase;
  if (m.phase == control::MigrationPhase::kCompleted ||
      m.phase == control::MigrationPhase::kSwitchover ||
      m.phase == control::MigrationPhase::kPostcopy) {
    // Completed: for good, the destination runs the guest; post-copy: the
    // guest runs at the destination from the switchover on.
    s.state = control::VmState::kPaused;
  } else if (all_done) {
    s.state = report.success() ? control::VmState::kFinished : control::VmState::kFailed;
  } else {
    s.state = control::VmState::kRunning;
  }
  return s;
}

Status LiveVm::StartSnapshot() {
  sys::MutexLock lock(exclusive_mu_);
  RETURN_IF_ERROR(MayStartLocked("a snapshot"));
  snapshotting_ = true;
  return Status::Ok();
}

Status LiveVm::MayStartLocked(const char* what) {
  if (snapshotting_) {
    return control::WrongState("a snapshot is being written; start {} once it has ended", what);
  }
  const control::MigrationPhase phase = engine_->Query().phase;
  if (phase == control::MigrationPhase::kCompleted) {
    return control::WrongState("the guest has migrated away; nothing is left here for {}", what);
  }
  if (phase != control::MigrationPhase::kNone && !control::IsTerminal(phase)) {
    return control::WrongState("a migration is {}; start {} once it has ended",
                               control::MigrationPhaseName(phase), what);
  }
  if (memory_ready_) RETURN_IF_ERROR(memory_ready_());
  return Status::Ok();
}

void LiveVm::SnapshotEnded() {
  sys::MutexLock lock(exclusive_mu_);
  snapshotting_ = false;
}

LiveVm::End LiveVm::Wait(Clock::time_point deadline, const char* who) {
  constexpr auto kPoll = std::chrono::milliseconds(50);
  for (;;) {
    if (vm_.vcpus().WaitFinished(kPoll)) return End::kGuestFinished;
    std::optional<migration::SourceOutcome> outcome;
    {
      sys::MutexLock lock(mu_);
      outcome.swap(outcome_);
    }
    if (outcome) {
      control::MigrationStatus s = engine_->Query();
      switch (*outcome) {
        case migration::SourceOutcome::kCompleted:
          return End::kMigrated;
        case migration::SourceOutcome::kUnknownPaused:
          fmt::print(stderr,
                     "{}: error: the link to {} broke after the final state was sent: the "
                     "destination may be running the guest, so it stays paused here ({})\n",
                     who, s.to, s.error);
          return End::kUnknown;
        default:
          fmt::print(stderr, "{}: migration to {} {}: {}; the guest keeps running here\n", who,
                     s.to, control::MigrationPhaseName(s.phase),
                     s.error.empty() ? "no reason given" : s.error);
          break;
      }
    }
    if (Clock::now() >= deadline) return End::kTimeout;
  }
}

control::MigrationControl& LiveVm::migration() { return *control_; }

control::MigrationStatus LiveVm::migration_status() { return engine_->Query(); }

std::optional<LiveVm::Clock::time_point> LiveVm::paused_at() const { return source_->paused_at(); }

void LiveVm::WaitForCompletionSeen(std::chrono::milliseconds grace) {
  if (!server_) return;
  auto deadline = Clock::now() + grace;
  while (!control_->seen_terminal() && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  // More than one client may follow (post-copy: the `faultline migrate`
  // that started it and the one that resumed it): a little longer than two
  // of their polls (200 ms apart by default) for the others.
  if (control_->seen_terminal()) {
    std::this_thread::sleep_for(std::min<Clock::duration>(
        std::chrono::milliseconds(500), std::max<Clock::duration>(deadline - Clock::now(), {})));
  }
}

}  // namespace faultline::cli
