// Attempt: one connection attempt of a migration engine, the part every
// engine shares (MigrationSource, MigrationDestination, PostcopySource,
// PostcopyDestination; a post-copy resume is a new attempt):
//
//   - the session's links (handshake.h), and the priority channel in
//     post-copy;
//   - the first failure, which wins: it is what the engine reports, and it
//     shuts every link down and releases every waiter so that every thread
//     stops. A failure that only follows from another (the peer closing a
//     stream, a link shut down here) gives way to one that explains it;
//   - on a destination, telling the source why (an Error on the main
//     channel) until the guest may run here (StopReporting);
//   - the threads that use the links, and their milestones (a page channel
//     ended, the guest runs, ...), which other threads wait for;
//   - the destination's pass barrier over its page channels.
//
// These are the rules both destinations follow (they were the stop-and-copy
// destination's; the post-copy one used to shut its links down before it
// sent Error, so a page channel's failure never reached the source, and to
// echo the source's own Error back): the source hears the first local
// failure, before any link is shut down, so that it knows why and runs its
// guest on; an Error it sent is never echoed; and once the guest may run
// here, nothing is said (an Error would make the source resume its copy).
//
// Cancel is Fail(ECANCELED): the engines call it from any thread. An
// engine's own state (passes, bitmaps, what a phase has received) stays in
// the engine.
//
// Locks: mu_ (the failure, the milestones, adopting the session) ->
// write_mu_ (the main channel's writer for Error and SendMain) and the
// barrier's (leaves). Engines take their own lock before mu_ and never
// while holding it.
#pragma once

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "faultline/status.h"
#include "src/migration/handshake.h"
#include "src/migration/pass_barrier.h"
#include "src/sys/mutex.h"

namespace faultline::migration {

// What an engine's threads wait for. Each is a count.
enum class Milestone : uint8_t {
  kChannelEnded,  // a page channel's thread (StartChannels) returned
  kMainEnded,     // the main channel's reader is done (EndMain)
  kGuestRuns,     // post-copy destination: the vCPUs run; pushes may land
  kCount,
};

class Attempt {
 public:
  enum class Reporting {
    kSilent,    // a source, a resumed post-copy destination: never sends Error
    kTellPeer,  // a destination before its guest runs: a local failure goes
                // to the source in an Error message
  };
  explicit Attempt(Reporting reporting) : reporting_(reporting == Reporting::kTellPeer) {}
  Attempt(const Attempt&) = delete;
  Attempt& operator=(const Attempt&) = delete;
  // Shuts every link down and joins every thread.
  ~Attempt();

  // Takes the links the handshake made. If the attempt failed meanwhile (a
  // Cancel during the handshake), they are shut down and the failure is
  // returned. Once adopted, the links are not replaced: threads use them
  // without a lock.
  [[nodiscard]] Status Adopt(Session session, std::unique_ptr<Link> priority = nullptr);
  Session& session() { return session_; }
  Link& main() { return *session_.main; }
  size_t page_channels() const { return session_.pages.size(); }
  Link& page(size_t channel) { return *session_.pages[channel]; }
  Link& priority() { return *priority_; }
  PassBarrier& barrier() { return *barrier_; }  // after Adopt
  // Every link's, the priority channel's included.
  ChannelStats stats() const;

  // A local failure (any thread). The first one wins; see above.
  void Fail(Status why, ErrorCode code = ErrorCode::kProtocol);
  // The peer's Error message, received `where`: the failure, never told
  // back. Returns it, for the caller to return.
  Status FailByPeer(const ErrorMessage& error, std::string_view where = {});
  bool failed() const;
  Status error() const;  // the first failure, or OK
  // Why a wait on the attempt returned false: the first failure, or
  // ECANCELED once closed without one.
  Status failure() const;

  // Destination: from now on a failure is not told to the source (its guest
  // is about to run here). Returns the failure recorded before, if any: an
  // Error may have gone out, so the guest must not run.
  [[nodiscard]] Status StopReporting();
  // Sends an Error on the main channel whatever the reporting (the caller
  // knows the guest will not run here). Best effort.
  void TellPeer(const Status& why, ErrorCode code);
  // Sends on the main channel, serialised with Error messages from other
  // threads (only the destination needs this; a source's main channel has
  // one writer).
  Status SendMain(const Message& message);

  // Ends the attempt without a failure: every link shut down, every waiter
  // released; later failures are not recorded.
  void Close();

  // Runs `body` in a thread of this attempt; its error fails the attempt
  // (with `what` as context).
  void Spawn(std::string what, std::function<Status()> body);
  // Runs body(c) in a thread for each page channel c, which reaches
  // kChannelEnded when it returns. A failure that is only a consequence
  // (the source closed the channel) first waits up to a second for the
  // main channel's reader to end: the source most likely said why there,
  // and that reason should win.
  void StartChannels(std::function<Status(size_t channel)> body);
  // The main channel's reader is done, with `status`. A failure that is the
  // source closing the channel between messages gives the page channels a
  // moment to end on their own and say why before it fails the attempt
  // (and shutting them down turns their reason into "shut down").
  void EndMain(Status status, ErrorCode code = ErrorCode::kProtocol);
  void Join();

  void Reach(Milestone milestone);
  // Until `milestone` was reached `count` times (true), or the attempt
  // failed or closed (false).
  bool Await(Milestone milestone, size_t count);
  // The same, giving up after `timeout` (false).
  bool AwaitFor(Milestone milestone, size_t count, std::chrono::milliseconds timeout);
  size_t reached(Milestone milestone) const;

 private:
  void Record(Status why, ErrorCode code, bool report);
  void ShutdownLinks() REQUIRES(mu_);
  bool Over() const REQUIRES(mu_);  // failed or closed

  // Taken after the engine's outer lock (which the engines hold while they
  // fail the active attempt); the analysis cannot name that lock here, as
  // each engine has its own and holds the attempt by pointer.
  mutable sys::Mutex mu_;
  std::condition_variable cv_;  // a milestone, a failure, the close
  // Not guarded: set under mu_ by Adopt, before any thread of the attempt
  // uses them, and never replaced (threads use them without the lock).
  Session session_;
  std::unique_ptr<Link> priority_;
  std::optional<PassBarrier> barrier_;
  std::optional<Status> error_ GUARDED_BY(mu_);
  bool reporting_ GUARDED_BY(mu_);
  bool closed_ GUARDED_BY(mu_) = false;
  // By milestone.
  std::array<size_t, static_cast<size_t>(Milestone::kCount)> reached_ GUARDED_BY(mu_) = {};
  sys::Mutex write_mu_ ACQUIRED_AFTER(mu_);  // the main channel's writer, for Error and SendMain
  std::vector<std::thread> threads_;         // started and joined by the engine's thread
};

}  // namespace faultline::migration
