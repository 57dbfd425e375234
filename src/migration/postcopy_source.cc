#include "src/migration/postcopy_source.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <optional>
#include <thread>

#include "src/migration/handshake.h"
#include "src/migration/page_sender.h"
#include "src/migration/postcopy_session.h"
#include "src/migration/postcopy_source_attempt.h"
#include "src/sys/sched.h"

namespace faultline::migration {

using Clock = std::chrono::steady_clock;

const char* PostcopyPhaseName(PostcopyPhase phase) {
  switch (phase) {
    case PostcopyPhase::kNotStarted:
      return "not started";
    case PostcopyPhase::kPrecopy:
      return "pre-copy";
    case PostcopyPhase::kPostcopy:
      return "post-copy";
    case PostcopyPhase::kPaused:
      return "post-copy paused (link lost; resume with a new connection)";
    case PostcopyPhase::kCompleted:
      return "completed";
    case PostcopyPhase::kFailed:
      return "failed; the VM kept running here";
  }
  return "?";
}

PostcopySource::PostcopySource(SourceVm& vm, PostcopySourceOptions options)
    : vm_(vm), options_(std::move(options)) {}

PostcopySource::~PostcopySource() = default;

void PostcopySource::Log(std::string_view text) const {
  if (options_.log) {
    options_.log(text);
  } else {
    std::fprintf(stderr, "faultline: %.*s\n", static_cast<int>(text.size()), text.data());
  }
}

void PostcopySource::Cancel() {
  std::lock_guard lock(mu_);
  cancelled_ = true;
  if (active_ != nullptr) active_->Break(Status(ECANCELED, "migration cancelled"));
}

PostcopyProgress PostcopySource::progress() {
  PostcopyProgress p;
  p.phase = phase();
  p.pass = pass_.load(std::memory_order_relaxed);
  p.pages_sent = pages_sent_.load(std::memory_order_relaxed);
  p.pages_pushed = pages_pushed_.load(std::memory_order_relaxed);
  p.pages_requested = pages_requested_.load(std::memory_order_relaxed);
  std::lock_guard lock(scheduler_mu_);
  if (scheduler_) p.pages_remaining = scheduler_->remaining();
  return p;
}

Result<PostcopySourceStats> PostcopySource::Run(Connector& connector) {
  if (phase() != PostcopyPhase::kNotStarted) return Error("PostcopySource::Run called twice");
  if (options_.base.batch_pages == 0 || options_.base.batch_pages > kMaxPagesPerBatch ||
      options_.push_batch_pages == 0 || options_.push_batch_pages > kMaxPagesPerBatch) {
    return Error("batch of {}/{} pages (1 to {} allowed)", options_.base.batch_pages,
                 options_.push_batch_pages, kMaxPagesPerBatch);
  }
  start_ = Clock::now();
  phase_.store(PostcopyPhase::kPrecopy, std::memory_order_release);
  blocks_ = vm_.blocks();
  std::vector<BlockInfo> infos;
  for (const auto& b : blocks_) infos.push_back(DescribeBlock(*b));

  Attempt attempt;
  auto fail_running = [&](Status s) -> Status {
    (void)vm_.StopDirtyTracking();
    phase_.store(PostcopyPhase::kFailed, std::memory_order_release);
    return s.WithContext(PostcopyPhaseName(PostcopyPhase::kFailed));
  };
  {
    Result<Session> session =
        ConnectSession(connector, {infos, options_.base.page_channels, options_.base.key,
                                   kFeaturePostcopy | kFeatureRecovery, vm_.accelerator()});
    if (!session) return fail_running(session.error());
    if (!(session->ack.features & kFeaturePostcopy)) {
      (void)SendError(*session->main, ErrorCode::kFeatures,
                      Error("the source asked for post-copy, which this destination does not "
                            "offer: start it with `faultline run --incoming ... --postcopy`"));
      return fail_running(Error("the destination does not support post-copy"));
    }
    attempt.session = std::move(*session);
  }
  session_id_ = attempt.session.hello.session_id;
  Result<std::unique_ptr<Link>> priority =
      ConnectPriorityChannel(connector, attempt.session, options_.base.key);
  if (!priority) return fail_running(priority.error());
  attempt.priority = std::move(*priority);
  {
    std::lock_guard lock(mu_);
    active_ = &attempt;
    if (cancelled_) attempt.Break(Status(ECANCELED, "migration cancelled"));
  }
  stats_.sessions = 1;

  // Pre-copy, then the switchover; failures up to the last state message
  // leave (or put) the VM running here.
  Status status = [&]() -> Status {
    PageSender sender(attempt.session, blocks_, options_.base, pages_sent_);
    // Without pre-copy passes no dirty log is needed (KVM refuses one on
    // guest_memfd memslots: such a VM can still leave by post-copy alone).
    if (options_.precopy_passes > 0) RETURN_IF_ERROR(vm_.StartDirtyTracking());
    for (const auto& b : blocks_) {
      dirty_.emplace_back(b->size() / kWirePageSize);
      dirty_.back().SetAll();
    }
    Link& main = *attempt.session.main;
    for (uint32_t pass = 0; pass < options_.precopy_passes; ++pass) {
      if (options_.precopy_passes == kPostcopyOnCommand && pass > 0 &&
          start_now_.load(std::memory_order_acquire)) {
        break;
      }
      if (attempt.broken()) return attempt.error();
      pass_.store(pass, std::memory_order_relaxed);
      const auto t = Clock::now();
      ASSIGN_OR_RETURN(PageSender::PassTotals totals, sender.SendPass(dirty_, pass, false));
      for (DirtyBitmap& d : dirty_) d.ClearAll();
      PassStats s{pass, totals.data_pages, totals.zero_pages,
                  std::chrono::duration<double>(Clock::now() - t).count(), 0};
      ASSIGN_OR_RETURN(s.dirty_after, Harvest());
      stats_.passes.push_back(s);
      RETURN_IF_ERROR(main.writer().Send(PassEnd{pass, s.data_pages, s.zero_pages, s.dirty_after}));
    }
    return Switchover();
  }();
  if (!status.ok()) {
    status = attempt.error().ok() ? status : attempt.error();
    attempt.Break(status);
    if (stats_.paused_at != Clock::time_point{}) vm_.Resume();
    std::lock_guard lock(mu_);
    active_ = nullptr;
    return fail_running(status);
  }
  phase_.store(PostcopyPhase::kPostcopy, std::memory_order_release);
  status = Postcopy();
  std::lock_guard lock(mu_);
  active_ = nullptr;
  stats_.bytes_sent +=
      attempt.session.stats().bytes_sent + attempt.priority->channel().stats().bytes_sent;
  stats_.total = Since(start_);
  if (!status.ok()) return status;
  return stats_;
}

Result<uint64_t> PostcopySource::Harvest() {
  uint64_t count = 0;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    RETURN_IF_ERROR(vm_.TakeDirty(*blocks_[i], taken_));
    if (taken_.pages() != dirty_[i].pages()) {
      return Error("dirty bitmap of block '{}' has {} pages, expected {}", blocks_[i]->name(),
                   taken_.pages(), dirty_[i].pages());
    }
    dirty_[i].Merge(taken_);
    count += dirty_[i].Count();
  }
  return count;
}

// Sends the set of `dirty_` as DirtyPages messages (only ranges with a bit).
static Status SendDirty(MessageWriter& writer, const std::vector<DirtyBitmap>& dirty) {
  for (uint32_t b = 0; b < dirty.size(); ++b) {
    const DirtyBitmap& d = dirty[b];
    for (uint64_t first = 0; first < d.pages(); first += kMaxBitmapPages) {
      const uint32_t count =
          static_cast<uint32_t>(std::min<uint64_t>(kMaxBitmapPages, d.pages() - first));
      if (!d.AnyInRange(first, count)) continue;
      DirtyPages m{b, first, count,
                   std::vector<uint64_t>(d.words().begin() + first / 64,
                                         d.words().begin() + (first + count + 63) / 64)};
      RETURN_IF_ERROR(writer.Send(m));
    }
  }
  return Status::Ok();
}

Status PostcopySource::Switchover() {
  Attempt& a = *active_;  // set by Run, which is the only caller
  Link& main = *a.session.main;
  if (!stats_.passes.empty()) {
    // The early dirty set (§10): the pages dirtied since they were last
    // sent, while the guest still runs. The destination drops its stale
    // copies and answers PassEnd; meanwhile the guest dirties more, so this
    // repeats with the pages new since the last round until few are left:
    // only those are dropped inside the pause.
    const uint32_t last = static_cast<uint32_t>(stats_.passes.size() - 1);
    std::vector<DirtyBitmap> sent;
    for (const DirtyBitmap& d : dirty_) sent.emplace_back(d.pages());
    for (int round = 0; round < 8; ++round) {
      std::vector<DirtyBitmap> fresh = dirty_;
      uint64_t count = 0;
      for (size_t b = 0; b < fresh.size(); ++b) {
        sent[b].ForEachSet([&](uint64_t p) { fresh[b].Clear(p); });
        count += fresh[b].Count();
      }
      if (count == 0 || (round > 0 && count <= 1024)) break;
      RETURN_IF_ERROR(SendDirty(main.writer(), fresh));
      RETURN_IF_ERROR(main.writer().Send(PassEnd{last, 0, 0, 0}));  // the end of this set
      while (true) {
        Result<Message> m = main.reader().Read();
        if (!m && m.error().code() == EAGAIN) continue;
        if (!m) return m.error().WithContext("waiting for the early dirty set's PassEnd");
        if (const auto* e = std::get_if<ErrorMessage>(&*m)) return PeerError(*e);
        if (!std::holds_alternative<PassEnd>(*m)) {
          return Error("expected PassEnd after the early dirty set, got {}",
                       MessageTypeName(TypeOf(*m)));
        }
        break;
      }
      for (size_t b = 0; b < fresh.size(); ++b) sent[b].Merge(fresh[b]);
      RETURN_IF_ERROR(Harvest().status());
    }
  }
  // Nothing else should delay the pause.
  sys::ScopedRealtime realtime(options_.realtime_priority);
  stats_.paused_at = Clock::now();
  vm_.Pause();
  const bool precopied = !stats_.passes.empty();
  uint64_t dirty = 0;
  if (precopied) {
    ASSIGN_OR_RETURN(dirty, Harvest());
  }
  ASSIGN_OR_RETURN(std::vector<std::vector<uint8_t>> vcpus, vm_.SaveVcpus());
  ASSIGN_OR_RETURN(std::vector<DeviceBlob> devices, vm_.SaveDevices());
  const uint32_t final_pass = static_cast<uint32_t>(stats_.passes.size());
  pass_.store(final_pass, std::memory_order_relaxed);
  switchover_ = migration::Switchover{SwitchoverMode::kPostcopy, final_pass, dirty,
                                      static_cast<uint32_t>(vcpus.size()),
                                      static_cast<uint32_t>(devices.size())};
  RETURN_IF_ERROR(main.writer().Send(switchover_));
  // Each page channel's copy right away: the destination's channel threads
  // learn that pre-copy ended there while the state is still on its way.
  for (auto& link : a.session.pages) RETURN_IF_ERROR(link->writer().Send(switchover_));
  markers_sent_ = true;
  // The whole dirty set (the early set and what came since).
  if (precopied) RETURN_IF_ERROR(SendDirty(main.writer(), dirty_));
  for (uint32_t i = 0; i < vcpus.size(); ++i) {
    RETURN_IF_ERROR(main.writer().Send(VcpuStateMessage{i, std::move(vcpus[i])}));
  }
  for (DeviceBlob& d : devices) {
    RETURN_IF_ERROR(main.writer().Send(DeviceState{d.name, std::move(d.state)}));
  }
  stats_.switchover_send = Since(stats_.paused_at);
  stats_.switchover_dirty_pages = dirty;
  if (precopied) (void)vm_.StopDirtyTracking();  // paused for good: nothing changes any more
  std::vector<uint32_t> units;
  for (const auto& b : blocks_)
    units.push_back(static_cast<uint32_t>(b->page_size() / kWirePageSize));
  std::vector<DirtyBitmap> todo;
  for (size_t b = 0; b < dirty_.size(); ++b) {
    DirtyBitmap& d = dirty_[b];
    if (!precopied) d.SetAll();
    // The destination installs a huge page whole and drops its copy of
    // one with a dirty page: push all of it.
    const uint64_t unit = units[b];
    if (unit > 1) {
      for (uint64_t u = 0; u < d.pages(); u += unit) {
        if (d.AnyInRange(u, unit)) d.SetRange(u, unit);
      }
    }
    todo.push_back(std::move(d));
  }
  dirty_.clear();
  std::lock_guard lock(scheduler_mu_);
  scheduler_ = std::make_unique<PushScheduler>(std::move(todo), std::move(units), options_.push);
  return Status::Ok();
}

Result<PostcopySourceStats> PostcopySource::Resume(Connector& connector) {
  if (phase() != PostcopyPhase::kPaused) {
    return Error("PostcopySource::Resume: the migration is {}, not paused",
                 PostcopyPhaseName(phase()));
  }
  std::vector<BlockInfo> infos;
  for (const auto& b : blocks_) infos.push_back(DescribeBlock(*b));
  Attempt attempt;
  ASSIGN_OR_RETURN(
      attempt.session,
      ConnectSession(connector, {infos, options_.base.page_channels, options_.base.key,
                                 kFeaturePostcopy | kFeatureRecovery, vm_.accelerator()}));
  if (!(attempt.session.ack.features & kFeatureRecovery)) {
    return SendError(*attempt.session.main, ErrorCode::kFeatures,
                     Error("the destination does not support post-copy recovery"));
  }
  ASSIGN_OR_RETURN(attempt.priority,
                   ConnectPriorityChannel(connector, attempt.session, options_.base.key));
  Link& main = *attempt.session.main;
  RETURN_IF_ERROR(main.writer().Send(migration::Resume{session_id_, 0}));
  // What the destination has: whatever it has needs no push.
  std::vector<DirtyBitmap> todo;
  for (const auto& b : blocks_) {
    todo.emplace_back(b->size() / kWirePageSize);
    todo.back().SetAll();
  }
  uint64_t have = 0;
  while (true) {
    Result<Message> m = main.reader().Read();
    if (!m && m.error().code() == EAGAIN) continue;
    if (!m) return m.error().WithContext("resume");
    if (const auto* bits = std::get_if<PresentBitmap>(&*m)) {
      for (uint32_t i = 0; i < bits->page_count; ++i) {
        if ((bits->words[i / 64] >> (i % 64)) & 1) {
          todo[bits->block].Clear(bits->first_page + i);
          ++have;
        }
      }
    } else if (const auto* r = std::get_if<migration::Resume>(&*m)) {
      if (r->session_id != session_id_ || r->pages != have) {
        return SendError(
            main, ErrorCode::kProtocol,
            Error("Resume answer for session {:#x} with {} pages; expected {:#x}, {} pages",
                  r->session_id, r->pages, session_id_, have));
      }
      break;
    } else if (const auto* e = std::get_if<ErrorMessage>(&*m)) {
      return PeerError(*e).WithContext("resume");
    } else {
      return SendError(main, ErrorCode::kProtocol,
                       Error("resume: unexpected {}", MessageTypeName(TypeOf(*m))));
    }
  }
  std::vector<uint32_t> units;
  for (const auto& b : blocks_)
    units.push_back(static_cast<uint32_t>(b->page_size() / kWirePageSize));
  {
    std::lock_guard lock(scheduler_mu_);
    scheduler_ = std::make_unique<PushScheduler>(std::move(todo), std::move(units), options_.push);
  }
  {
    std::lock_guard lock(mu_);
    active_ = &attempt;
  }
  ++stats_.sessions;
  phase_.store(PostcopyPhase::kPostcopy, std::memory_order_release);
  Status status = Postcopy();
  std::lock_guard lock(mu_);
  active_ = nullptr;
  stats_.bytes_sent +=
      attempt.session.stats().bytes_sent + attempt.priority->channel().stats().bytes_sent;
  stats_.total = Since(start_);
  if (!status.ok()) return status;
  return stats_;
}

}  // namespace faultline::migration
