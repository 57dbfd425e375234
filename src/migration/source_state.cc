#include "src/migration/source_state.h"

#include <cerrno>

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

const char* SourcePhaseName(SourcePhase phase) {
  switch (phase) {
    case SourcePhase::kIdle:
      return "Idle";
    case SourcePhase::kConnecting:
      return "Connecting";
    case SourcePhase::kPrecopy:
      return "Precopy";
    case SourcePhase::kSwitchover:
      return "Switchover";
    case SourcePhase::kCompleting:
      return "Completing";
    case SourcePhase::kPostcopy:
      return "Postcopy";
    case SourcePhase::kPaused:
      return "Paused";
    case SourcePhase::kResuming:
      return "Resuming";
    case SourcePhase::kCompleted:
      return "Completed";
    case SourcePhase::kFailed:
      return "Failed";
    case SourcePhase::kCancelled:
      return "Cancelled";
    case SourcePhase::kUnknown:
      return "Unknown";
  }
  return "?";
}

Status SourceState::Illegal(const char* step) const {
  return Error("source: {} in phase {}", step, SourcePhaseName(phase_));
}

Status SourceState::CheckCancel() const {
  if (cancel_pending_) return Status(ECANCELED, "migration cancelled");
  return Status::Ok();
}

Status SourceState::Start() {
  if (phase_ == SourcePhase::kCancelled && !started_) {
    return Status(ECANCELED, "migration cancelled before it started");
  }
  if (phase_ != SourcePhase::kIdle) return Illegal("Start");
  phase_ = SourcePhase::kConnecting;
  started_ = true;
  return Status::Ok();
}

Status SourceState::Connected() {
  if (phase_ != SourcePhase::kConnecting) return Illegal("Connected");
  RETURN_IF_ERROR(CheckCancel());
  phase_ = SourcePhase::kPrecopy;
  pass_ = 0;
  sessions_ = 1;
  return Status::Ok();
}

Status SourceState::PassEnded() {
  if (phase_ != SourcePhase::kPrecopy) return Illegal("PassEnded");
  RETURN_IF_ERROR(CheckCancel());
  ++pass_;
  return Status::Ok();
}

Status SourceState::Pause() {
  if (phase_ != SourcePhase::kPrecopy) return Illegal("Pause");
  RETURN_IF_ERROR(CheckCancel());
  phase_ = SourcePhase::kSwitchover;
  return Status::Ok();
}

Status SourceState::CompleteSent() {
  if (phase_ != SourcePhase::kSwitchover || mode_ != SourceMode::kStopAndCopy) {
    return Illegal("CompleteSent");
  }
  RETURN_IF_ERROR(CheckCancel());
  phase_ = SourcePhase::kCompleting;
  return Status::Ok();
}

Status SourceState::GuestLeft() {
  if (phase_ != SourcePhase::kSwitchover || mode_ != SourceMode::kPostcopy) {
    return Illegal("GuestLeft");
  }
  cancel_pending_ = false;  // too late: see the header
  phase_ = SourcePhase::kPostcopy;
  return Status::Ok();
}

Status SourceState::Acknowledged() {
  if (phase_ != SourcePhase::kCompleting && phase_ != SourcePhase::kPostcopy) {
    return Illegal("Acknowledged");
  }
  phase_ = SourcePhase::kCompleted;
  return Status::Ok();
}

Status SourceState::Fail(bool peer_refused) {
  const SourcePhase failed = cancel_pending_ ? SourcePhase::kCancelled : SourcePhase::kFailed;
  switch (phase_) {
    case SourcePhase::kConnecting:
    case SourcePhase::kPrecopy:
      phase_ = failed;
      break;
    case SourcePhase::kSwitchover:
      phase_ = failed;
      resumed_here_ = true;
      break;
    case SourcePhase::kCompleting:
      phase_ = peer_refused ? SourcePhase::kFailed : SourcePhase::kUnknown;
      resumed_here_ = peer_refused;
      break;
    case SourcePhase::kPostcopy:
      // The destination sends Error only before its vCPUs run, which can
      // only be in the session that carried the switchover.
      if (peer_refused && sessions_ == 1) {
        phase_ = SourcePhase::kFailed;
        resumed_here_ = true;
      } else {
        phase_ = SourcePhase::kPaused;
      }
      break;
    case SourcePhase::kResuming:
      phase_ = SourcePhase::kPaused;
      break;
    default:
      return Illegal("Fail");
  }
  cancel_pending_ = false;
  return Status::Ok();
}

Status SourceState::Cancel() {
  switch (phase_) {
    case SourcePhase::kIdle:
      phase_ = SourcePhase::kCancelled;
      return Status::Ok();
    case SourcePhase::kConnecting:
    case SourcePhase::kPrecopy:
    case SourcePhase::kSwitchover:
      cancel_pending_ = true;
      return Status::Ok();
    case SourcePhase::kCompleting:
    case SourcePhase::kPostcopy:
    case SourcePhase::kPaused:
    case SourcePhase::kResuming:
      return Error("too late to cancel in phase {}: the destination may run the guest",
                   SourcePhaseName(phase_));
    default:
      return Error("nothing to cancel: the migration ended ({})", SourcePhaseName(phase_));
  }
}

Status SourceState::Resume() {
  if (phase_ != SourcePhase::kPaused) return Illegal("Resume");
  phase_ = SourcePhase::kResuming;
  return Status::Ok();
}

Status SourceState::Resumed() {
  if (phase_ != SourcePhase::kResuming) return Illegal("Resumed");
  phase_ = SourcePhase::kPostcopy;
  ++sessions_;
  return Status::Ok();
}

bool SourceState::paused_here() const {
  switch (phase_) {
    case SourcePhase::kSwitchover:
    case SourcePhase::kCompleting:
    case SourcePhase::kPostcopy:
    case SourcePhase::kPaused:
    case SourcePhase::kResuming:
    case SourcePhase::kCompleted:
    case SourcePhase::kUnknown:
      return true;
    default:
      return false;
  }
}

bool SourceState::ended() const {
  return phase_ == SourcePhase::kCompleted || phase_ == SourcePhase::kFailed ||
         phase_ == SourcePhase::kCancelled || phase_ == SourcePhase::kUnknown;
}

SourceOutcome SourceState::outcome() const {
  switch (phase_) {
    case SourcePhase::kCompleted:
      return SourceOutcome::kCompleted;
    case SourcePhase::kFailed:
    case SourcePhase::kCancelled:
      return resumed_here_ ? SourceOutcome::kFailedResumed : SourceOutcome::kFailedRunning;
    case SourcePhase::kUnknown:
      return SourceOutcome::kUnknownPaused;
    default:
      return SourceOutcome::kNotStarted;
  }
}

PostcopyPhase SourceState::postcopy_phase() const {
  switch (phase_) {
    case SourcePhase::kIdle:
      return PostcopyPhase::kNotStarted;
    case SourcePhase::kConnecting:
    case SourcePhase::kPrecopy:
    case SourcePhase::kSwitchover:
    case SourcePhase::kCompleting:
      return PostcopyPhase::kPrecopy;
    case SourcePhase::kPostcopy:
      return PostcopyPhase::kPostcopy;
    case SourcePhase::kPaused:
    case SourcePhase::kResuming:
    case SourcePhase::kUnknown:
      return PostcopyPhase::kPaused;
    case SourcePhase::kCompleted:
      return PostcopyPhase::kCompleted;
    case SourcePhase::kFailed:
    case SourcePhase::kCancelled:
      return PostcopyPhase::kFailed;
  }
  return PostcopyPhase::kFailed;
}

}  // namespace faultline::migration
