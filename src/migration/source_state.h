// The source's phases, as a state machine that does no I/O: MigrationSource
// (stop-and-copy) and PostcopySource drive it from the thread running the
// migration, Cancel() from any thread, under the engine's lock. It decides
// whether a step is legal now and, at the end, who runs the guest
// (docs/protocol.md §6 and §10). Every transition can be tested alone
// (source_state_test.cc).
//
//   Idle --Start--> Connecting --Connected--> Precopy(0)
//   Precopy(n) --PassEnded--> Precopy(n + 1)
//   Precopy(n) --Pause--> Switchover           (the VM here is paused; n: final pass)
//   Switchover --CompleteSent--> Completing    (stop-and-copy: Complete goes out next)
//   Switchover --GuestLeft--> Postcopy         (post-copy: every state message went out)
//   Completing, Postcopy --Acknowledged--> Completed   (CompleteAck)
//   Postcopy --Fail--> Paused                  (the guest runs there; wait for Resume)
//   Paused --Resume--> Resuming --Resumed--> Postcopy  (a new session)
//   Resuming --Fail--> Paused
//   Connecting, Precopy --Fail--> Failed       (the VM kept running here)
//   Switchover --Fail--> Failed                (the VM is resumed here)
//   Completing --Fail(peer refused)--> Failed  (resumed: the destination will not run it)
//   Completing --Fail(link lost)--> Unknown    (left paused: the destination may run it)
//   Postcopy --Fail(peer refused, first session)--> Failed   (resumed here)
//
// Cancel() is a request: legal from Idle to Switchover, refused ("too late")
// once the guest may run at the destination. In Idle it cancels at once;
// otherwise the thread running the migration meets it at its next step:
// Start, Connected, PassEnded, Pause and CompleteSent then fail with
// ECANCELED, and Fail ends in Cancelled instead of Failed. GuestLeft
// succeeds and drops the request: the last state message is out, so the
// guest may already run at the destination, and cancelling can only pause.
#pragma once

#include <cstdint>

#include "faultline/status.h"

namespace faultline::migration {

// Who runs the guest once MigrationSource::Run returned (its outcome()).
enum class SourceOutcome {
  kNotStarted,
  kCompleted,      // the destination runs the guest; the VM here stays paused
  kFailedRunning,  // failed before the pause; the VM kept running
  kFailedResumed,  // failed after the pause; the VM was resumed here
  kUnknownPaused,  // link lost after Complete: left paused, see source.h
};
const char* SourceOutcomeName(SourceOutcome outcome);

// A post-copy migration's phase, as both ends report it.
enum class PostcopyPhase {
  kNotStarted,
  kPrecopy,
  kPostcopy,
  kPaused,     // post-copy, link broken: Resume()
  kCompleted,  // the destination has every page
  kFailed,     // the VM runs here (kept running, or resumed after the destination refused)
};
const char* PostcopyPhaseName(PostcopyPhase phase);

enum class SourcePhase {
  kIdle,
  kConnecting,
  kPrecopy,
  kSwitchover,
  kCompleting,
  kPostcopy,
  kPaused,
  kResuming,
  kCompleted,
  kFailed,
  kCancelled,
  kUnknown,
};
const char* SourcePhaseName(SourcePhase phase);

enum class SourceMode { kStopAndCopy, kPostcopy };

class SourceState {
 public:
  explicit SourceState(SourceMode mode) : mode_(mode) {}

  // Each returns an error, and leaves the state as it was, if the step is
  // not legal now (or, for the steps named above, if a Cancel() is pending).
  // Start also fails once started (or cancelled before it).
  [[nodiscard]] Status Start();
  [[nodiscard]] Status Connected();
  [[nodiscard]] Status PassEnded();
  [[nodiscard]] Status Pause();
  [[nodiscard]] Status CompleteSent();
  [[nodiscard]] Status GuestLeft();
  [[nodiscard]] Status Acknowledged();
  // The attempt failed; `peer_refused`: the destination said so with an
  // Error (it will not run the guest).
  [[nodiscard]] Status Fail(bool peer_refused);
  [[nodiscard]] Status Cancel();
  [[nodiscard]] Status Resume();
  [[nodiscard]] Status Resumed();

  SourcePhase phase() const { return phase_; }
  // Pre-copy: the pass under way; from the switchover on, the final pass.
  uint32_t pass() const { return pass_; }
  uint32_t sessions() const { return sessions_; }
  bool cancel_pending() const { return cancel_pending_; }
  // The VM here is paused: from the switchover on, unless it was resumed
  // after a failure.
  bool paused_here() const;
  // Failed or cancelled after the pause: the engine resumes the VM here.
  bool resumed_here() const { return resumed_here_; }
  bool ended() const;  // Completed, Failed, Cancelled or Unknown: no step is legal

  // The public views of the phase.
  SourceOutcome outcome() const;
  PostcopyPhase postcopy_phase() const;

 private:
  Status Illegal(const char* step) const;
  Status CheckCancel() const;

  const SourceMode mode_;
  SourcePhase phase_ = SourcePhase::kIdle;
  uint32_t pass_ = 0;
  uint32_t sessions_ = 0;
  bool started_ = false;
  bool cancel_pending_ = false;
  bool resumed_here_ = false;
};

}  // namespace faultline::migration
