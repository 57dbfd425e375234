#include "src/sys/process.h"

#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

namespace faultline::sys {
namespace {

TEST(ProcessTest, PidfdBecomesReadableWhenTheProcessExits) {
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(go[1]);
    char c;
    (void)!::read(go[0], &c, 1);
    ::_exit(0);
  }
  ::close(go[0]);
  Result<UniqueFd> pidfd = OpenPidfd(child);
  ASSERT_TRUE(pidfd.has_value()) << pidfd.error().ToString();
  EXPECT_FALSE(PidfdExited(*pidfd).value_or(true));
  ::close(go[1]);  // the child reads EOF and exits
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(PidfdExited(*pidfd).value_or(false));
}

TEST(ProcessTest, NoSuchProcessIsAnError) {
  Result<UniqueFd> pidfd = OpenPidfd(0x3ffffff0);
  ASSERT_FALSE(pidfd.has_value());
  EXPECT_EQ(pidfd.error().code(), ESRCH);
}

}  // namespace
}  // namespace faultline::sys
