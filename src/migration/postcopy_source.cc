#include "src/migration/postcopy_source.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <optional>
#include <thread>

#include "src/migration/attempt.h"
#include "src/migration/elapsed.h"
#include "src/migration/handshake.h"
#include "src/migration/postcopy_session.h"
#include "src/migration/precopy_passes.h"
#include "src/sys/sched.h"

namespace faultline::migration {

using Clock = std::chrono::steady_clock;

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
  sys::MutexLock lock(mu_);
  // Before the guest left, the migration fails (the state machine turns the
  // attempt's failure into Cancelled); after, breaking the session pauses.
  (void)state_.Cancel();
  if (active_ != nullptr) active_->Fail(Status(ECANCELED, "migration cancelled"));
}

PostcopyPhase PostcopySource::phase() const {
  sys::MutexLock lock(mu_);
  return state_.postcopy_phase();
}

PostcopyProgress PostcopySource::progress() {
  PostcopyProgress p;
  {
    sys::MutexLock lock(mu_);
    p.phase = state_.postcopy_phase();
    p.pass = state_.pass();
  }
  p.pages_sent = pages_sent_.load(std::memory_order_relaxed);
  p.pages_pushed = pages_pushed_.load(std::memory_order_relaxed);
  p.pages_requested = pages_requested_.load(std::memory_order_relaxed);
  p.requests_rejected = requests_rejected_.load(std::memory_order_relaxed);
  sys::MutexLock lock(scheduler_mu_);
  if (scheduler_) p.pages_remaining = scheduler_->remaining();
  return p;
}

Status PostcopySource::Step(Status (SourceState::*event)()) {
  sys::MutexLock lock(mu_);
  return (state_.*event)();
}

Result<PostcopySourceStats> PostcopySource::Run(Connector& connector) {
  if (options_.base.batch_pages == 0 || options_.base.batch_pages > kMaxPagesPerBatch ||
      options_.push_batch_pages == 0 || options_.push_batch_pages > kMaxPagesPerBatch) {
    return Error("batch of {}/{} pages (1 to {} allowed)", options_.base.batch_pages,
                 options_.push_batch_pages, kMaxPagesPerBatch);
  }
  Attempt a(Attempt::Reporting::kSilent);
  {
    sys::MutexLock lock(mu_);
    if (Status started = state_.Start(); !started.ok()) {
      if (started.code() == ECANCELED) {
        return started.WithContext(PostcopyPhaseName(PostcopyPhase::kFailed));
      }
      return Error("PostcopySource::Run called twice");
    }
    active_ = &a;
  }
  start_ = Clock::now();
  blocks_ = vm_.blocks();
  Status status = Connect(a, connector, false);
  if (status.ok()) {
    session_id_ = a.session().hello.session_id;
    stats_.sessions = 1;
    status = Step(&SourceState::Connected);
  }
  // Pre-copy, then the switchover; failures up to the last state message
  // leave (or put) the VM running here.
  if (status.ok()) {
    PrecopyPasses passes(vm_, blocks_, a.session(), options_.base, pages_sent_);
    status = Precopy(a, passes);
    if (status.ok()) status = Switchover(a, passes);
  }
  if (!status.ok()) return FailBeforePostcopy(a, std::move(status));
  return EndSession(a, Postcopy(a));
}

Status PostcopySource::Connect(Attempt& a, Connector& connector, bool resume) {
  std::vector<BlockInfo> infos;
  for (const auto& b : blocks_) infos.push_back(DescribeBlock(*b));
  ASSIGN_OR_RETURN(
      Session session,
      ConnectSession(connector, {infos, options_.base.page_channels, options_.base.key,
                                 kFeaturePostcopy | kFeatureRecovery, vm_.accelerator()}));
  if (!resume && !(session.ack.features & kFeaturePostcopy)) {
    (void)SendError(*session.main, ErrorCode::kFeatures,
                    Error("the source asked for post-copy, which this destination does not "
                          "offer: start it with `faultline run --incoming ... --postcopy`"));
    return Error("the destination does not support post-copy");
  }
  if (resume && !(session.ack.features & kFeatureRecovery)) {
    return SendError(*session.main, ErrorCode::kFeatures,
                     Error("the destination does not support post-copy recovery"));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Link> priority,
                   ConnectPriorityChannel(connector, session, options_.base.key));
  return a.Adopt(std::move(session), std::move(priority));
}

Status PostcopySource::Precopy(Attempt& a, PrecopyPasses& passes) {
  // Without pre-copy passes no dirty log is needed (KVM refuses one on
  // guest_memfd memslots: such a VM can still leave by post-copy alone).
  if (options_.precopy_passes > 0) RETURN_IF_ERROR(vm_.StartDirtyTracking());
  for (uint32_t pass = 0; pass < options_.precopy_passes; ++pass) {
    if (options_.precopy_passes == kPostcopyOnCommand && pass > 0 &&
        start_now_.load(std::memory_order_acquire)) {
      break;
    }
    if (a.failed()) return a.error();
    ASSIGN_OR_RETURN(const PassStats s, passes.Run(pass, a.main()));
    stats_.passes.push_back(s);
    RETURN_IF_ERROR(Step(&SourceState::PassEnded));
  }
  return Status::Ok();
}

Status PostcopySource::FailBeforePostcopy(Attempt& a, Status status) {
  if (a.failed()) status = a.error();  // the first failure says why
  a.Fail(status);
  bool resume;
  {
    sys::MutexLock lock(mu_);
    active_ = nullptr;
    (void)state_.Fail(false);
    resume = state_.resumed_here();
  }
  if (resume) vm_.Resume();
  (void)vm_.StopDirtyTracking();
  return status.WithContext(PostcopyPhaseName(PostcopyPhase::kFailed));
}

Result<PostcopySourceStats> PostcopySource::EndSession(Attempt& a, Status status) {
  {
    sys::MutexLock lock(mu_);
    active_ = nullptr;
  }
  stats_.bytes_sent += a.stats().bytes_sent;
  stats_.total = Since(start_);
  if (!status.ok()) return status;
  return stats_;
}

// Sends the set of `dirty` as DirtyPages messages (only ranges with a bit).
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

// The destination's answer to one early dirty set: PassEnd, once it dropped
// its stale copies.
static Status AwaitEarlyDirtyAnswer(Link& main) {
  while (true) {
    Result<Message> m = main.reader().Read();
    if (!m && m.error().code() == EAGAIN) continue;
    if (!m) return m.error().WithContext("waiting for the early dirty set's PassEnd");
    if (const auto* e = std::get_if<ErrorMessage>(&*m)) return PeerError(*e);
    if (!std::holds_alternative<PassEnd>(*m)) {
      return Error("expected PassEnd after the early dirty set, got {}",
                   MessageTypeName(TypeOf(*m)));
    }
    return Status::Ok();
  }
}

// The early dirty set (§10): the pages dirtied since they were last sent,
// while the guest still runs. The destination drops its stale copies and
// answers PassEnd; meanwhile the guest dirties more, so this repeats with
// the pages new since the last round until few are left: only those are
// dropped inside the pause.
Status PostcopySource::SendEarlyDirtySet(Attempt& a, PrecopyPasses& passes) {
  Link& main = a.main();
  const uint32_t last = static_cast<uint32_t>(stats_.passes.size() - 1);
  const std::vector<DirtyBitmap>& dirty = passes.dirty();
  std::vector<DirtyBitmap> sent;
  for (const DirtyBitmap& d : dirty) sent.emplace_back(d.pages());
  for (int round = 0; round < 8; ++round) {
    std::vector<DirtyBitmap> fresh = dirty;
    uint64_t count = 0;
    for (size_t b = 0; b < fresh.size(); ++b) {
      sent[b].ForEachSet([&](uint64_t p) { fresh[b].Clear(p); });
      count += fresh[b].Count();
    }
    if (count == 0 || (round > 0 && count <= 1024)) break;
    RETURN_IF_ERROR(SendDirty(main.writer(), fresh));
    RETURN_IF_ERROR(main.writer().Send(PassEnd{last, 0, 0, 0}));  // the end of this set
    RETURN_IF_ERROR(AwaitEarlyDirtyAnswer(main));
    for (size_t b = 0; b < fresh.size(); ++b) sent[b].Merge(fresh[b]);
    RETURN_IF_ERROR(passes.Harvest().status());
  }
  return Status::Ok();
}

Status PostcopySource::Switchover(Attempt& a, PrecopyPasses& passes) {
  const bool precopied = !stats_.passes.empty();
  if (precopied) RETURN_IF_ERROR(SendEarlyDirtySet(a, passes));
  // Nothing else should delay the pause.
  sys::ScopedRealtime realtime(options_.realtime_priority);
  RETURN_IF_ERROR(Step(&SourceState::Pause));
  stats_.paused_at = Clock::now();
  vm_.Pause();
  RETURN_IF_ERROR(SendState(a, passes));
  // Every state message is out: the guest may run at the destination from
  // now on, and this VM stays paused for good.
  RETURN_IF_ERROR(Step(&SourceState::GuestLeft));
  if (precopied) (void)vm_.StopDirtyTracking();  // nothing changes any more
  std::vector<DirtyBitmap> todo = std::move(passes.dirty());
  for (size_t b = 0; b < todo.size(); ++b) {
    DirtyBitmap& d = todo[b];
    if (!precopied) d.SetAll();
    // The destination installs a huge page whole and drops its copy of
    // one with a dirty page: push all of it.
    const uint64_t unit = blocks_[b]->page_size() / kWirePageSize;
    if (unit > 1) {
      for (uint64_t u = 0; u < d.pages(); u += unit) {
        if (d.AnyInRange(u, unit)) d.SetRange(u, unit);
      }
    }
  }
  PlanPush(std::move(todo));
  return Status::Ok();
}

// Inside the pause: the Switchover on main, its copy on each page channel
// (the destination's channel threads learn that pre-copy ended there while
// the state is still on its way), the whole dirty set (the early set and
// what came since), the vCPU and device state.
Status PostcopySource::SendState(Attempt& a, PrecopyPasses& passes) {
  const bool precopied = !stats_.passes.empty();
  uint64_t dirty = 0;
  if (precopied) {
    ASSIGN_OR_RETURN(dirty, passes.Harvest());
  }
  ASSIGN_OR_RETURN(std::vector<std::vector<uint8_t>> vcpus, vm_.SaveVcpus());
  ASSIGN_OR_RETURN(std::vector<DeviceBlob> devices, vm_.SaveDevices());
  const uint32_t final_pass = static_cast<uint32_t>(stats_.passes.size());
  switchover_ = migration::Switchover{SwitchoverMode::kPostcopy, final_pass, dirty,
                                      static_cast<uint32_t>(vcpus.size()),
                                      static_cast<uint32_t>(devices.size())};
  Link& main = a.main();
  RETURN_IF_ERROR(main.writer().Send(switchover_));
  for (size_t c = 0; c < a.page_channels(); ++c) {
    RETURN_IF_ERROR(a.page(c).writer().Send(switchover_));
  }
  markers_sent_ = true;
  if (precopied) RETURN_IF_ERROR(SendDirty(main.writer(), passes.dirty()));
  for (uint32_t i = 0; i < vcpus.size(); ++i) {
    RETURN_IF_ERROR(main.writer().Send(VcpuStateMessage{i, std::move(vcpus[i])}));
  }
  for (DeviceBlob& d : devices) {
    RETURN_IF_ERROR(main.writer().Send(DeviceState{d.name, std::move(d.state)}));
  }
  stats_.switchover_send = Since(stats_.paused_at);
  stats_.switchover_dirty_pages = dirty;
  return Status::Ok();
}

void PostcopySource::PlanPush(std::vector<DirtyBitmap> todo) {
  std::vector<uint32_t> units;
  for (const auto& b : blocks_) {
    units.push_back(static_cast<uint32_t>(b->page_size() / kWirePageSize));
  }
  sys::MutexLock lock(scheduler_mu_);
  scheduler_ = std::make_unique<PushScheduler>(std::move(todo), std::move(units), options_.push);
}

Result<PostcopySourceStats> PostcopySource::Resume(Connector& connector) {
  Attempt a(Attempt::Reporting::kSilent);
  {
    sys::MutexLock lock(mu_);
    if (!state_.Resume().ok()) {
      return Error("PostcopySource::Resume: the migration is {}, not paused",
                   PostcopyPhaseName(state_.postcopy_phase()));
    }
    active_ = &a;
  }
  Status status = Connect(a, connector, true);
  Result<std::vector<DirtyBitmap>> todo = Error("not connected");
  if (status.ok()) {
    todo = ReceivePresent(a);
    status = todo.status();
  }
  if (status.ok()) status = Step(&SourceState::Resumed);
  if (!status.ok()) {
    sys::MutexLock lock(mu_);
    active_ = nullptr;
    (void)state_.Fail(false);  // still paused
    return status;
  }
  PlanPush(std::move(*todo));
  ++stats_.sessions;
  return EndSession(a, Postcopy(a));
}

Result<std::vector<DirtyBitmap>> PostcopySource::ReceivePresent(Attempt& a) {
  Link& main = a.main();
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
      return todo;
    } else if (const auto* e = std::get_if<ErrorMessage>(&*m)) {
      return PeerError(*e).WithContext("resume");
    } else {
      return SendError(main, ErrorCode::kProtocol,
                       Error("resume: unexpected {}", MessageTypeName(TypeOf(*m))));
    }
  }
}

}  // namespace faultline::migration
