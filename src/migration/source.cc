#include "src/migration/source.h"

#include <cerrno>
#include <memory>

#include "src/migration/attempt.h"
#include "src/migration/completion_watcher.h"
#include "src/migration/handshake.h"
#include "src/migration/precopy_passes.h"

namespace faultline::migration {

using Clock = std::chrono::steady_clock;

// One run besides its attempt: the passes, the watcher of the main channel
// (the destination speaks there only to end the session), the figures.
// Run()'s thread drives it; PageSender's threads send the passes.
struct MigrationSource::Outgoing {
  Attempt& a;
  std::unique_ptr<PrecopyPasses> passes;
  std::unique_ptr<CompletionWatcher> watcher;
  SourceStats stats;
  Clock::time_point paused_at;
};

MigrationSource::MigrationSource(SourceVm& vm, SourceOptions options)
    : vm_(vm), options_(std::move(options)) {}

Result<SourceStats> MigrationSource::Run(Connector& connector) {
  if (options_.batch_pages == 0 || options_.batch_pages > kMaxPagesPerBatch) {
    return Error("batch of {} pages (1 to {} allowed)", options_.batch_pages, kMaxPagesPerBatch);
  }
  Attempt attempt(Attempt::Reporting::kSilent);
  {
    sys::MutexLock lock(mu_);
    if (Status started = state_.Start(); !started.ok()) {
      if (started.code() == ECANCELED) {
        return started.WithContext(SourceOutcomeName(state_.outcome()));
      }
      return Error("MigrationSource::Run called twice");
    }
    active_ = &attempt;
  }
  Result<SourceStats> result = Migrate(attempt, connector);
  sys::MutexLock lock(mu_);
  active_ = nullptr;
  return result;
}

Result<SourceStats> MigrationSource::Migrate(Attempt& a, Connector& connector) {
  const auto start = Clock::now();
  const std::vector<std::shared_ptr<RamBlock>> blocks = vm_.blocks();
  std::vector<BlockInfo> infos;
  for (const auto& b : blocks) infos.push_back(DescribeBlock(*b));
  Outgoing out{a, nullptr, nullptr, {}, {}};
  Status status = [&]() -> Status {
    ASSIGN_OR_RETURN(Session session,
                     ConnectSession(connector, {infos, options_.page_channels, options_.key, 0,
                                                vm_.accelerator()}));
    RETURN_IF_ERROR(a.Adopt(std::move(session)));
    RETURN_IF_ERROR(Step(&SourceState::Connected));
    out.watcher = std::make_unique<CompletionWatcher>(a);
    out.passes = std::make_unique<PrecopyPasses>(vm_, blocks, a.session(), options_, pages_sent_);
    RETURN_IF_ERROR(Precopy(out));
    RETURN_IF_ERROR(Switchover(out));
    return out.watcher->Wait();  // the channel's timeouts bound this
  }();
  if (status.ok()) status = Step(&SourceState::Acknowledged);
  if (status.ok()) {
    out.stats.downtime =
        std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - out.paused_at);
  } else {
    status = Fail(out, std::move(status));
  }
  out.watcher.reset();
  out.stats.bytes_sent = a.stats().bytes_sent;
  out.stats.total = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start);
  if (!status.ok()) return status.WithContext(SourceOutcomeName(outcome()));
  return out.stats;
}

Status MigrationSource::Fail(Outgoing& out, Status status) {
  if (out.watcher) status = out.watcher->Explain(std::move(status), std::chrono::milliseconds(500));
  out.a.Fail(status);  // every link shut down: the page senders and the watcher stop
  const bool refused = out.watcher && out.watcher->peer_refused();
  bool resume;
  {
    sys::MutexLock lock(mu_);
    (void)state_.Fail(refused);
    resume = state_.resumed_here();
  }
  if (resume) vm_.Resume();
  (void)vm_.StopDirtyTracking();
  return status;
}

Status MigrationSource::Step(Status (SourceState::*event)()) {
  sys::MutexLock lock(mu_);
  return (state_.*event)();
}

Status MigrationSource::Precopy(Outgoing& out) {
  RETURN_IF_ERROR(vm_.StartDirtyTracking());
  const uint64_t total_pages = out.passes->total_pages();
  uint64_t previous_dirty = total_pages;
  uint32_t stalled = 0;  // passes in a row that did not shrink the dirty set
  // Page bytes per second, from the last pass big enough to measure.
  double rate = 0;
  for (uint32_t pass = 0;; ++pass) {
    if (out.a.failed()) return out.a.error();
    ASSIGN_OR_RETURN(const PassStats done, out.passes->Run(pass, out.a.main()));
    out.stats.passes.push_back(done);
    out.stats.data_pages += done.data_pages;
    out.stats.zero_pages += done.zero_pages;
    RETURN_IF_ERROR(Step(&SourceState::PassEnded));
    const uint64_t dirty = done.dirty_after;
    dirty_pages_.store(dirty, std::memory_order_relaxed);
    // Converged when what is left fits in the downtime target at the rate
    // the link just showed; a pass too small to measure keeps the old rate.
    if (done.data_pages * kWirePageSize >= (4u << 20) && done.seconds > 0) {
      rate = static_cast<double>(done.data_pages * kWirePageSize) / done.seconds;
    }
    const double expected_s = rate > 0 ? static_cast<double>(dirty * kWirePageSize) / rate : 1e9;
    const double target_s = std::chrono::duration<double>(options_.downtime_target).count();
    if (dirty == 0 || expected_s <= target_s || pass + 1 >= options_.max_precopy_passes) {
      return Status::Ok();
    }
    // Passes that cannot converge: every page dirty again (a block without
    // a dirty log, guest_memfd here, reports all pages each time), or the
    // dirty set has not shrunk for two passes (the guest dirties memory as
    // fast as it goes). More passes would only resend; stop and copy.
    if (dirty >= total_pages) return Status::Ok();
    stalled = pass > 0 && dirty >= previous_dirty ? stalled + 1 : 0;
    if (stalled >= 2) return Status::Ok();
    previous_dirty = dirty;
  }
}

Status MigrationSource::Switchover(Outgoing& out) {
  RETURN_IF_ERROR(Step(&SourceState::Pause));
  out.paused_at = Clock::now();
  vm_.Pause();
  ASSIGN_OR_RETURN(const uint64_t dirty, out.passes->Harvest());
  dirty_pages_.store(dirty, std::memory_order_relaxed);
  ASSIGN_OR_RETURN(std::vector<std::vector<uint8_t>> vcpus, vm_.SaveVcpus());
  ASSIGN_OR_RETURN(std::vector<DeviceBlob> devices, vm_.SaveDevices());
  const uint32_t final_pass = static_cast<uint32_t>(out.stats.passes.size());
  Link& main = out.a.main();
  RETURN_IF_ERROR(main.writer().Send(migration::Switchover{
      SwitchoverMode::kStopAndCopy, final_pass, dirty, static_cast<uint32_t>(vcpus.size()),
      static_cast<uint32_t>(devices.size())}));
  if (out.a.failed()) return out.a.error();
  ASSIGN_OR_RETURN(const PassStats final, out.passes->Send(final_pass, true));
  out.stats.passes.push_back(final);
  out.stats.data_pages += final.data_pages;
  out.stats.zero_pages += final.zero_pages;
  for (uint32_t i = 0; i < vcpus.size(); ++i) {
    RETURN_IF_ERROR(main.writer().Send(VcpuStateMessage{i, std::move(vcpus[i])}));
  }
  for (DeviceBlob& d : devices) {
    RETURN_IF_ERROR(main.writer().Send(DeviceState{d.name, std::move(d.state)}));
  }
  // From here on Cancel() is refused: once Complete may have arrived, only
  // the destination's answer (or its absence) decides who runs the guest.
  RETURN_IF_ERROR(Step(&SourceState::CompleteSent));
  return main.writer().Send(Complete{final_pass + 1, out.stats.data_pages, out.stats.zero_pages});
}

void MigrationSource::Cancel() {
  sys::MutexLock lock(mu_);
  // Refused once Complete may be out (the state machine says so).
  if (state_.Cancel().ok() && active_ != nullptr) {
    active_->Fail(Status(ECANCELED, "migration cancelled"));
  }
}

SourceOutcome MigrationSource::outcome() const {
  sys::MutexLock lock(mu_);
  return state_.outcome();
}

SourceProgress MigrationSource::progress() const {
  SourceProgress p;
  {
    sys::MutexLock lock(mu_);
    p.pass = state_.pass();
    p.paused = state_.paused_here();
  }
  p.pages_sent = pages_sent_.load(std::memory_order_relaxed);
  p.dirty_pages = dirty_pages_.load(std::memory_order_relaxed);
  return p;
}

}  // namespace faultline::migration
