#include "src/migration/source_state.h"

#include <algorithm>
#include <cerrno>
#include <functional>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace faultline::migration {
namespace {

using ::testing::HasSubstr;

// A machine driven to `phase` by the usual path.
SourceState At(SourcePhase phase, SourceMode mode = SourceMode::kPostcopy) {
  const bool stop_and_copy = phase == SourcePhase::kCompleting || phase == SourcePhase::kUnknown;
  SourceState s(stop_and_copy ? SourceMode::kStopAndCopy : mode);
  auto step = [&](Status status) { EXPECT_TRUE(status.ok()) << status.ToString(); };
  if (phase == SourcePhase::kIdle) return s;
  if (phase == SourcePhase::kCancelled) {
    step(s.Cancel());
    return s;
  }
  step(s.Start());
  if (phase == SourcePhase::kConnecting) return s;
  step(s.Connected());
  if (phase == SourcePhase::kPrecopy) return s;
  if (phase == SourcePhase::kFailed) {
    step(s.Fail(false));
    return s;
  }
  step(s.Pause());
  if (phase == SourcePhase::kSwitchover) return s;
  if (phase == SourcePhase::kCompleting || phase == SourcePhase::kUnknown) {
    step(s.CompleteSent());
    if (phase == SourcePhase::kUnknown) step(s.Fail(false));
    return s;
  }
  step(s.GuestLeft());
  if (phase == SourcePhase::kPostcopy) return s;
  if (phase == SourcePhase::kCompleted) {
    step(s.Acknowledged());
    return s;
  }
  step(s.Fail(false));
  if (phase == SourcePhase::kPaused) return s;
  step(s.Resume());
  return s;  // kResuming
}

TEST(SourceStateTest, StopAndCopyCompletes) {
  SourceState s(SourceMode::kStopAndCopy);
  EXPECT_EQ(s.outcome(), SourceOutcome::kNotStarted);
  ASSERT_TRUE(s.Start().ok());
  ASSERT_TRUE(s.Connected().ok());
  EXPECT_EQ(s.phase(), SourcePhase::kPrecopy);
  EXPECT_EQ(s.pass(), 0u);
  ASSERT_TRUE(s.PassEnded().ok());
  ASSERT_TRUE(s.PassEnded().ok());
  EXPECT_EQ(s.pass(), 2u);
  EXPECT_FALSE(s.paused_here());
  ASSERT_TRUE(s.Pause().ok());
  EXPECT_EQ(s.pass(), 2u);  // the final pass
  EXPECT_TRUE(s.paused_here());
  EXPECT_FALSE(s.GuestLeft().ok()) << "stop-and-copy has no post-copy";
  ASSERT_TRUE(s.CompleteSent().ok());
  EXPECT_EQ(s.outcome(), SourceOutcome::kNotStarted);
  ASSERT_TRUE(s.Acknowledged().ok());
  EXPECT_EQ(s.phase(), SourcePhase::kCompleted);
  EXPECT_EQ(s.outcome(), SourceOutcome::kCompleted);
  EXPECT_TRUE(s.paused_here());
  EXPECT_TRUE(s.ended());
}

TEST(SourceStateTest, PostcopyPausesResumesAndCompletes) {
  SourceState s(SourceMode::kPostcopy);
  EXPECT_EQ(s.postcopy_phase(), PostcopyPhase::kNotStarted);
  ASSERT_TRUE(s.Start().ok());
  ASSERT_TRUE(s.Connected().ok());
  EXPECT_EQ(s.postcopy_phase(), PostcopyPhase::kPrecopy);
  ASSERT_TRUE(s.Pause().ok());  // no pre-copy pass: pure post-copy
  EXPECT_EQ(s.pass(), 0u);
  EXPECT_FALSE(s.CompleteSent().ok()) << "post-copy sends Complete only after the push";
  ASSERT_TRUE(s.GuestLeft().ok());
  EXPECT_EQ(s.postcopy_phase(), PostcopyPhase::kPostcopy);
  ASSERT_TRUE(s.Fail(false).ok());
  EXPECT_EQ(s.phase(), SourcePhase::kPaused);
  EXPECT_EQ(s.postcopy_phase(), PostcopyPhase::kPaused);
  ASSERT_TRUE(s.Resume().ok());
  EXPECT_FALSE(s.Resume().ok()) << "one resume at a time";
  ASSERT_TRUE(s.Fail(false).ok());  // the new session failed before it served
  EXPECT_EQ(s.phase(), SourcePhase::kPaused);
  ASSERT_TRUE(s.Resume().ok());
  ASSERT_TRUE(s.Resumed().ok());
  EXPECT_EQ(s.sessions(), 2u);
  // An Error from the destination in a later session cannot be a refusal
  // of the switchover: its guest runs. The migration pauses.
  ASSERT_TRUE(s.Fail(true).ok());
  EXPECT_EQ(s.phase(), SourcePhase::kPaused);
  ASSERT_TRUE(s.Resume().ok());
  ASSERT_TRUE(s.Resumed().ok());
  ASSERT_TRUE(s.Acknowledged().ok());
  EXPECT_EQ(s.postcopy_phase(), PostcopyPhase::kCompleted);
  EXPECT_EQ(s.sessions(), 3u);
}

TEST(SourceStateTest, WhoRunsTheGuestAfterAFailure) {
  struct Case {
    SourcePhase at;
    bool peer_refused;
    SourcePhase then;
    SourceOutcome outcome;
  };
  const std::vector<Case> cases = {
      {SourcePhase::kConnecting, false, SourcePhase::kFailed, SourceOutcome::kFailedRunning},
      {SourcePhase::kPrecopy, true, SourcePhase::kFailed, SourceOutcome::kFailedRunning},
      {SourcePhase::kSwitchover, false, SourcePhase::kFailed, SourceOutcome::kFailedResumed},
      {SourcePhase::kCompleting, true, SourcePhase::kFailed, SourceOutcome::kFailedResumed},
      {SourcePhase::kCompleting, false, SourcePhase::kUnknown, SourceOutcome::kUnknownPaused},
      {SourcePhase::kPostcopy, true, SourcePhase::kFailed, SourceOutcome::kFailedResumed},
      {SourcePhase::kPostcopy, false, SourcePhase::kPaused, SourceOutcome::kNotStarted},
      {SourcePhase::kResuming, true, SourcePhase::kPaused, SourceOutcome::kNotStarted},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(fmt::format("{} peer_refused={}", SourcePhaseName(c.at), c.peer_refused));
    SourceState s = At(c.at);
    ASSERT_EQ(s.phase(), c.at);
    ASSERT_TRUE(s.Fail(c.peer_refused).ok());
    EXPECT_EQ(s.phase(), c.then);
    EXPECT_EQ(s.outcome(), c.outcome);
    EXPECT_EQ(s.resumed_here(), c.outcome == SourceOutcome::kFailedResumed);
    EXPECT_EQ(s.paused_here(), c.then == SourcePhase::kPaused || c.then == SourcePhase::kUnknown);
  }
}

TEST(SourceStateTest, CancelIsMetAtTheNextStep) {
  SourceState s(SourceMode::kStopAndCopy);
  ASSERT_TRUE(s.Start().ok());
  ASSERT_TRUE(s.Connected().ok());
  ASSERT_TRUE(s.Cancel().ok());
  EXPECT_EQ(s.phase(), SourcePhase::kPrecopy);  // the running thread has not seen it yet
  const Status step = s.PassEnded();
  EXPECT_EQ(step.code(), ECANCELED);
  EXPECT_EQ(s.pass(), 0u);
  ASSERT_TRUE(s.Fail(false).ok());
  EXPECT_EQ(s.phase(), SourcePhase::kCancelled);
  EXPECT_EQ(s.outcome(), SourceOutcome::kFailedRunning);
}

TEST(SourceStateTest, CancelInTheSwitchoverResumesTheVm) {
  SourceState s = At(SourcePhase::kSwitchover, SourceMode::kStopAndCopy);
  ASSERT_TRUE(s.Cancel().ok());
  EXPECT_EQ(s.CompleteSent().code(), ECANCELED) << "Complete must not go out";
  ASSERT_TRUE(s.Fail(false).ok());
  EXPECT_EQ(s.phase(), SourcePhase::kCancelled);
  EXPECT_EQ(s.outcome(), SourceOutcome::kFailedResumed);
}

TEST(SourceStateTest, CancelAfterTheLastStateMessageOnlyPauses) {
  SourceState s = At(SourcePhase::kSwitchover, SourceMode::kPostcopy);
  ASSERT_TRUE(s.Cancel().ok());
  // The last state message went out: the guest may run there now.
  ASSERT_TRUE(s.GuestLeft().ok());
  EXPECT_FALSE(s.cancel_pending());
  ASSERT_TRUE(s.Fail(false).ok());
  EXPECT_EQ(s.phase(), SourcePhase::kPaused);
}

TEST(SourceStateTest, CancelBeforeStartAndTooLate) {
  SourceState idle(SourceMode::kStopAndCopy);
  ASSERT_TRUE(idle.Cancel().ok());
  EXPECT_EQ(idle.phase(), SourcePhase::kCancelled);
  EXPECT_EQ(idle.Start().code(), ECANCELED);
  EXPECT_EQ(idle.outcome(), SourceOutcome::kFailedRunning);

  for (SourcePhase late : {SourcePhase::kCompleting, SourcePhase::kPostcopy, SourcePhase::kPaused,
                           SourcePhase::kResuming}) {
    SourceState s = At(late);
    EXPECT_THAT(s.Cancel().message(), HasSubstr("too late")) << SourcePhaseName(late);
    EXPECT_FALSE(s.cancel_pending());
  }
  for (SourcePhase over : {SourcePhase::kCompleted, SourcePhase::kFailed, SourcePhase::kUnknown}) {
    SourceState s = At(over);
    EXPECT_THAT(s.Cancel().message(), HasSubstr("nothing to cancel")) << SourcePhaseName(over);
  }
}

TEST(SourceStateTest, IllegalStepsLeaveThePhase) {
  using Step = std::function<Status(SourceState&)>;
  const std::vector<std::pair<std::string, Step>> steps = {
      {"Start", [](SourceState& s) { return s.Start(); }},
      {"Connected", [](SourceState& s) { return s.Connected(); }},
      {"PassEnded", [](SourceState& s) { return s.PassEnded(); }},
      {"Pause", [](SourceState& s) { return s.Pause(); }},
      {"CompleteSent", [](SourceState& s) { return s.CompleteSent(); }},
      {"GuestLeft", [](SourceState& s) { return s.GuestLeft(); }},
      {"Acknowledged", [](SourceState& s) { return s.Acknowledged(); }},
      {"Fail", [](SourceState& s) { return s.Fail(false); }},
      {"Resume", [](SourceState& s) { return s.Resume(); }},
      {"Resumed", [](SourceState& s) { return s.Resumed(); }},
  };
  // The steps legal in each phase (post-copy mode, but Completing); all
  // others must be refused.
  const std::vector<std::pair<SourcePhase, std::vector<std::string>>> legal = {
      {SourcePhase::kIdle, {"Start"}},
      {SourcePhase::kConnecting, {"Connected", "Fail"}},
      {SourcePhase::kPrecopy, {"PassEnded", "Pause", "Fail"}},
      {SourcePhase::kSwitchover, {"GuestLeft", "Fail"}},
      {SourcePhase::kCompleting, {"Acknowledged", "Fail"}},
      {SourcePhase::kPostcopy, {"Acknowledged", "Fail"}},
      {SourcePhase::kPaused, {"Resume"}},
      {SourcePhase::kResuming, {"Resumed", "Fail"}},
      {SourcePhase::kCompleted, {}},
      {SourcePhase::kFailed, {}},
      {SourcePhase::kCancelled, {}},
      {SourcePhase::kUnknown, {}},
  };
  for (const auto& [phase, allowed] : legal) {
    for (const auto& [name, step] : steps) {
      SourceState s = At(phase);
      ASSERT_EQ(s.phase(), phase);
      const uint32_t pass = s.pass();
      const Status status = step(s);
      const bool expect_ok = std::find(allowed.begin(), allowed.end(), name) != allowed.end();
      EXPECT_EQ(status.ok(), expect_ok)
          << name << " in " << SourcePhaseName(phase) << ": " << status.ToString();
      if (!expect_ok) {
        EXPECT_EQ(s.phase(), phase) << name << " in " << SourcePhaseName(phase);
        EXPECT_EQ(s.pass(), pass);
        if (phase != SourcePhase::kCancelled || name != "Start") {
          EXPECT_THAT(status.message(), HasSubstr(SourcePhaseName(phase)));
        }
      }
    }
  }
}

}  // namespace
}  // namespace faultline::migration
