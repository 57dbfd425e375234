// Post-copy's threads on the source: the priority channel's responder and
// one pusher per page channel, and PostcopySource::Postcopy(), which runs
// them and the main channel's watcher (completion_watcher.h) for one
// session.
#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "src/migration/attempt.h"
#include "src/migration/completion_watcher.h"
#include "src/migration/elapsed.h"
#include "src/migration/page_sender.h"
#include "src/migration/postcopy_source.h"
#include "src/sys/sched.h"

namespace faultline::migration {

// With answers_on_bulk: page channel 0, shared by its pusher and the
// responder until the pusher has ended the pass. The answers count in the
// channel's PassEnd, as the destination counts every Pages on it.
struct PostcopySource::SharedChannel {
  sys::Mutex mu;
  bool open GUARDED_BY(mu) = false;  // the channel's Switchover marker is out
  bool ended GUARDED_BY(mu) = false;
  uint64_t answered_pages GUARDED_BY(mu) = 0;
};

// The priority channel: answers each page request at once, from the paused
// guest's memory, and moves those pages out of the push order.
class PostcopySource::Responder {
 public:
  static constexpr uint64_t kLoggedRejections = 8;

  Responder(PostcopySource& source, Attempt& a, PushScheduler& scheduler, uint32_t final_pass,
            const std::atomic<bool>& complete_sent, SharedChannel* bulk)
      : s_(source),
        a_(a),
        scheduler_(scheduler),
        final_pass_(final_pass),
        complete_sent_(complete_sent),
        bulk_(bulk),
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
    Link& link = a_.priority();
    while (true) {
      Result<Message> m = link.reader().Read();
      if (!m && m.error().code() == EAGAIN) continue;
      if (!m && link.reader().last_error_left_stream_intact()) {
        // A request the decoder refused (an index outside the block, say):
        // the frame was read whole, so the channel is still usable.
        // Logged up to kLoggedRejections times: a peer that floods bad
        // requests must not flood the log as well.
        const uint64_t n = rejected_.fetch_add(1, std::memory_order_relaxed) + 1;
        s_.requests_rejected_.fetch_add(1, std::memory_order_relaxed);
        if (n <= kLoggedRejections) {
          s_.Log(
              fmt::format("post-copy: rejected a page request: {}{}", m.error().ToString(),
                          n == kLoggedRejections ? " (further rejections are only counted)" : ""));
        }
        continue;
      }
      // Once Complete is out, the destination closes its channels when it
      // has every page; only the main channel's answer counts then.
      if (!m && complete_sent_.load()) return;
      if (!m) return a_.Fail(m.error().WithContext("priority channel"));
      const auto* request = std::get_if<PageRequest>(&*m);
      if (request == nullptr) {
        return a_.Fail(Error("priority channel: unexpected {}", MessageTypeName(TypeOf(*m))));
      }
      Status sent = Answer(link, *request);
      if (!sent.ok() && complete_sent_.load()) return;
      if (!sent.ok()) return a_.Fail(sent.WithContext("priority channel"));
    }
  }

  Status Answer(Link& link, const PageRequest& request) {
    scheduler_.Requested(request.block, request.pages);
    const uint8_t* host = s_.blocks_[request.block]->host();
    data_.clear();
    for (uint32_t p : request.pages) {
      data_.push_back(ConstBuffer(host + uint64_t{p} * kWirePageSize, kWirePageSize));
    }
    const PagesHeader answer{request.block, final_pass_, 0, request.pages};
    if (!AnswerOnBulk(answer)) RETURN_IF_ERROR(link.writer().SendPages(answer, data_));
    served_.fetch_add(1, std::memory_order_relaxed);
    s_.pages_requested_.fetch_add(request.pages.size(), std::memory_order_relaxed);
    return Status::Ok();
  }

  // With answers_on_bulk, before page channel 0 ends its pass: the answer
  // goes out there, behind the push. False: send it on the priority channel.
  bool AnswerOnBulk(const PagesHeader& answer) {
    if (bulk_ == nullptr) return false;
    sys::MutexLock lock(bulk_->mu);
    if (!bulk_->open || bulk_->ended) return false;
    if (!a_.page(0).writer().SendPages(answer, data_).ok()) {
      // The page channel broke (its pusher reports it): this answer and
      // the next go on the priority channel.
      bulk_->ended = true;
      return false;
    }
    bulk_->answered_pages += answer.pages.size();
    return true;
  }

  PostcopySource& s_;
  Attempt& a_;
  PushScheduler& scheduler_;  // the session's (the source replaces it only between sessions)
  const uint32_t final_pass_;
  const std::atomic<bool>& complete_sent_;
  SharedChannel* const bulk_;      // null: answers on the priority channel
  std::vector<ConstBuffer> data_;  // the responder thread's
  std::atomic<uint64_t> served_{0}, rejected_{0};
  std::atomic<bool> realtime_{false};
  std::thread thread_;  // last: starts once the members above exist
};

// One page channel: pushes batches in the scheduler's order (zero pages as
// runs) until every page is out, then ends the pass.
class PostcopySource::Pusher {
 public:
  Pusher(PostcopySource& source, Attempt& a, PushScheduler& scheduler, size_t channel,
         uint32_t final_pass, bool marker_sent, SharedChannel* shared)
      : s_(source),
        a_(a),
        scheduler_(scheduler),
        channel_(channel),
        final_pass_(final_pass),
        marker_sent_(marker_sent),
        shared_(shared),
        thread_([this] { Run(); }) {}
  void Join() { thread_.join(); }

 private:
  void Run() {
    MessageWriter& writer = a_.page(channel_).writer();
    // The push opens with a copy of the Switchover: the destination's
    // channel thread learns that pre-copy ended on this channel.
    Status s = marker_sent_ ? Status::Ok() : writer.Send(s_.switchover_);
    if (shared_ != nullptr) {
      sys::MutexLock lock(shared_->mu);
      shared_->open = s.ok();
    }
    while (s.ok() && !a_.failed()) {
      std::optional<PushBatch> batch = scheduler_.Next(s_.options_.push_batch_pages);
      if (!batch) break;
      s = Push(writer, *batch);
      if (!s.ok()) scheduler_.Return(*batch);
    }
    if (s.ok() && !a_.failed()) s = EndPass(writer);
    if (!s.ok()) a_.Fail(s.WithContext(fmt::format("page channel {}", channel_)));
  }

  Status EndPass(MessageWriter& writer) {
    if (shared_ == nullptr) return writer.Send(PassEnd{final_pass_, data_pages_, zero_pages_, 0});
    sys::MutexLock lock(shared_->mu);
    shared_->ended = true;
    return writer.Send(PassEnd{final_pass_, data_pages_ + shared_->answered_pages, zero_pages_, 0});
  }

  Status Push(MessageWriter& writer, const PushBatch& batch) {
    if (shared_ == nullptr) return PushBatchOf(writer, batch);
    sys::MutexLock lock(shared_->mu);
    return PushBatchOf(writer, batch);
  }

  Status PushBatchOf(MessageWriter& writer, const PushBatch& batch) {
    const uint8_t* host = s_.blocks_[batch.block]->host();
    PagesHeader pages{batch.block, final_pass_, 0, {}};
    ZeroPages zeros{batch.block, final_pass_, {}};
    data_.clear();
    for (uint32_t p : batch.pages) {
      const uint8_t* page = host + uint64_t{p} * kWirePageSize;
      if (!IsZeroPage(page)) {
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
  PushScheduler& scheduler_;
  const size_t channel_;
  const uint32_t final_pass_;
  const bool marker_sent_;       // Switchover() sent this channel's copy already
  SharedChannel* const shared_;  // non-null: the responder's answers go here too
  std::vector<ConstBuffer> data_;
  uint64_t data_pages_ = 0, zero_pages_ = 0;
  std::thread thread_;  // last: starts once the members above exist
};

Status PostcopySource::Postcopy(Attempt& a) {
  const uint32_t final_pass = static_cast<uint32_t>(stats_.passes.size());
  const auto started = std::chrono::steady_clock::now();
  std::atomic<bool> complete_sent{false};
  // Planned before this session (PlanPush) and not replaced until it ends.
  PushScheduler* scheduler;
  {
    sys::MutexLock lock(scheduler_mu_);
    scheduler = scheduler_.get();
  }
  CompletionWatcher watcher(a);
  SharedChannel bulk;
  SharedChannel* shared = options_.answers_on_bulk ? &bulk : nullptr;
  Responder responder(*this, a, *scheduler, final_pass, complete_sent, shared);
  {
    const bool markers_sent = markers_sent_;  // by Switchover(), in the first session only
    markers_sent_ = false;
    std::vector<std::unique_ptr<Pusher>> pushers;
    for (size_t c = 0; c < a.page_channels(); ++c) {
      pushers.push_back(std::make_unique<Pusher>(*this, a, *scheduler, c, final_pass, markers_sent,
                                                 c == 0 ? shared : nullptr));
    }
    for (auto& p : pushers) p->Join();
  }
  if (!a.failed()) {
    complete_sent.store(true);
    Status s = a.main().writer().Send(Complete{final_pass + 1, 0, 0});
    if (!s.ok()) a.Fail(s.WithContext("main channel"));
  }
  Status end = watcher.Wait();
  if (end.ok()) {
    a.Close();  // stops the responder
  } else {
    a.Fail(end);
  }
  responder.Join();
  stats_.realtime = responder.realtime();
  stats_.requests_served += responder.served();
  stats_.requests_rejected += responder.rejected();
  if (responder.rejected() > Responder::kLoggedRejections) {
    Log(fmt::format("post-copy: rejected {} page requests in this session", responder.rejected()));
  }
  stats_.pages_pushed = pages_pushed_.load();
  stats_.pages_requested = pages_requested_.load();
  stats_.postcopy += Since(started);
  bool resume;
  {
    sys::MutexLock lock(mu_);
    (void)(end.ok() ? state_.Acknowledged() : state_.Fail(watcher.peer_refused()));
    resume = state_.resumed_here();
  }
  if (end.ok()) return Status::Ok();
  if (resume) {
    vm_.Resume();
    return end.WithContext("the destination refused the switchover; the VM was resumed here");
  }
  return end.WithContext(PostcopyPhaseName(PostcopyPhase::kPaused));
}

}  // namespace faultline::migration
