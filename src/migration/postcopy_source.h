// PostcopySource: the sending side of a post-copy live migration
// (docs/protocol.md §7).
//
//   1. Handshake with kFeaturePostcopy (and kFeatureRecovery), page channels
//      and the priority channel (postcopy_session.h).
//   2. Pre-copy passes as MigrationSource runs them, until `precopy_passes`
//      passes ended or StartPostcopy() was called (the pass under way ends
//      first).
//   3. Switchover: the VM is paused; Switchover{kPostcopy}, DirtyPages (the
//      pages dirtied since they were last sent), vCPU and device state. The
//      destination runs the guest at once; from here on the only complete
//      copy of the memory is this one, and the VM here stays paused for good.
//   4. Post-copy: a responder thread answers each PageRequest on the
//      priority channel at once; one thread per page channel pushes the
//      pages the destination does not have, neighbours of requested pages
//      first (push_scheduler.h); then PassEnd on each page channel and
//      Complete on the main channel; CompleteAck ends the migration.
//
// A request for a page outside the block is rejected (logged, counted in
// requests_rejected) and the responder serves on.
//
// Recovery: if the link breaks during post-copy, Run() returns an error and
// phase() is kPaused: nothing is lost, the guest at the destination waits
// for missing pages. Resume(connector) opens a new session, learns which
// pages the destination has (PresentBitmap) and finishes.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>
#include <vector>

#include "faultline/status.h"
#include "src/migration/migratable.h"
#include "src/migration/push_scheduler.h"
#include "src/migration/source.h"
#include "src/migration/transport.h"
#include "src/sys/mutex.h"
#include "src/sys/sched.h"

namespace faultline::migration {

class Attempt;
class PrecopyPasses;

inline constexpr uint32_t kPostcopyOnCommand = UINT32_MAX;

struct PostcopySourceOptions {
  SourceOptions base;  // channels, key, bandwidth limit (pre-copy passes), batch size
  // Pre-copy passes before the switch to post-copy (0: straight away);
  // kPostcopyOnCommand: pass after pass until StartPostcopy().
  uint32_t precopy_passes = 1;
  uint32_t push_batch_pages = 32;  // pages per pushed Pages message (a 2 MiB unit at least)
  PushScheduler::Options push;
  // Non-zero: the thread answering page requests, and the calling thread
  // during the switchover pause, run SCHED_FIFO at this priority
  // (src/sys/sched.h), so that neither waits for a CPU behind the push or
  // other work. Without permission they run as before (stats: realtime).
  int realtime_priority = sys::kDefaultRealtimePriority;
  // For comparison only (QEMU's post-copy without preempt): answers to page
  // requests go out on page channel 0, queued behind the push, until that
  // channel ends its pass; then on the priority channel. The requests still
  // come on the priority channel.
  bool answers_on_bulk = false;
  // Where rejected requests and other notes go (default: stderr).
  std::function<void(std::string_view)> log;
};

struct PostcopySourceStats {
  std::vector<PassStats> passes;  // pre-copy
  uint64_t switchover_dirty_pages = 0;
  uint64_t pages_pushed = 0;     // pushed (data and zero), all sessions
  uint64_t pages_requested = 0;  // asked for by the destination
  uint64_t requests_served = 0;
  uint64_t requests_rejected = 0;  // out of range or malformed
  uint32_t sessions = 0;           // 1 + resumes
  bool realtime = false;           // the request responder ran SCHED_FIFO
  uint64_t bytes_sent = 0;
  // Pause until the last switchover message was handed to the transport.
  std::chrono::microseconds switchover_send{0};
  std::chrono::steady_clock::time_point paused_at{};  // the VM stopped here
  std::chrono::microseconds postcopy{0};              // switchover to CompleteAck
  std::chrono::microseconds total{0};
};

struct PostcopyProgress {
  PostcopyPhase phase = PostcopyPhase::kNotStarted;
  uint32_t pass = 0;
  uint64_t pages_sent = 0;       // pre-copy, all passes
  uint64_t pages_remaining = 0;  // post-copy: still to push
  uint64_t pages_pushed = 0;
  uint64_t pages_requested = 0;
  uint64_t requests_rejected = 0;  // all sessions: out of range or malformed
};

class PostcopySource {
 public:
  // `vm` must outlive this object.
  PostcopySource(SourceVm& vm, PostcopySourceOptions options);
  ~PostcopySource();

  // Runs the migration; blocks until it completed or failed. Call once.
  // An error with phase() == kPaused: the link broke after the switchover;
  // call Resume().
  Result<PostcopySourceStats> Run(Connector& connector);
  // Continues a paused migration over a new session.
  Result<PostcopySourceStats> Resume(Connector& connector);

  // Any thread: switch to post-copy once the current pre-copy pass ends.
  void StartPostcopy() { start_now_.store(true, std::memory_order_release); }
  // Any thread: breaks the current session. Before the switchover the
  // migration fails and the VM keeps running; after it, the migration
  // pauses (it cannot be cancelled: the guest runs at the destination).
  void Cancel();

  PostcopyPhase phase() const;
  PostcopyProgress progress();

 private:
  // Post-copy's threads (postcopy_source_threads.cc): the priority
  // channel's responder and one pusher per page channel (the main channel's
  // watcher is the CompletionWatcher both sources use).
  class Responder;
  class Pusher;
  struct SharedChannel;

  // One session's handshake and priority channel, adopted by `a`. A resume
  // requires recovery; the first session, post-copy.
  Status Connect(Attempt& a, Connector& connector, bool resume);
  Status Precopy(Attempt& a, PrecopyPasses& passes);
  Status SendEarlyDirtySet(Attempt& a, PrecopyPasses& passes);
  // The pause: Switchover, the dirty set, vCPU and device state; then the
  // push is planned from the dirty set.
  Status Switchover(Attempt& a, PrecopyPasses& passes);
  Status SendState(Attempt& a, PrecopyPasses& passes);
  // Resume: what the destination has (PresentBitmap), as the pages to push.
  Result<std::vector<DirtyBitmap>> ReceivePresent(Attempt& a);
  void PlanPush(std::vector<DirtyBitmap> todo);
  // Serves one session of post-copy until CompleteAck or a break.
  Status Postcopy(Attempt& a);
  // A failure before the guest left: it runs here (again).
  Status FailBeforePostcopy(Attempt& a, Status status);
  Result<PostcopySourceStats> EndSession(Attempt& a, Status status);
  Status Step(Status (SourceState::*event)()) EXCLUDES(mu_);
  void Log(std::string_view text) const;

  SourceVm& vm_;
  const PostcopySourceOptions options_;
  std::atomic<bool> start_now_{false};
  std::atomic<uint64_t> pages_sent_{0};
  std::atomic<uint64_t> pages_pushed_{0};
  std::atomic<uint64_t> pages_requested_{0};
  std::atomic<uint64_t> requests_rejected_{0};

  std::vector<std::shared_ptr<RamBlock>> blocks_;
  // Replaced at the switchover and at each Resume by the thread running
  // the migration; read by progress(). A session's responder and pushers
  // are handed the scheduler in use when Postcopy() starts them.
  sys::Mutex scheduler_mu_;
  std::unique_ptr<PushScheduler> scheduler_ GUARDED_BY(scheduler_mu_);
  PostcopySourceStats stats_;
  uint64_t session_id_ = 0;  // the first session's: what Resume names
  migration::Switchover switchover_;
  bool markers_sent_ = false;  // Switchover() sent the page channels' copies
  std::chrono::steady_clock::time_point start_;

  // Taken before Attempt::mu_ (Cancel fails the active attempt under it).
  mutable sys::Mutex mu_;
  SourceState state_ GUARDED_BY(mu_){SourceMode::kPostcopy};
  Attempt* active_ GUARDED_BY(mu_) = nullptr;  // the session in use
};

}  // namespace faultline::migration
