#include "src/sys/sched.h"

#include <thread>

#include <gtest/gtest.h>

namespace faultline::sys {
namespace {

// From the kernel (glibc's pthread_getschedparam may answer from a cache).
int PolicyOfThisThread() { return ::sched_getscheduler(0) & ~SCHED_RESET_ON_FORK; }

TEST(SchedTest, ScopedRealtimeRaisesAndRestores) {
  std::thread([] {
    ASSERT_EQ(PolicyOfThisThread(), SCHED_OTHER);
    {
      ScopedRealtime rt(1);
      if (!rt.active())
        GTEST_SKIP() << "SCHED_FIFO not permitted here: " << SetRealtime(1).ToString();
      EXPECT_EQ(PolicyOfThisThread(), SCHED_FIFO);
      EXPECT_TRUE(IsRealtime());
    }
    EXPECT_EQ(PolicyOfThisThread(), SCHED_OTHER);
    EXPECT_FALSE(IsRealtime());
  }).join();
}

TEST(SchedTest, ThreadsStartedByARealtimeThreadRunTheDefaultPolicy) {
  std::thread([] {
    ScopedRealtime rt(1);
    if (!rt.active()) GTEST_SKIP() << "SCHED_FIFO not permitted here";
    int child_policy = -1;
    std::thread([&] { child_policy = PolicyOfThisThread(); }).join();
    EXPECT_EQ(child_policy, SCHED_OTHER);
  }).join();
}

TEST(SchedTest, PriorityZeroLeavesTheThreadAlone) {
  std::thread([] {
    ScopedRealtime rt(0);
    EXPECT_FALSE(rt.active());
    EXPECT_EQ(PolicyOfThisThread(), SCHED_OTHER);
  }).join();
}

TEST(SchedTest, OutOfRangePriorityIsRefusedWithTheRange) {
  std::thread([] {
    Status s = SetRealtime(100);
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.ToString().find("1..99"), std::string::npos) << s.ToString();
    EXPECT_EQ(PolicyOfThisThread(), SCHED_OTHER);
  }).join();
}

}  // namespace
}  // namespace faultline::sys
