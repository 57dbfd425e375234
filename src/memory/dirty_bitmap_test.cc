#include "src/memory/dirty_bitmap.h"

#include <random>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace faultline {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;
using PageRun = std::pair<uint64_t, uint64_t>;

std::vector<uint64_t> SetPages(const DirtyBitmap& bitmap) {
  std::vector<uint64_t> pages;
  bitmap.ForEachSet([&](uint64_t page) { pages.push_back(page); });
  return pages;
}

std::vector<PageRun> Runs(const DirtyBitmap& bitmap) {
  std::vector<PageRun> runs;
  bitmap.ForEachRun([&](uint64_t first, uint64_t count) { runs.emplace_back(first, count); });
  return runs;
}

TEST(DirtyBitmapTest, EmptyBitmap) {
  DirtyBitmap none;
  EXPECT_EQ(none.pages(), 0u);
  EXPECT_TRUE(none.Empty());
  EXPECT_EQ(none.Count(), 0u);
  EXPECT_THAT(Runs(none), IsEmpty());
  EXPECT_EQ(none.FindNextSet(0), 0u);
  none.SetRange(0, 0);  // an empty range anywhere up to pages() is fine
  none.MergeRaw({}, 0, 0);

  DirtyBitmap clean(1000);
  EXPECT_TRUE(clean.Empty());
  EXPECT_THAT(SetPages(clean), IsEmpty());
  EXPECT_EQ(clean.FindNextSet(0), 1000u);
  EXPECT_EQ(clean.FindNextClear(999), 999u);
}

TEST(DirtyBitmapTest, SingleBits) {
  DirtyBitmap bitmap(130);
  bitmap.Set(0);
  bitmap.Set(63);
  bitmap.Set(64);
  bitmap.Set(129);
  EXPECT_TRUE(bitmap.Test(63));
  EXPECT_FALSE(bitmap.Test(62));
  EXPECT_THAT(SetPages(bitmap), ElementsAre(0, 63, 64, 129));
  EXPECT_THAT(Runs(bitmap), ElementsAre(PageRun{0, 1}, PageRun{63, 2}, PageRun{129, 1}));
  EXPECT_TRUE(bitmap.TestAndClear(63));
  EXPECT_FALSE(bitmap.TestAndClear(63));
  bitmap.Clear(129);
  EXPECT_EQ(bitmap.Count(), 2u);
}

TEST(DirtyBitmapTest, RangesCrossingWords) {
  DirtyBitmap bitmap(300);
  bitmap.SetRange(60, 10);  // crosses the first word boundary
  EXPECT_EQ(bitmap.Count(), 10u);
  EXPECT_THAT(Runs(bitmap), ElementsAre(PageRun{60, 10}));
  bitmap.SetRange(100, 150);  // spans whole words
  EXPECT_EQ(bitmap.CountRange(0, 300), 160u);
  EXPECT_EQ(bitmap.CountRange(64, 64), 6u + 28u);
  EXPECT_TRUE(bitmap.AnyInRange(99, 2));
  EXPECT_FALSE(bitmap.AnyInRange(70, 30));
  bitmap.ClearRange(128, 64);  // exactly one word
  EXPECT_THAT(Runs(bitmap), ElementsAre(PageRun{60, 10}, PageRun{100, 28}, PageRun{192, 58}));
  bitmap.ClearRange(0, 300);
  EXPECT_TRUE(bitmap.Empty());
}

TEST(DirtyBitmapTest, FullBitmapKeepsTailBitsClear) {
  DirtyBitmap bitmap(70);
  bitmap.SetAll();
  EXPECT_EQ(bitmap.Count(), 70u);
  EXPECT_EQ(bitmap.words()[1], (uint64_t{1} << 6) - 1);  // nothing past page 69
  EXPECT_THAT(Runs(bitmap), ElementsAre(PageRun{0, 70}));
  EXPECT_EQ(bitmap.FindNextClear(0), 70u);

  DirtyBitmap exact(128);
  exact.SetAll();
  EXPECT_THAT(Runs(exact), ElementsAre(PageRun{0, 128}));
}

TEST(DirtyBitmapTest, MergeBitmaps) {
  DirtyBitmap a(100);
  DirtyBitmap b(100);
  a.SetRange(0, 10);
  b.SetRange(5, 10);
  a.Merge(b);
  EXPECT_THAT(Runs(a), ElementsAre(PageRun{0, 15}));
}

TEST(DirtyBitmapTest, MergeRawAlignedOffset) {
  DirtyBitmap bitmap(256);
  const std::vector<uint64_t> slot = {0x8000000000000001ull, 0x3};
  bitmap.MergeRaw(slot, 128, 64);
  EXPECT_THAT(SetPages(bitmap), ElementsAre(64, 127, 128, 129));
}

TEST(DirtyBitmapTest, MergeRawUnalignedOffsetSpillsIntoNextWord) {
  DirtyBitmap bitmap(200);
  bitmap.Set(0);
  const std::vector<uint64_t> slot = {0xC000000000000001ull, 0x1};
  bitmap.MergeRaw(slot, 65, 3);
  EXPECT_THAT(SetPages(bitmap), ElementsAre(0, 3, 3 + 62, 3 + 63, 3 + 64));
  EXPECT_EQ(bitmap.Count(), 5u);
}

TEST(DirtyBitmapTest, MergeRawIgnoresBitsPastCount) {
  DirtyBitmap bitmap(128);
  const std::vector<uint64_t> slot = {~uint64_t{0}};
  bitmap.MergeRaw(slot, 10, 60);  // only 10 pages; the other 54 bits are noise
  EXPECT_THAT(Runs(bitmap), ElementsAre(PageRun{60, 10}));
}

TEST(DirtyBitmapTest, MergeRawAtTheVeryEnd) {
  DirtyBitmap bitmap(130);
  const std::vector<uint64_t> slot = {0x7};
  bitmap.MergeRaw(slot, 3, 127);
  EXPECT_THAT(Runs(bitmap), ElementsAre(PageRun{127, 3}));
}

TEST(DirtyBitmapTest, MergeRawMatchesBitByBitForEveryShift) {
  std::mt19937_64 rng(42);
  for (uint64_t offset = 0; offset < 130; ++offset) {
    for (uint64_t count : {1ull, 63ull, 64ull, 65ull, 200ull}) {
      DirtyBitmap bitmap(offset + count + 7);
      std::vector<uint64_t> src((count + 63) / 64 + 1);
      for (uint64_t& word : src) word = rng();
      bitmap.MergeRaw(src, count, offset);
      DirtyBitmap expected(bitmap.pages());
      for (uint64_t i = 0; i < count; ++i) {
        if ((src[i / 64] >> (i % 64)) & 1) expected.Set(offset + i);
      }
      ASSERT_EQ(bitmap, expected) << "offset " << offset << " count " << count;
    }
  }
}

TEST(DirtyBitmapTest, TakeHarvestsAndClears) {
  DirtyBitmap bitmap(100);
  bitmap.SetRange(10, 5);
  DirtyBitmap harvested = bitmap.Take();
  EXPECT_TRUE(bitmap.Empty());
  EXPECT_EQ(bitmap.pages(), 100u);
  EXPECT_THAT(Runs(harvested), ElementsAre(PageRun{10, 5}));

  // TakeInto reuses the destination's storage across harvests.
  bitmap.Set(99);
  bitmap.TakeInto(harvested);
  EXPECT_THAT(SetPages(harvested), ElementsAre(99));
  EXPECT_TRUE(bitmap.Empty());
  bitmap.Set(1);
  EXPECT_THAT(SetPages(bitmap), ElementsAre(1));
}

TEST(DirtyBitmapTest, RunsMatchBitByBitOnRandomBitmaps) {
  std::mt19937_64 rng(7);
  for (int round = 0; round < 50; ++round) {
    DirtyBitmap bitmap(1 + rng() % 1000);
    for (int k = 0; k < 20; ++k) {
      const uint64_t first = rng() % bitmap.pages();
      bitmap.SetRange(first, rng() % (bitmap.pages() - first + 1));
      const uint64_t clear = rng() % bitmap.pages();
      bitmap.ClearRange(clear, rng() % (bitmap.pages() - clear + 1) / 2);
    }
    std::vector<PageRun> expected;
    for (uint64_t page = 0; page < bitmap.pages(); ++page) {
      if (!bitmap.Test(page)) continue;
      if (!expected.empty() && expected.back().first + expected.back().second == page) {
        ++expected.back().second;
      } else {
        expected.emplace_back(page, 1);
      }
    }
    ASSERT_EQ(Runs(bitmap), expected);
  }
}

TEST(DirtyBitmapDeathTest, OutOfRangeAborts) {
  DirtyBitmap bitmap(64);
  EXPECT_DEATH(bitmap.Set(64), "outside 0x40 pages");
  EXPECT_DEATH(bitmap.SetRange(60, 5), "outside");
  EXPECT_DEATH(bitmap.MergeRaw(std::vector<uint64_t>{1}, 1, 64), "outside");
}

}  // namespace
}  // namespace faultline
