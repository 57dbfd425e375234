#include "src/paging/installer_calibration.h"

#include <gtest/gtest.h>

namespace faultline::paging {
namespace {

// Real userfaultfd runs on this host: the choice is one of the candidates,
// each measured, and within a small budget.
TEST(InstallerCalibrationTest, AnonChoosesAMeasuredCandidate) {
  InstallerChoice c = CalibrateInstaller(Backing::kAnonymous, std::chrono::milliseconds(50));
  ASSERT_EQ(c.trials.size(), 2u) << c.why;
  EXPECT_TRUE(c.installer == InstallerKind::kCopy || c.installer == InstallerKind::kMove);
  double best = 0;
  for (const InstallerTrial& t : c.trials) {
    EXPECT_GE(t.runs, 1u) << InstallerName(t.installer) << ": " << c.why;
    EXPECT_GT(t.pages_per_sec, 0) << InstallerName(t.installer);
    best = std::max(best, t.pages_per_sec);
  }
  for (const InstallerTrial& t : c.trials) {
    if (t.installer == c.installer) {
      EXPECT_EQ(t.pages_per_sec, best);
    }
  }
  EXPECT_NE(c.why.find("fastest of 2"), std::string::npos) << c.why;
  // One round at least; further rounds only within the budget (a round on
  // a loaded machine may overrun it, so this bound is loose).
  EXPECT_LT(c.milliseconds, 2000) << c.why;
}

TEST(InstallerCalibrationTest, MemfdChoosesBetweenCopyAndContinue) {
  InstallerChoice c = CalibrateInstaller(Backing::kMemfd, std::chrono::milliseconds(30));
  ASSERT_EQ(c.trials.size(), 2u) << c.why;
  EXPECT_TRUE(c.installer == InstallerKind::kCopy || c.installer == InstallerKind::kContinue);
}

TEST(InstallerCalibrationTest, GuestMemfdHasOnlyTheHole) {
  InstallerChoice c = CalibrateInstaller(Backing::kGuestMemfd);
  EXPECT_EQ(c.installer, InstallerKind::kHole);
  EXPECT_TRUE(c.trials.empty());
}

}  // namespace
}  // namespace faultline::paging
