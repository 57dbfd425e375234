// Post-copy's threads on the source: the main channel's watcher, the
// priority channel's responder and one pusher per page channel, and
// PostcopySource::Postcopy(), which runs them for one session.
#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "src/migration/page_sender.h"
#include "src/migration/postcopy_source.h"
#include "src/migration/postcopy_source_attempt.h"
#include "src/sys/sched.h"

namespace faultline::migration {

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
      : s_(source), a_(a), final_pass_(final_pass), complete_sent_(complete_sent), thread_([this] {
          Run();
        }) {}
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
  Pusher(PostcopySource& source, Attempt& a, size_t channel, uint32_t final_pass, bool marker_sent)
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
  const auto started = std::chrono::steady_clock::now();
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

}  // namespace faultline::migration
