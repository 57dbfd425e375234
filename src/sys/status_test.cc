#include "faultline/status.h"

#include <cerrno>

#include <gtest/gtest.h>

namespace faultline {
namespace {

Result<int> Half(int x) {
  if (x % 2 != 0) return Error("{} is odd", x);
  return x / 2;
}

Result<int> Quarter(int x) {
  ASSIGN_OR_RETURN(int half, Half(x));
  ASSIGN_OR_RETURN(int quarter, Half(half));
  return quarter;
}

Status CheckEven(int x) {
  RETURN_IF_ERROR(Half(x));
  return Status::Ok();
}

TEST(StatusTest, OkAndErrors) {
  EXPECT_TRUE(Status().ok());
  Status s = ErrnoError(EINVAL, "KVM_SET_USER_MEMORY_REGION2 slot {}", 3);
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), EINVAL);
  EXPECT_EQ(s.ToString(), "KVM_SET_USER_MEMORY_REGION2 slot 3: Invalid argument");
  EXPECT_EQ(s.WithContext("vm").ToString(),
            "vm: KVM_SET_USER_MEMORY_REGION2 slot 3: Invalid argument");
  EXPECT_EQ(Error("plain").ToString(), "plain");
}

TEST(StatusTest, Propagation) {
  EXPECT_EQ(*Quarter(8), 2);
  EXPECT_EQ(Quarter(6).error().ToString(), "3 is odd");
  EXPECT_TRUE(CheckEven(4).ok());
  EXPECT_EQ(CheckEven(5).ToString(), "5 is odd");
}

}  // namespace
}  // namespace faultline
