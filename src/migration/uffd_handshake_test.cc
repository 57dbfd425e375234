// The Firecracker userfaultfd handshake: what is accepted (both page-size
// spellings) and each refusal, with its one error.
#include "src/migration/uffd_handshake.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace faultline::migration {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kMemory = 64ull << 20;

std::string Region(uint64_t base, uint64_t size, uint64_t offset,
                   const std::string& page = "\"page_size\": 4096") {
  return fmt::format(R"({{"base_host_virt_addr": {}, "size": {}, "offset": {}, {}}})", base, size,
                     offset, page);
}

std::string Refusal(const std::string& json, size_t fds = 1, uint64_t memory = kMemory) {
  auto parsed = ParseUffdHandshake(json, fds, memory);
  EXPECT_FALSE(parsed.has_value()) << json;
  return parsed.has_value() ? "" : parsed.error().ToString();
}

TEST(UffdHandshakeTest, AcceptsFirecrackersMessageWithEitherPageSizeSpelling) {
  const std::string json =
      "[" + Region(0x7f0000000000, 16ull << 20, 0) + "," +
      Region(0x7f1000000000, 32ull << 20, 16ull << 20, "\"page_size_kib\": 2048") + "]";
  auto parsed = ParseUffdHandshake(json, 1, kMemory);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().ToString();
  ASSERT_EQ(parsed->size(), 2u);
  EXPECT_EQ((*parsed)[0], (UffdRegion{0x7f0000000000, 16ull << 20, 0, 4096}));
  EXPECT_EQ((*parsed)[1], (UffdRegion{0x7f1000000000, 32ull << 20, 16ull << 20, 2ull << 20}));
  // Both spellings at once, agreeing; unknown fields are ignored.
  EXPECT_TRUE(
      ParseUffdHandshake(
          "[" + Region(0x1000, 4096, 0, R"("page_size": 4096, "page_size_kib": 4, "x": 1)") + "]",
          1, kMemory)
          .has_value());
}

TEST(UffdHandshakeTest, EncodeRoundTrips) {
  const std::vector<UffdRegion> regions = {{0x7f0000000000, 8192, 0, 4096},
                                           {0x7f0000200000, 2ull << 20, 8192 * 256, 2ull << 20}};
  auto parsed = ParseUffdHandshake(EncodeUffdHandshake(regions), 1, kMemory);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().ToString();
  EXPECT_EQ(*parsed, regions);
}

TEST(UffdHandshakeTest, RefusesEachMistakeWithOneClearError) {
  const std::string ok = "[" + Region(0x10000, 8192, 0) + "]";
  EXPECT_THAT(Refusal(ok, 0), HasSubstr("no userfaultfd came with the message"));
  EXPECT_THAT(Refusal(ok, 2), HasSubstr("2 descriptors came with the message"));
  EXPECT_THAT(Refusal("[{\"base_host_virt_addr\": 1,"), HasSubstr("not valid JSON"));
  EXPECT_THAT(Refusal("{}"), HasSubstr("expected a non-empty JSON array"));
  EXPECT_THAT(Refusal("[]"), HasSubstr("expected a non-empty JSON array"));
  EXPECT_THAT(Refusal("[3]"), HasSubstr("region 0 is not a JSON object"));
  EXPECT_THAT(Refusal(R"([{"size": 4096, "offset": 0, "page_size": 4096}])"),
              HasSubstr("region 0 has no \"base_host_virt_addr\""));
  EXPECT_THAT(Refusal("[" + Region(0x10000, 4096, 0, "\"page_size\": -4096") + "]"),
              HasSubstr("not an unsigned integer"));
  EXPECT_THAT(Refusal("[" + Region(0x10000, 4096, 0, "\"psize\": 4096") + "]"),
              HasSubstr("neither \"page_size\" nor \"page_size_kib\""));
  EXPECT_THAT(
      Refusal("[" + Region(0x10000, 4096, 0, R"("page_size": 4096, "page_size_kib": 8)") + "]"),
      HasSubstr("disagree"));
  EXPECT_THAT(Refusal("[" + Region(0x10000, 65536, 0, "\"page_size\": 65536") + "]"),
              HasSubstr("page size 65536 bytes is not served"));
  EXPECT_THAT(Refusal("[" + Region(0x10000, 0, 0) + "]"), HasSubstr("region 0 has size 0"));
  EXPECT_THAT(Refusal("[" + Region(0x10001, 4096, 0) + "]"), HasSubstr("is not aligned"));
  EXPECT_THAT(Refusal("[" + Region(0x10000, 4000, 0) + "]"), HasSubstr("is not aligned"));
  EXPECT_THAT(Refusal("[" + Region(0x10000, 4096, 512) + "]"), HasSubstr("is not aligned"));
  EXPECT_THAT(Refusal("[" + Region(0x1000, 2ull << 20, 0, "\"page_size_kib\": 2048") + "]"),
              HasSubstr("is not aligned to its page size 0x200000"));
  EXPECT_THAT(Refusal("[" + Region(0x10000, 8192, 0) + "," + Region(0x11000, 4096, 8192) + "]"),
              HasSubstr("regions 0 and 1 overlap"));
  EXPECT_THAT(Refusal("[" + Region(0x10000, 8192, kMemory - 4096) + "]"),
              HasSubstr("reaches past the end of the served memory"));
  EXPECT_THAT(Refusal("[" + Region(0xfffffffffffff000, 8192, 0) + "]"), HasSubstr("wraps around"));
}

}  // namespace
}  // namespace faultline::migration
