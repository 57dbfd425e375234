#include "src/migration/source.h"

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <optional>
#include <thread>

#include "src/migration/handshake.h"
#include "src/migration/page_sender.h"

namespace faultline::migration {

const char* SourceOutcomeName(SourceOutcome outcome) {
  switch (outcome) {
    case SourceOutcome::kNotStarted:
      return "not started";
    case SourceOutcome::kCompleted:
      return "completed";
    case SourceOutcome::kFailedRunning:
      return "failed; the VM kept running here";
    case SourceOutcome::kFailedResumed:
      return "failed after the pause; the VM was resumed here";
    case SourceOutcome::kUnknownPaused:
      return "unknown: the link broke after Complete; the VM is left paused here";
  }
  return "?";
}

using Clock = std::chrono::steady_clock;

// One migration: the session, the dirty bitmaps, the watcher of the main
// channel. Run() drives it from the caller's thread; PageSender's threads
// send the passes; the watcher thread is the only reader of the main
// channel (the destination speaks there only to end the session).
class MigrationSource::Attempt {
 public:
  explicit Attempt(MigrationSource& owner) : o_(owner) {}
  ~Attempt() { StopWatcher(); }

  Result<SourceStats> Run(Connector& connector);

  void Cancel() {
    std::lock_guard lock(mu_);
    if (complete_sent_) return;  // too late: the destination may already run the guest
    cancelled_ = true;
    session_.Shutdown();
  }

 private:
  Status Precopy();
  Status Switchover();
  Status SendPass(uint32_t pass, bool final);
  Result<uint64_t> Harvest();  // ORs new dirty bits into dirty_; returns the count
  void Watch();
  void StopWatcher();
  // The error to report for `local`: the destination's own words if it
  // sent an Error (the usual reason sends fail), else `local`.
  Status Explain(Status local);

  MigrationSource& o_;
  std::vector<std::shared_ptr<RamBlock>> blocks_;
  std::vector<DirtyBitmap> dirty_;  // per block: the next pass's pages
  DirtyBitmap taken_;               // TakeDirty scratch
  std::unique_ptr<PageSender> sender_;
  SourceStats stats_;
  double rate_ = 0;  // page bytes per second, from the last pass big enough to measure
  bool paused_ = false;
  Clock::time_point paused_at_;

  std::thread watcher_;
  std::mutex mu_;
  std::condition_variable cv_;    // signalled when the watcher ends
  Session session_;               // channels: Shutdown() under mu_, used without it
  bool cancelled_ = false;        // guarded by mu_
  bool complete_sent_ = false;    // guarded by mu_ (written by Run's thread only)
  std::optional<Status> peer_;    // guarded by mu_: how the destination ended (OK: CompleteAck)
  bool peer_sent_error_ = false;  // guarded by mu_
};

Result<SourceStats> MigrationSource::Attempt::Run(Connector& connector) {
  const auto start = Clock::now();
  blocks_ = o_.vm_.blocks();
  std::vector<BlockInfo> infos;
  for (const auto& b : blocks_) infos.push_back(DescribeBlock(*b));
  ASSIGN_OR_RETURN(Session session,
                   ConnectSession(connector, {infos, o_.options_.page_channels, o_.options_.key, 0,
                                              o_.vm_.accelerator()}));
  {
    std::lock_guard lock(mu_);
    session_ = std::move(session);
    if (cancelled_) session_.Shutdown();
  }
  watcher_ = std::thread([this] { Watch(); });
  sender_ = std::make_unique<PageSender>(session_, blocks_, o_.options_, o_.pages_sent_);

  Status status = Precopy();
  if (status.ok()) status = Switchover();
  if (status.ok()) {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return peer_.has_value(); });  // the channel's timeouts bound this
    status = *peer_;
  }
  if (status.ok()) {
    stats_.downtime =
        std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - paused_at_);
    o_.outcome_.store(SourceOutcome::kCompleted, std::memory_order_release);
  } else {
    status = Explain(std::move(status));
    bool peer_error, complete_sent;
    {
      std::lock_guard lock(mu_);
      peer_error = peer_sent_error_;
      complete_sent = complete_sent_;
      session_.Shutdown();
    }
    if (!paused_) {
      o_.outcome_.store(SourceOutcome::kFailedRunning, std::memory_order_release);
    } else if (!complete_sent || peer_error) {
      o_.vm_.Resume();
      o_.paused_.store(false, std::memory_order_relaxed);
      o_.outcome_.store(SourceOutcome::kFailedResumed, std::memory_order_release);
    } else {
      o_.outcome_.store(SourceOutcome::kUnknownPaused, std::memory_order_release);
    }
    (void)o_.vm_.StopDirtyTracking();
  }
  StopWatcher();
  stats_.bytes_sent = session_.stats().bytes_sent;
  stats_.total = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start);
  if (!status.ok()) return status.WithContext(SourceOutcomeName(o_.outcome()));
  return stats_;
}

Status MigrationSource::Attempt::Precopy() {
  RETURN_IF_ERROR(o_.vm_.StartDirtyTracking());
  for (const auto& b : blocks_) {
    dirty_.emplace_back(b->size() / kWirePageSize);
    dirty_.back().SetAll();  // pass 0: everything
  }
  uint64_t total_pages = 0;
  for (const auto& b : blocks_) total_pages += b->size() / kWirePageSize;
  uint64_t previous_dirty = total_pages;
  uint32_t stalled = 0;  // passes in a row that did not shrink the dirty set
  for (uint32_t pass = 0;; ++pass) {
    o_.pass_.store(pass, std::memory_order_relaxed);
    RETURN_IF_ERROR(SendPass(pass, false));
    ASSIGN_OR_RETURN(const uint64_t dirty, Harvest());
    stats_.passes.back().dirty_after = dirty;
    const PassStats& done = stats_.passes.back();
    RETURN_IF_ERROR(
        session_.main->writer().Send(PassEnd{pass, done.data_pages, done.zero_pages, dirty}));
    // Converged when what is left fits in the downtime target at the rate
    // the link just showed; a pass too small to measure keeps the old rate.
    if (done.data_pages * kWirePageSize >= (4u << 20) && done.seconds > 0) {
      rate_ = static_cast<double>(done.data_pages * kWirePageSize) / done.seconds;
    }
    const double expected_s = rate_ > 0 ? static_cast<double>(dirty * kWirePageSize) / rate_ : 1e9;
    const double target_s = std::chrono::duration<double>(o_.options_.downtime_target).count();
    if (dirty == 0 || expected_s <= target_s || pass + 1 >= o_.options_.max_precopy_passes) {
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

Status MigrationSource::Attempt::Switchover() {
  paused_at_ = Clock::now();
  o_.vm_.Pause();
  paused_ = true;
  o_.paused_.store(true, std::memory_order_relaxed);
  ASSIGN_OR_RETURN(const uint64_t dirty, Harvest());
  ASSIGN_OR_RETURN(std::vector<std::vector<uint8_t>> vcpus, o_.vm_.SaveVcpus());
  ASSIGN_OR_RETURN(std::vector<DeviceBlob> devices, o_.vm_.SaveDevices());
  const uint32_t final_pass = static_cast<uint32_t>(stats_.passes.size());
  o_.pass_.store(final_pass, std::memory_order_relaxed);
  Link& main = *session_.main;
  RETURN_IF_ERROR(main.writer().Send(migration::Switchover{
      SwitchoverMode::kStopAndCopy, final_pass, dirty, static_cast<uint32_t>(vcpus.size()),
      static_cast<uint32_t>(devices.size())}));
  RETURN_IF_ERROR(SendPass(final_pass, true));
  for (uint32_t i = 0; i < vcpus.size(); ++i) {
    RETURN_IF_ERROR(main.writer().Send(VcpuStateMessage{i, std::move(vcpus[i])}));
  }
  for (DeviceBlob& d : devices) {
    RETURN_IF_ERROR(main.writer().Send(DeviceState{d.name, std::move(d.state)}));
  }
  // From here on Cancel() is refused: once Complete may have arrived, only
  // the destination's answer (or its absence) decides who runs the guest.
  {
    std::lock_guard lock(mu_);
    if (cancelled_) return Status(ECANCELED, "migration cancelled");
    complete_sent_ = true;
  }
  return main.writer().Send(Complete{final_pass + 1, stats_.data_pages, stats_.zero_pages});
}

Status MigrationSource::Attempt::SendPass(uint32_t pass, bool final) {
  {
    std::lock_guard lock(mu_);
    if (cancelled_) return Status(ECANCELED, "migration cancelled");
  }
  const auto start = Clock::now();
  ASSIGN_OR_RETURN(PageSender::PassTotals totals, sender_->SendPass(dirty_, pass, final));
  PassStats s;
  s.pass = pass;
  s.data_pages = totals.data_pages;
  s.zero_pages = totals.zero_pages;
  s.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  stats_.passes.push_back(s);
  stats_.data_pages += s.data_pages;
  stats_.zero_pages += s.zero_pages;
  for (DirtyBitmap& d : dirty_) d.ClearAll();
  return Status::Ok();
}

Result<uint64_t> MigrationSource::Attempt::Harvest() {
  uint64_t count = 0;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    RETURN_IF_ERROR(o_.vm_.TakeDirty(*blocks_[i], taken_));
    if (taken_.pages() != dirty_[i].pages()) {
      return Error("dirty bitmap of block '{}' has {} pages, expected {}", blocks_[i]->name(),
                   taken_.pages(), dirty_[i].pages());
    }
    dirty_[i].Merge(taken_);
    count += dirty_[i].Count();
  }
  o_.dirty_pages_.store(count, std::memory_order_relaxed);
  return count;
}

void MigrationSource::Attempt::Watch() {
  MessageReader& reader = session_.main->reader();
  Status end;
  bool error_message = false;
  while (true) {
    Result<Message> m = reader.Read();
    if (!m && m.error().code() == EAGAIN) continue;  // the destination is quiet until the end
    if (!m) {
      end = m.error();
    } else if (std::holds_alternative<CompleteAck>(*m)) {
      end = Status::Ok();
    } else if (const auto* e = std::get_if<ErrorMessage>(&*m)) {
      end = PeerError(*e).WithContext("the destination failed");
      error_message = true;
    } else {
      end = Error("the destination sent {} on the main channel", MessageTypeName(TypeOf(*m)));
    }
    break;
  }
  std::lock_guard lock(mu_);
  if (!end.ok()) session_.Shutdown();  // wakes the page senders
  peer_ = std::move(end);
  peer_sent_error_ = error_message;
  cv_.notify_all();
}

void MigrationSource::Attempt::StopWatcher() {
  if (!watcher_.joinable()) return;
  {
    std::lock_guard lock(mu_);
    if (!peer_.has_value()) session_.Shutdown();
  }
  watcher_.join();
}

Status MigrationSource::Attempt::Explain(Status local) {
  // A destination that fails sends Error and closes; our sends then fail
  // first. Give its message a moment to arrive.
  std::unique_lock lock(mu_);
  cv_.wait_for(lock, std::chrono::milliseconds(500), [&] { return peer_.has_value(); });
  if (peer_sent_error_) return *peer_;
  return local;
}

MigrationSource::MigrationSource(SourceVm& vm, SourceOptions options)
    : vm_(vm), options_(std::move(options)) {}

Result<SourceStats> MigrationSource::Run(Connector& connector) {
  if (options_.batch_pages == 0 || options_.batch_pages > kMaxPagesPerBatch) {
    return Error("batch of {} pages (1 to {} allowed)", options_.batch_pages, kMaxPagesPerBatch);
  }
  Attempt attempt(*this);
  {
    std::lock_guard lock(cancel_mu_);
    if (active_ != nullptr || outcome() != SourceOutcome::kNotStarted) {
      return Error("MigrationSource::Run called twice");
    }
    active_ = &attempt;
    if (cancelled_.load()) attempt.Cancel();
  }
  Result<SourceStats> result = attempt.Run(connector);
  if (outcome() == SourceOutcome::kNotStarted) {
    outcome_.store(SourceOutcome::kFailedRunning, std::memory_order_release);
  }
  std::lock_guard lock(cancel_mu_);
  active_ = nullptr;
  return result;
}

void MigrationSource::Cancel() {
  std::lock_guard lock(cancel_mu_);
  cancelled_.store(true);
  if (active_ != nullptr) active_->Cancel();
}

SourceProgress MigrationSource::progress() const {
  return SourceProgress{
      pass_.load(std::memory_order_relaxed), pages_sent_.load(std::memory_order_relaxed),
      dirty_pages_.load(std::memory_order_relaxed), paused_.load(std::memory_order_relaxed)};
}

}  // namespace faultline::migration
