#include "tools/faultline/cli_util.h"

#include <gtest/gtest.h>

namespace faultline::cli {
namespace {

TEST(ParseSizeTest, Suffixes) {
  EXPECT_EQ(*ParseSize("4096"), 4096u);
  EXPECT_EQ(*ParseSize("64M"), 64ull << 20);
  EXPECT_EQ(*ParseSize("2g"), 2ull << 30);
  EXPECT_EQ(*ParseSize("512MiB"), 512ull << 20);
  EXPECT_FALSE(ParseSize("").has_value());
  EXPECT_FALSE(ParseSize("G").has_value());
  EXPECT_FALSE(ParseSize("12X").has_value());
  EXPECT_FALSE(ParseSize("99999999999999999999G").has_value());
}

TEST(WorkloadTest, NamesAndOptions) {
  EXPECT_EQ(*WorkloadToGuestArgs("verify", 0), "workload=fill,verify");
  EXPECT_EQ(*WorkloadToGuestArgs("random,rate=64,seed=3", 2.5),
            "workload=fill,random,verify rate=64 seed=3 duration_ms=2500");
  EXPECT_FALSE(WorkloadToGuestArgs("bogus", 0).has_value());
  EXPECT_FALSE(WorkloadToGuestArgs("fill,noequals", 0).has_value());
}

}  // namespace
}  // namespace faultline::cli
