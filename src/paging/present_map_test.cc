#include "src/paging/present_map.h"
#include "src/paging/paging_test_util.h"

#include <cstring>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace faultline::paging {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(PresentMapTest, EmptyByDefault) {
  PresentMap map;
  EXPECT_TRUE(map.empty());
  EXPECT_EQ(map.present_pages(), 0u);
  EXPECT_FALSE(map.Contains(0));
}

TEST(PresentMapTest, MaximalRunsFromBitmap) {
  DirtyBitmap bits(200);
  bits.SetRange(0, 3);
  bits.SetRange(60, 10);  // across a word boundary
  bits.Set(199);
  PresentMap map = PresentMap::FromBitmap(bits);
  EXPECT_THAT(map.runs(), ElementsAre(PageRun{0, 3}, PageRun{60, 10}, PageRun{199, 1}));
  EXPECT_EQ(map.present_pages(), 14u);
  EXPECT_TRUE(map.Contains(0));
  EXPECT_TRUE(map.Contains(2));
  EXPECT_FALSE(map.Contains(3));
  EXPECT_TRUE(map.Contains(69));
  EXPECT_FALSE(map.Contains(70));
  EXPECT_TRUE(map.Contains(199));
}

TEST(PresentMapTest, AllIsOneRun) {
  EXPECT_THAT(PresentMap::All(1000).runs(), ElementsAre(PageRun{0, 1000}));
  EXPECT_TRUE(PresentMap::All(0).empty());
}

TEST(PresentMapTest, FromRunsMergesAdjacentAndRejectsOverlap) {
  auto map = PresentMap::FromRuns({{0, 2}, {2, 3}, {10, 0}, {10, 1}});
  ASSERT_TRUE(map.has_value()) << map.error().ToString();
  EXPECT_THAT(map->runs(), ElementsAre(PageRun{0, 5}, PageRun{10, 1}));
  auto overlap = PresentMap::FromRuns({{0, 5}, {4, 2}});
  ASSERT_FALSE(overlap.has_value());
  EXPECT_THAT(overlap.error().message(), HasSubstr("overlaps"));
  auto wrap = PresentMap::FromRuns({{~uint64_t{0}, 2}});
  EXPECT_FALSE(wrap.has_value());
}

TEST(PresentMapTest, ResidencyOfAnonymousAndMemfdBlocks) {
  for (Backing backing : {Backing::kAnonymous, Backing::kMemfd}) {
    auto block = RamBlock::Create({.name = "r", .size = 64 * kPageSize, .backing = backing});
    ASSERT_TRUE(block.has_value()) << block.error().ToString();
    uint8_t* writer = (*block)->alias() != nullptr ? (*block)->alias() : (*block)->host();
    std::memset(writer + 3 * kPageSize, 1, 2 * kPageSize);
    writer[40 * kPageSize] = 1;
    auto map = PresentMap::FromResidency(**block);
    ASSERT_TRUE(map.has_value()) << map.error().ToString();
    EXPECT_THAT(map->runs(), ElementsAre(PageRun{3, 2}, PageRun{40, 1})) << BackingName(backing);
  }
}

// hugetlb: mincore sees only the mapping's own entries; a huge page written
// through either mapping is present.
TEST(PresentMapTest, ResidencyOfHugetlbThroughEitherMapping) {
  testing::ScopedHugePages huge(8);
  auto block =
      RamBlock::Create({.name = "h", .size = 8 * kHugePageSize, .backing = Backing::kHugetlb});
  if (!block.has_value()) GTEST_SKIP() << block.error().ToString();
  (*block)->host()[1 * kHugePageSize + 5] = 1;
  (*block)->alias()[6 * kHugePageSize] = 1;
  auto map = PresentMap::FromResidency(**block);
  ASSERT_TRUE(map.has_value()) << map.error().ToString();
  EXPECT_THAT(map->runs(), ElementsAre(PageRun{1, 1}, PageRun{6, 1}));
}

}  // namespace
}  // namespace faultline::paging
