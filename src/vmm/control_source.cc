#include "src/vmm/control_source.h"

#include <algorithm>
#include <utility>

#include "src/migration/wire.h"
#include "src/vmm/control_args.h"

namespace faultline::vmm {
namespace {

using Clock = std::chrono::steady_clock;

// The engine's counters are in 4 KiB wire pages, whatever the block's pages.
constexpr uint64_t kPage = 4096;
// Rates from samples closer together than this are mostly noise.
constexpr auto kMinSampleInterval = std::chrono::milliseconds(250);

static_assert(kMaxMigrationChannels == migration::kMaxPageChannels,
              "the control protocol's channel bound must be the wire protocol's");

uint64_t TotalBytes(migration::SourceVm& vm) {
  uint64_t total = 0;
  for (const auto& block : vm.blocks()) total += block->size();
  return total;
}

uint64_t Millis(Clock::duration d) {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(d).count());
}

uint64_t PerSecond(uint64_t bytes, Clock::duration d) {
  double seconds = std::chrono::duration<double>(d).count();
  return seconds > 0 ? static_cast<uint64_t>(static_cast<double>(bytes) / seconds) : 0;
}

}  // namespace

SourceMigrationControl::SourceMigrationControl(migration::SourceVm& vm, Options options)
    : vm_(vm), options_(std::move(options)), bytes_total_(TotalBytes(vm)) {}

SourceMigrationControl::~SourceMigrationControl() {
  {
    std::lock_guard lock(mu_);
    if (running_) {
      cancel_requested_ = true;
      source_->Cancel();
    }
  }
  // Not under mu_: the thread takes it to publish its result.
  if (thread_.joinable()) thread_.join();
}

Status SourceMigrationControl::CheckMode(MigrationMode mode) {
  if (mode == MigrationMode::kPostcopy) {
    // Post-copy plugs in here (and in Start); until the engine has it, never
    // fall back to pre-copy silently.
    return NotSupported(
        "post-copy is not available in this build: this VMM migrates with pre-copy only (use "
        "mode precopy)");
  }
  return Status::Ok();
}

Status SourceMigrationControl::Start(const MigrateRequest& request) {
  RETURN_IF_ERROR(CheckMode(request.mode));
  // The engine dials numeric addresses only, so that DNS never decides
  // where a guest's memory goes.
  Result<migration::Address> address = migration::ParseAddress(request.to.ToString());
  if (!address.has_value()) return InvalidArgument("argument 'to': {}", address.error().message());
  Result<std::unique_ptr<migration::Connector>> connector =
      migration::MakeConnector(*address, options_.transport);
  if (!connector.has_value()) return connector.error();

  migration::SourceOptions source_options;
  source_options.page_channels = static_cast<uint16_t>(request.channels);
  source_options.key = options_.key;
  source_options.downtime_target = std::chrono::milliseconds(request.downtime_ms);
  source_options.max_precopy_passes = options_.max_precopy_passes;
  source_options.bandwidth_limit = request.bandwidth_bytes_per_sec;

  std::lock_guard lock(mu_);
  if (running_) return WrongState("a migration to {} is already active", request_.to.ToString());
  // The previous migration's thread has published its result and is at
  // most in on_done, which must not call back into this object.
  if (thread_.joinable()) thread_.join();
  connector_ = std::move(*connector);
  source_ = std::make_unique<migration::MigrationSource>(vm_, std::move(source_options));
  request_ = request;
  running_ = true;
  cancel_requested_ = false;
  final_.reset();
  started_ = sample_time_ = pass_start_time_ = Clock::now();
  sample_pages_ = pass_start_pages_ = 0;
  send_rate_ = dirty_rate_ = 0;
  pass_seen_ = 0;
  thread_ = std::thread([this, c = connector_.get()] { RunMigration(c); });
  return Status::Ok();
}

void SourceMigrationControl::RunMigration(migration::Connector* connector) {
  // source_ is not replaced while running_ is true, so it is safe unlocked.
  Result<migration::SourceStats> result = source_->Run(*connector);
  migration::SourceOutcome outcome = source_->outcome();
  {
    std::lock_guard lock(mu_);
    MigrationStatus s = Estimate(source_->progress());
    s.elapsed_ms = Millis(Clock::now() - started_);
    s.eta_ms.reset();
    if (result.has_value()) {
      s.phase = MigrationPhase::kCompleted;
      s.pass = static_cast<uint32_t>(result->passes.size());
      s.pages_sent = result->data_pages + result->zero_pages;
      s.bytes_sent = s.pages_sent * kPage;
      s.bytes_remaining = 0;
      s.eta_ms = 0;
      s.downtime_ms = Millis(result->downtime);
      // Over the whole migration, for a meaningful final figure.
      s.bandwidth_bytes_per_sec = PerSecond(s.bytes_sent, result->total);
    } else {
      // A cancel that came too late (Complete was sent) ends as the link does.
      bool cancelled = cancel_requested_ && outcome != migration::SourceOutcome::kUnknownPaused;
      s.phase = cancelled ? MigrationPhase::kCancelled : MigrationPhase::kFailed;
      s.error = result.error().ToString();
    }
    final_ = std::move(s);
    running_ = false;
  }
  if (options_.on_done) options_.on_done(outcome);
}

MigrationStatus SourceMigrationControl::Query() {
  std::lock_guard lock(mu_);
  if (final_) return *final_;
  if (!running_) return MigrationStatus();
  return Estimate(source_->progress());
}

Status SourceMigrationControl::Cancel() {
  std::lock_guard lock(mu_);
  if (!running_) return WrongState("no migration is active");
  cancel_requested_ = true;
  source_->Cancel();
  return Status::Ok();
}

MigrationStatus SourceMigrationControl::Estimate(const migration::SourceProgress& p) {
  const Clock::time_point now = Clock::now();
  MigrationStatus s;
  s.mode = request_.mode;
  s.to = request_.to.ToString();
  s.bytes_total = bytes_total_;
  s.elapsed_ms = Millis(now - started_);
  s.pages_sent = p.pages_sent;
  s.bytes_sent = p.pages_sent * kPage;
  if (p.paused) {
    s.phase = MigrationPhase::kSwitchover;
  } else if (p.pass == 0 && p.pages_sent == 0) {
    s.phase = MigrationPhase::kSetup;  // dialling, handshake
  } else {
    s.phase = MigrationPhase::kPrecopy;
  }
  s.pass = s.phase == MigrationPhase::kSetup ? 0 : p.pass + 1;

  if (p.pass != pass_seen_) {
    // A new pass: its work was harvested as the previous one ended, so the
    // guest dirtied that much during the previous pass.
    dirty_rate_ = PerSecond(p.dirty_pages * kPage, now - pass_start_time_);
    pass_seen_ = p.pass;
    pass_start_pages_ = p.pages_sent;
    pass_start_time_ = now;
  }
  if (p.pass == 0) {
    s.bytes_remaining = bytes_total_ - std::min(bytes_total_, s.bytes_sent);
  } else {
    uint64_t work = p.dirty_pages * kPage;
    uint64_t done = (p.pages_sent - std::min(p.pages_sent, pass_start_pages_)) * kPage;
    s.bytes_remaining = work - std::min(work, done);
  }
  if (now - sample_time_ >= kMinSampleInterval) {
    uint64_t rate = PerSecond((p.pages_sent - std::min(p.pages_sent, sample_pages_)) * kPage,
                              now - sample_time_);
    send_rate_ = send_rate_ == 0 ? rate : (send_rate_ + rate) / 2;  // a little smoothing
    sample_time_ = now;
    sample_pages_ = p.pages_sent;
  }
  s.bandwidth_bytes_per_sec = send_rate_;
  s.dirty_rate_bytes_per_sec = dirty_rate_;
  if (send_rate_ > 0 && s.phase == MigrationPhase::kPrecopy) {
    s.eta_ms = s.bytes_remaining * 1000 / send_rate_;
  }
  return s;
}

}  // namespace faultline::vmm
