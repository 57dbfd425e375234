#include "src/migration/postcopy_source.h"

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <optional>
#include <thread>

#include "src/migration/handshake.h"
#include "src/migration/page_sender.h"
#include "src/migration/postcopy_session.h"
#include "src/sys/sched.h"

namespace faultline::migration {
namespace {

using Clock = std::chrono::steady_clock;

bool IsZero(const uint8_t* page) {
  uint64_t acc = 0;
  for (size_t i = 0; i < kWirePageSize; i += 8) {
    uint64_t word;
    std::memcpy(&word, page + i, 8);
    acc |= word;
  }
  return acc == 0;
}

std::chrono::microseconds Since(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t);
}

}  // namespace

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

// One session: its links, and the first failure, which breaks every link so
// that every thread using them stops.
class PostcopySource::Attempt {
 public:
  Session session;
  std::unique_ptr<Link> priority;

  void Break(Status why) {
    std::lock_guard lock(mu_);
    if (error_.ok()) error_ = std::move(why);
    broken_ = true;
    session.Shutdown();
    if (priority) priority->channel().Shutdown();
    cv_.notify_all();
  }
  bool broken() const {
    std::lock_guard lock(mu_);
    return broken_;
  }
  Status error() const {
    std::lock_guard lock(mu_);
    return error_;
  }
  // The watcher's verdict on the main channel: OK once CompleteAck came.
  void SetPeer(Status s) {
    std::lock_guard lock(mu_);
    peer_ = std::move(s);
    cv_.notify_all();
  }
  Status WaitPeer() {
    std::unique_lock lock(mu_);
    // Break() shuts the main channel down, so the watcher always ends. Its
    // word is final: a CompleteAck read before other channels closed wins.
    cv_.wait(lock, [&] { return peer_.has_value(); });
    if (peer_->ok()) return Status::Ok();
    return error_.ok() ? *peer_ : error_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool broken_ = false;         // guarded by mu_
  Status error_;                // guarded by mu_
  std::optional<Status> peer_;  // guarded by mu_
};

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

// The main channel during post-copy: reads until the destination's
// CompleteAck (the end), its Error or a break, and gives the attempt the
// verdict.
class PostcopySource::Watcher {
 public:
  explicit Watcher(Attempt& a) : a_(a), thread_([this] { Run(); }) {}
  void Join() { thread_.join(); }
  // The destination sent Error: it refused before running the guest
  // (docs/protocol.md §7.5), so the guest may run here again.
  bool peer_refused() const { return peer_refused_.load(); }

 private:
  void Run() {
    MessageReader& reader = a_.session.main->reader();
    Result<Message> m = reader.Read();
    while (!m && m.error().code() == EAGAIN) m = reader.Read();
    Status end;
    if (!m) {
      end = m.error().WithContext("main channel");
    } else if (std::holds_alternative<CompleteAck>(*m)) {
      end = Status::Ok();
    } else if (const auto* e = std::get_if<ErrorMessage>(&*m)) {
      end = PeerError(*e).WithContext("the destination failed");
      peer_refused_.store(true);
    } else {
      end = Error("the destination sent {} on the main channel", MessageTypeName(TypeOf(*m)));
    }
    if (!end.ok()) a_.Break(end);
    a_.SetPeer(end);
  }

  Attempt& a_;
  std::atomic<bool> peer_refused_{false};
  std::thread thread_;  // last: starts once the members above exist
};

// The priority channel: answers each page request at once, from the paused
// guest's memory, and moves those pages out of the push order.
class PostcopySource::Responder {
 public:
  Responder(PostcopySource& source, Attempt& a, uint32_t final_pass,
            const std::atomic<bool>& complete_sent)
      : s_(source),
        a_(a),
        final_pass_(final_pass),
        complete_sent_(complete_sent),
        thread_([this] { Run(); }) {}
  void Join() { thread_.join(); }
  uint64_t served() const { return served_.load(); }
  uint64_t rejected() const { return rejected_.load(); }
  bool realtime() const { return realtime_.load(); }

 private:
  void Run() {
    if (s_.options_.realtime_priority != 0 &&
        sys::SetRealtime(s_.options_.realtime_priority).ok()) {
      realtime_.store(true);
    }
    Link& link = *a_.priority;
    while (true) {
      Result<Message> m = link.reader().Read();
      if (!m && m.error().code() == EAGAIN) continue;
      if (!m && link.reader().last_error_left_stream_intact()) {
        // A request the decoder refused (an index outside the block, say):
        // the frame was read whole, so the channel is still usable.
        rejected_.fetch_add(1, std::memory_order_relaxed);
        s_.Log(fmt::format("post-copy: rejected a page request: {}", m.error().ToString()));
        continue;
      }
      // Once Complete is out, the destination closes its channels when it
      // has every page; only the main channel's answer counts then.
      if (!m && complete_sent_.load()) return;
      if (!m) return a_.Break(m.error().WithContext("priority channel"));
      const auto* request = std::get_if<PageRequest>(&*m);
      if (request == nullptr) {
        return a_.Break(Error("priority channel: unexpected {}", MessageTypeName(TypeOf(*m))));
      }
      Status sent = Answer(link, *request);
      if (!sent.ok() && complete_sent_.load()) return;
      if (!sent.ok()) return a_.Break(sent.WithContext("priority channel"));
    }
  }

  Status Answer(Link& link, const PageRequest& request) {
    s_.scheduler_->Requested(request.block, request.pages);
    const uint8_t* host = s_.blocks_[request.block]->host();
    data_.clear();
    for (uint32_t p : request.pages) {
      data_.push_back(ConstBuffer(host + uint64_t{p} * kWirePageSize, kWirePageSize));
    }
    RETURN_IF_ERROR(
        link.writer().SendPages(PagesHeader{request.block, final_pass_, 0, request.pages}, data_));
    served_.fetch_add(1, std::memory_order_relaxed);
    s_.pages_requested_.fetch_add(request.pages.size(), std::memory_order_relaxed);
    return Status::Ok();
  }

  PostcopySource& s_;
  Attempt& a_;
  const uint32_t final_pass_;
  const std::atomic<bool>& complete_sent_;
  std::vector<ConstBuffer> data_;  // the responder thread's
  std::atomic<uint64_t> served_{0}, rejected_{0};
  std::atomic<bool> realtime_{false};
  std::thread thread_;  // last: starts once the members above exist
};

// One page channel: pushes batches in the scheduler's order (zero pages as
// runs) until every page is out, then ends the pass.
class PostcopySource::Pusher {
 public:
  Pusher(PostcopySource& source, Attempt& a, size_t channel, uint32_t final_pass,
         bool marker_sent)
      : s_(source),
        a_(a),
        channel_(channel),
        final_pass_(final_pass),
        marker_sent_(marker_sent),
        thread_([this] { Run(); }) {}
  void Join() { thread_.join(); }

 private:
  void Run() {
    MessageWriter& writer = a_.session.pages[channel_]->writer();
    // The push opens with a copy of the Switchover: the destination's
    // channel thread learns that pre-copy ended on this channel.
    Status s = marker_sent_ ? Status::Ok() : writer.Send(s_.switchover_);
    while (s.ok() && !a_.broken()) {
      std::optional<PushBatch> batch = s_.scheduler_->Next(s_.options_.push_batch_pages);
      if (!batch) break;
      s = Push(writer, *batch);
      if (!s.ok()) s_.scheduler_->Return(*batch);
    }
    if (s.ok() && !a_.broken()) s = writer.Send(PassEnd{final_pass_, data_pages_, zero_pages_, 0});
    if (!s.ok()) a_.Break(s.WithContext(fmt::format("page channel {}", channel_)));
  }

  Status Push(MessageWriter& writer, const PushBatch& batch) {
    const uint8_t* host = s_.blocks_[batch.block]->host();
    PagesHeader pages{batch.block, final_pass_, 0, {}};
    ZeroPages zeros{batch.block, final_pass_, {}};
    data_.clear();
    for (uint32_t p : batch.pages) {
      const uint8_t* page = host + uint64_t{p} * kWirePageSize;
      if (!IsZero(page)) {
        pages.pages.push_back(p);
        data_.push_back(ConstBuffer(page, kWirePageSize));
      } else if (!zeros.runs.empty() && zeros.runs.back().first + zeros.runs.back().count == p) {
        ++zeros.runs.back().count;
      } else {
        zeros.runs.push_back({p, 1});
      }
    }
    if (!pages.pages.empty()) RETURN_IF_ERROR(writer.SendPages(pages, data_));
    if (!zeros.runs.empty()) RETURN_IF_ERROR(writer.Send(zeros));
    data_pages_ += pages.pages.size();
    zero_pages_ += zeros.page_count();
    s_.pages_pushed_.fetch_add(batch.pages.size(), std::memory_order_relaxed);
    return Status::Ok();
  }

  PostcopySource& s_;
  Attempt& a_;
  const size_t channel_;
  const uint32_t final_pass_;
  const bool marker_sent_;  // Switchover() sent this channel's copy already
  std::vector<ConstBuffer> data_;
  uint64_t data_pages_ = 0, zero_pages_ = 0;
  std::thread thread_;  // last: starts once the members above exist
};

// Serves one session of post-copy until CompleteAck or a break.
Status PostcopySource::Postcopy() {
  Attempt& a = *active_;
  const uint32_t final_pass = static_cast<uint32_t>(stats_.passes.size());
  const auto started = Clock::now();
  std::atomic<bool> complete_sent{false};
  Watcher watcher(a);
  Responder responder(*this, a, final_pass, complete_sent);
  {
    const bool markers_sent = markers_sent_;  // by Switchover(), in the first session only
    markers_sent_ = false;
    std::vector<std::unique_ptr<Pusher>> pushers;
    for (size_t c = 0; c < a.session.pages.size(); ++c) {
      pushers.push_back(std::make_unique<Pusher>(*this, a, c, final_pass, markers_sent));
    }
    for (auto& p : pushers) p->Join();
  }
  if (!a.broken()) {
    complete_sent.store(true);
    Status s = a.session.main->writer().Send(Complete{final_pass + 1, 0, 0});
    if (!s.ok()) a.Break(s.WithContext("main channel"));
  }
  Status end = a.WaitPeer();
  a.Break(end.ok() ? Status(ECANCELED, "completed") : end);  // stops the responder
  responder.Join();
  watcher.Join();
  stats_.realtime = responder.realtime();
  stats_.requests_served += responder.served();
  stats_.requests_rejected += responder.rejected();
  stats_.pages_pushed = pages_pushed_.load();
  stats_.pages_requested = pages_requested_.load();
  stats_.postcopy += Since(started);
  if (end.ok()) {
    phase_.store(PostcopyPhase::kCompleted, std::memory_order_release);
    return Status::Ok();
  }
  if (watcher.peer_refused() && stats_.sessions == 1) {
    vm_.Resume();
    phase_.store(PostcopyPhase::kFailed, std::memory_order_release);
    return end.WithContext("the destination refused the switchover; the VM was resumed here");
  }
  phase_.store(PostcopyPhase::kPaused, std::memory_order_release);
  return end.WithContext(PostcopyPhaseName(PostcopyPhase::kPaused));
}

Result<PostcopySourceStats> PostcopySource::Resume(Connector& connector) {
  if (phase() != PostcopyPhase::kPaused) {
    return Error("PostcopySource::Resume: the migration is {}, not paused",
                 PostcopyPhaseName(phase()));
  }
  std::vector<BlockInfo> infos;
  for (const auto& b : blocks_) infos.push_back(DescribeBlock(*b));
  Attempt attempt;
  ASSIGN_OR_RETURN(attempt.session,
                   ConnectSession(connector, {infos, options_.base.page_channels, options_.base.key,
                                              kFeaturePostcopy | kFeatureRecovery,
                                              vm_.accelerator()}));
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
