#include "src/control/source.h"

#include <algorithm>
#include <cstdio>
#include <utility>

#include <fmt/format.h>

#include "src/control/args.h"
#include "src/migration/tls_transport.h"
#include "src/migration/wire.h"

namespace faultline::control {
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

uint64_t Micros(Clock::duration d) {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(d).count());
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
    sys::MutexLock lock(mu_);
    if (running_) {
      cancel_requested_ = true;
      stopping_ = true;  // a paused post-copy waits no longer
      if (source_) source_->Cancel();
      if (postcopy_) postcopy_->Cancel();
      if (local_) local_->Cancel();
      resume_cv_.notify_all();
    }
  }
  // Not under mu_: the thread takes it to publish its result.
  if (thread_.joinable()) thread_.join();
}

Status SourceMigrationControl::CheckMode(MigrationMode) {
  return Status::Ok();  // both modes
}

Result<SourceMigrationControl::Route> SourceMigrationControl::MakeRoute(
    const MigrateRequest& request) {
  // The engine dials numeric addresses only, so that DNS never decides
  // where a guest's memory goes.
  Result<migration::Address> address = migration::ParseAddress(request.to.ToString());
  if (!address.has_value()) return InvalidArgument("argument 'to': {}", address.error().message());
  Route route;
  route.transport = options_.transport;
  if (!request.tls_dir.empty() || !request.tls_peer_name.empty()) {
    // The request's directory, or the VMM's with the request's peer name.
    std::string dir = request.tls_dir;
    if (dir.empty() && options_.transport.tls) dir = options_.transport.tls->dir();
    if (dir.empty()) {
      return InvalidArgument(
          "tls_peer_name needs TLS: give tls_dir (faultline migrate --tls-dir) or start the VMM "
          "with --tls-dir");
    }
    Result<std::shared_ptr<migration::TlsContext>> tls =
        migration::TlsContext::Load(dir, request.tls_peer_name);
    if (!tls.has_value()) return InvalidArgument("argument 'tls_dir': {}", tls.error().message());
    route.transport.tls = std::move(*tls);
  }
  // A unix: target stays on this host: the VMM's TLS is for tcp: ones (a
  // request's own tls_dir with a unix: target is refused in parsing).
  if (address->is_unix()) route.transport.tls.reset();
  ASSIGN_OR_RETURN(route.connector, migration::MakeConnector(*address, route.transport));
  // A unix: target: the guest goes to a process on this host; its memory is
  // passed by descriptor when it can be and the request asks (local).
  route.unix_target = address->is_unix();
  if (route.unix_target) {
    Result<migration::LocalMemory> memory = migration::LocalMemoryFor(vm_);
    if (!memory.has_value()) {
      if (request.local) return memory.error();
    } else {
      route.local_memory = *memory;
    }
  } else if (request.local) {
    return InvalidArgument("a local update goes to a unix:PATH target, not {}",
                           request.to.ToString());
  }
  const bool local_fds = request.local && route.local_memory == migration::LocalMemory::kFds;
  if (options_.first_link_fault && !local_fds) {
    route.connector = std::make_unique<migration::FaultyConnector>(
        std::move(route.connector), migration::FaultController::Create(*options_.first_link_fault));
  }
  return route;
}

Status SourceMigrationControl::Start(const MigrateRequest& request) {
  RETURN_IF_ERROR(CheckMode(request.mode));
  ASSIGN_OR_RETURN(Route route, MakeRoute(request));
  sys::MutexLock lock(mu_);
  if (running_) return WrongState("a migration to {} is already active", request_.to.ToString());
  // The previous migration's thread has published its result and is at
  // most in on_done, which must not call back into this object.
  if (thread_.joinable()) thread_.join();
  connector_ = std::move(route.connector);
  transport_ = std::move(route.transport);
  local_memory_ = route.local_memory;
  MakeEnginesLocked(request, route.unix_target);
  request_ = request;
  running_ = true;
  cancel_requested_ = false;
  final_.reset();
  resume_connector_.reset();
  postcopy_stats_.reset();
  stopping_ = false;
  started_ = sample_time_ = pass_start_time_ = Clock::now();
  sample_pages_ = pass_start_pages_ = 0;
  send_rate_ = dirty_rate_ = 0;
  pass_seen_ = 0;
  // The thread's engine and connector are taken here, under mu_ (see
  // RunMigration in source.h).
  migration::Connector* c = connector_.get();
  migration::LocalUpdateSource* local = local_.get();
  if (request.local && local_memory_ == migration::LocalMemory::kFds) {
    thread_ = std::thread([this, c, local] { RunLocal(c, local); });
  } else if (postcopy_) {
    thread_ = std::thread([this, c, p = postcopy_.get(), local] { RunPostcopy(c, p, local); });
  } else {
    thread_ = std::thread([this, c, s = source_.get(), local] { RunMigration(c, s, local); });
  }
  return Status::Ok();
}

void SourceMigrationControl::MakeEnginesLocked(const MigrateRequest& request, bool unix_target) {
  source_.reset();
  postcopy_.reset();
  local_.reset();
  if (unix_target) {
    migration::LocalUpdateOptions local_options;
    local_options.withhold_fds = options_.local_withhold_fds;
    local_ = std::make_unique<migration::LocalUpdateSource>(vm_, local_options);
    if (request.local && local_memory_ != migration::LocalMemory::kFds) {
      fmt::print(stderr,
                 "faultline: local update to {}: the guest's RAM is anonymous memory, which has "
                 "no descriptor to pass to another process; copying it instead ({} migration "
                 "over the same socket)\n",
                 request.to.ToString(), MigrationModeName(request.mode));
      std::fflush(stderr);
    }
  }
  migration::SourceOptions source_options;
  source_options.page_channels = static_cast<uint16_t>(request.channels);
  source_options.key = options_.key;
  source_options.downtime_target = std::chrono::milliseconds(request.downtime_ms);
  source_options.max_precopy_passes = options_.max_precopy_passes;
  source_options.bandwidth_limit = request.bandwidth_bytes_per_sec;
  if (request.mode == MigrationMode::kPostcopy) {
    migration::PostcopySourceOptions options;
    options.base = std::move(source_options);
    options.realtime_priority = options_.realtime_priority;
    options.answers_on_bulk = request.answers_on_bulk;
    options.precopy_passes =
        request.postcopy_on_command ? migration::kPostcopyOnCommand : request.precopy_passes;
    postcopy_ = std::make_unique<migration::PostcopySource>(vm_, std::move(options));
  } else {
    source_ = std::make_unique<migration::MigrationSource>(vm_, std::move(source_options));
  }
}

void SourceMigrationControl::RunPostcopy(migration::Connector* connector,
                                         migration::PostcopySource* postcopy,
                                         migration::LocalUpdateSource* local) {
  using migration::PostcopyPhase;
  if (Status offered = OfferCopy(connector, local, migration::SwitchoverMode::kPostcopy);
      !offered.ok()) {
    return FailEarly(offered);
  }
  Result<migration::PostcopySourceStats> result = postcopy->Run(*connector);
  while (!result.has_value() && postcopy->phase() == PostcopyPhase::kPaused) {
    sys::MutexLock lock(mu_);
    const std::string to = request_.to.ToString();
    lock.Unlock();  // not held while writing to stderr
    fmt::print(stderr,
               "faultline: post-copy migration to {} paused: {}. The guest waits at the "
               "destination for its missing pages; reconnect with `faultline migrate --resume`\n",
               to, result.error().ToString());
    std::fflush(stderr);
    lock.Lock();
    paused_error_ = result.error().ToString();
    resume_cv_.wait(lock.native(),
                    [this]() REQUIRES(mu_) { return resume_connector_ != nullptr || stopping_; });
    if (resume_connector_ == nullptr) break;
    // The old connector may still be in use by nobody now: replace it.
    connector_ = std::move(resume_connector_);
    request_.to = resume_to_;
    paused_error_.clear();
    connector = connector_.get();
    lock.Unlock();
    result = postcopy->Resume(*connector);
  }
  const PostcopyPhase phase = postcopy->phase();
  migration::SourceOutcome outcome;
  {
    sys::MutexLock lock(mu_);
    if (result.has_value()) postcopy_stats_ = *result;
    MigrationStatus s = PostcopyStatus();
    s.eta_ms.reset();
    if (result.has_value()) {
      outcome = migration::SourceOutcome::kCompleted;
      s.phase = MigrationPhase::kCompleted;
      s.bytes_remaining = 0;
      s.eta_ms = 0;
      s.paused = false;
      s.downtime_ms = Millis(result->switchover_send);
      s.downtime_us = Micros(result->switchover_send);
      s.bandwidth_bytes_per_sec = PerSecond(s.bytes_sent, result->total);
    } else if (phase == PostcopyPhase::kPaused) {
      // Stopped while paused: the destination runs the guest, which waits for
      // pages only this VM has; it stays paused here.
      outcome = migration::SourceOutcome::kUnknownPaused;
      s.phase = MigrationPhase::kFailed;
      s.error = result.error().ToString();
    } else {
      outcome = migration::SourceOutcome::kFailedRunning;
      s.phase = cancel_requested_ ? MigrationPhase::kCancelled : MigrationPhase::kFailed;
      s.error = result.error().ToString();
    }
    AddLocal(s);
    final_ = std::move(s);
    running_ = false;
  }
  if (options_.on_done) options_.on_done(outcome);
}

MigrationStatus SourceMigrationControl::PostcopyStatus() {
  using migration::PostcopyPhase;
  const migration::PostcopyProgress p = postcopy_->progress();
  migration::SourceProgress as_precopy;
  as_precopy.pass = p.pass;
  as_precopy.pages_sent = p.pages_sent + p.pages_pushed + p.pages_requested;
  MigrationStatus s = Estimate(as_precopy);
  s.mode = MigrationMode::kPostcopy;
  s.pages_demanded = p.pages_requested;
  s.requests_rejected = p.requests_rejected;
  s.pages_pushed = p.pages_pushed;
  s.sessions = postcopy_stats_ ? postcopy_stats_->sessions : 0;
  switch (p.phase) {
    case PostcopyPhase::kNotStarted:
      s.phase = MigrationPhase::kSetup;
      break;
    case PostcopyPhase::kPrecopy:
      s.phase = p.pages_sent == 0 ? MigrationPhase::kSetup : MigrationPhase::kPrecopy;
      break;
    case PostcopyPhase::kPostcopy:
    case PostcopyPhase::kPaused:
      s.phase = MigrationPhase::kPostcopy;
      s.paused = p.phase == PostcopyPhase::kPaused;
      s.bytes_remaining = p.pages_remaining * kPage;
      s.eta_ms.reset();
      if (s.bandwidth_bytes_per_sec > 0) {
        s.eta_ms = s.bytes_remaining * 1000 / s.bandwidth_bytes_per_sec;
      }
      break;
    case PostcopyPhase::kCompleted:
      // The engine is done, but "completed" is reported with the final
      // figures (sessions, downtime), which the migration's thread records
      // once Run() returns: until then a query sees it still finishing.
      s.phase = MigrationPhase::kPostcopy;
      s.bytes_remaining = 0;
      break;
    case PostcopyPhase::kFailed:
      s.phase = MigrationPhase::kFailed;
      break;
  }
  if (s.paused) s.error = paused_error_;
  return s;
}

Status SourceMigrationControl::Resume(const std::optional<MigrationTarget>& to) {
  sys::MutexLock lock(mu_);
  if (!running_ || !postcopy_ || postcopy_->phase() != migration::PostcopyPhase::kPaused) {
    return WrongState(
        "no paused post-copy migration to resume: migrate-resume reconnects a post-copy "
        "migration whose link broke (query-migrate says phase postcopy, paused true)");
  }
  if (resume_connector_)
    return WrongState("a resume to {} is already under way", resume_to_.ToString());
  const MigrationTarget target = to.value_or(request_.to);
  Result<migration::Address> address = migration::ParseAddress(target.ToString());
  if (!address.has_value()) return InvalidArgument("argument 'to': {}", address.error().message());
  Result<std::unique_ptr<migration::Connector>> connector =
      migration::MakeConnector(*address, transport_);
  if (!connector.has_value()) return connector.error();
  resume_connector_ = std::move(*connector);
  resume_to_ = target;
  resume_cv_.notify_all();
  return Status::Ok();
}

Status SourceMigrationControl::StartPostcopy() {
  sys::MutexLock lock(mu_);
  if (!running_ || !postcopy_) {
    return WrongState(
        "no post-copy migration is active: start one with mode postcopy (`faultline migrate "
        "--mode postcopy --postcopy-on-command ...`), then switch it with this command");
  }
  const migration::PostcopyPhase phase = postcopy_->phase();
  if (phase != migration::PostcopyPhase::kNotStarted &&
      phase != migration::PostcopyPhase::kPrecopy) {
    return WrongState("the migration is past pre-copy already ({})",
                      migration::PostcopyPhaseName(phase));
  }
  postcopy_->StartPostcopy();
  return Status::Ok();
}

void SourceMigrationControl::RunMigration(migration::Connector* connector,
                                          migration::MigrationSource* source,
                                          migration::LocalUpdateSource* local) {
  if (Status offered = OfferCopy(connector, local, migration::SwitchoverMode::kStopAndCopy);
      !offered.ok()) {
    return FailEarly(offered);
  }
  Result<migration::SourceStats> result = source->Run(*connector);
  migration::SourceOutcome outcome = source->outcome();
  {
    sys::MutexLock lock(mu_);
    MigrationStatus s = Estimate(source->progress());
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
      s.downtime_us = Micros(result->downtime);
      // Over the whole migration, for a meaningful final figure.
      s.bandwidth_bytes_per_sec = PerSecond(s.bytes_sent, result->total);
    } else {
      // A cancel that came too late (Complete was sent) ends as the link does.
      bool cancelled = cancel_requested_ && outcome != migration::SourceOutcome::kUnknownPaused;
      s.phase = cancelled ? MigrationPhase::kCancelled : MigrationPhase::kFailed;
      s.error = result.error().ToString();
    }
    AddLocal(s);
    final_ = std::move(s);
    running_ = false;
  }
  if (options_.on_done) options_.on_done(outcome);
}

Status SourceMigrationControl::OfferCopy(migration::Connector* connector,
                                         migration::LocalUpdateSource* local,
                                         migration::SwitchoverMode mode) {
  if (local == nullptr) return Status::Ok();  // tcp: no offer
  return local->OfferCopy(*connector, mode);
}

void SourceMigrationControl::FailEarly(const Status& why) {
  {
    sys::MutexLock lock(mu_);
    MigrationStatus s = BaseStatus();
    s.phase = cancel_requested_ ? MigrationPhase::kCancelled : MigrationPhase::kFailed;
    s.error = why.ToString();
    AddLocal(s);
    final_ = std::move(s);
    running_ = false;
  }
  if (options_.on_done) options_.on_done(migration::SourceOutcome::kFailedRunning);
}

MigrationStatus SourceMigrationControl::BaseStatus() const {
  MigrationStatus s;
  s.mode = request_.mode;
  s.to = request_.to.ToString();
  s.bytes_total = bytes_total_;
  s.elapsed_ms = Millis(Clock::now() - started_);
  if (transport_.tls) s.tls = transport_.tls->Describe();
  return s;
}

void SourceMigrationControl::AddLocal(MigrationStatus& s) const {
  if (!request_.local) return;
  s.local = true;
  s.local_memory = migration::LocalMemoryName(local_memory_);
  s.pages_copied = PassesFds() ? 0 : s.pages_sent;
}

void SourceMigrationControl::RunLocal(migration::Connector* connector,
                                      migration::LocalUpdateSource* local) {
  Result<migration::LocalUpdateStats> result = local->Run(*connector);
  const migration::SourceOutcome outcome = local->outcome();
  {
    sys::MutexLock lock(mu_);
    MigrationStatus s = BaseStatus();
    AddLocal(s);
    if (result.has_value()) {
      s.phase = MigrationPhase::kCompleted;
      s.bytes_sent = result->bytes_sent;
      s.fds_passed = result->fds_passed;
      s.pages_copied = result->pages_copied;
      // Whole milliseconds would say 0 for most updates: rounded up.
      s.downtime_ms = static_cast<uint64_t>((result->pause.count() + 999) / 1000);
      s.downtime_us = static_cast<uint64_t>(result->pause.count());
      fmt::print(stderr,
                 "faultline: local update to {}: the guest paused {} us (vCPUs out in {} us, "
                 "state saved and sent in {} us, loaded and confirmed by the new process in {} "
                 "us); {} descriptor(s) passed, {} bytes sent, 0 pages copied\n",
                 s.to, result->pause.count(), result->pause_stop.count(),
                 result->pause_state.count(), result->pause_confirm.count(), result->fds_passed,
                 result->bytes_sent);
      std::fflush(stderr);
    } else {
      const bool cancelled =
          cancel_requested_ && outcome == migration::SourceOutcome::kFailedRunning;
      s.phase = cancelled ? MigrationPhase::kCancelled : MigrationPhase::kFailed;
      s.error = result.error().ToString();
      if (outcome == migration::SourceOutcome::kFailedResumed ||
          outcome == migration::SourceOutcome::kFailedRunning) {
        s.error += "; the guest keeps running here";
      }
    }
    final_ = std::move(s);
    running_ = false;
  }
  if (options_.on_done) options_.on_done(outcome);
}

MigrationStatus SourceMigrationControl::Query() {
  sys::MutexLock lock(mu_);
  if (final_) return *final_;
  if (!running_) return MigrationStatus();
  MigrationStatus s;
  if (PassesFds()) {
    s = BaseStatus();
    s.phase = local_->phase() == migration::LocalUpdateSource::Phase::kPaused
                  ? MigrationPhase::kSwitchover
                  : MigrationPhase::kSetup;
  } else if (postcopy_) {
    s = PostcopyStatus();
  } else {
    s = Estimate(source_->progress());
  }
  AddLocal(s);
  return s;
}

Status SourceMigrationControl::Cancel() {
  sys::MutexLock lock(mu_);
  if (!running_) return WrongState("no migration is active");
  if (postcopy_) {
    const migration::PostcopyPhase phase = postcopy_->phase();
    if (phase == migration::PostcopyPhase::kPaused) {
      return WrongState(
          "the post-copy migration is paused already and cannot be cancelled: the guest runs "
          "at the destination and needs this VM's pages; reconnect with `faultline migrate "
          "--resume`");
    }
    // Before the switchover: the migration fails and the VM runs on. After
    // it: the link breaks and the migration pauses (no cancel_requested_,
    // it is not over).
    if (phase != migration::PostcopyPhase::kPostcopy) cancel_requested_ = true;
    if (local_) local_->Cancel();  // the offer before the migration
    postcopy_->Cancel();
    return Status::Ok();
  }
  cancel_requested_ = true;
  if (local_) local_->Cancel();  // the offer of a copy, or the whole update
  if (source_) source_->Cancel();
  return Status::Ok();
}

MigrationStatus SourceMigrationControl::Estimate(const migration::SourceProgress& p) {
  const Clock::time_point now = Clock::now();
  MigrationStatus s = BaseStatus();
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

}  // namespace faultline::control
