#include "src/migration/push_scheduler.h"

#include <set>

#include <gtest/gtest.h>

namespace faultline::migration {
namespace {

DirtyBitmap All(uint64_t pages) {
  DirtyBitmap b(pages);
  b.SetAll();
  return b;
}

TEST(PushSchedulerTest, SweepsEveryPageOnceInAddressOrder) {
  std::vector<DirtyBitmap> todo;
  todo.push_back(All(100));
  todo.push_back(All(10));
  todo[0].Clear(5);  // the destination has it
  PushScheduler s(std::move(todo), {1, 1});
  EXPECT_EQ(s.remaining(), 109u);
  std::set<std::pair<uint32_t, uint32_t>> seen;
  uint32_t last_block = 0;
  int64_t last = -1;
  while (auto batch = s.Next(8)) {
    ASSERT_FALSE(batch->pages.empty());
    ASSERT_LE(batch->pages.size(), 8u);
    if (batch->block != last_block) last = -1;
    EXPECT_GT(static_cast<int64_t>(batch->pages.front()), last);
    last = batch->pages.back();
    last_block = batch->block;
    for (uint32_t p : batch->pages) EXPECT_TRUE(seen.insert({batch->block, p}).second);
  }
  EXPECT_EQ(seen.size(), 109u);
  EXPECT_FALSE(seen.contains({0, 5}));
  EXPECT_EQ(s.remaining(), 0u);
}

TEST(PushSchedulerTest, NeighboursOfARequestGoFirst) {
  std::vector<DirtyBitmap> todo;
  todo.push_back(All(10000));
  PushScheduler s(std::move(todo), {1}, {.ahead = 16, .behind = 2, .hints = 4});
  s.Requested(0, {5000});
  auto batch = s.Next(64);
  ASSERT_TRUE(batch.has_value());
  // 4998..5016 without 5000 (answered already): 18 pages.
  ASSERT_EQ(batch->pages.size(), 18u);
  EXPECT_EQ(batch->pages.front(), 4998u);
  EXPECT_EQ(batch->pages.back(), 5016u);
  for (uint32_t p : batch->pages) EXPECT_NE(p, 5000u);
  // Then the sweep resumes from the start.
  batch = s.Next(4);
  ASSERT_TRUE(batch.has_value());
  EXPECT_EQ(batch->pages.front(), 0u);
  EXPECT_EQ(s.remaining(), 10000u - 1 - 18 - 4);
}

TEST(PushSchedulerTest, HugePageUnitsAreNeverSplit) {
  std::vector<DirtyBitmap> todo;
  todo.push_back(All(2048));
  PushScheduler s(std::move(todo), {512});
  std::vector<uint32_t> unit2;
  for (uint32_t p = 1024; p < 1536; ++p) unit2.push_back(p);
  s.Requested(0, unit2);  // a fault on a huge page asks for all of it
  uint64_t total = 0;
  while (auto batch = s.Next(32)) {
    EXPECT_EQ(batch->pages.size() % 512, 0u) << batch->pages.front();
    EXPECT_EQ(batch->pages.front() % 512, 0u);
    total += batch->pages.size();
  }
  EXPECT_EQ(total, 2048u - 512);  // the requested unit is not pushed
}

TEST(PushSchedulerTest, ReturnedBatchesComeBack) {
  std::vector<DirtyBitmap> todo;
  todo.push_back(All(64));
  PushScheduler s(std::move(todo), {1});
  auto batch = s.Next(64);
  ASSERT_TRUE(batch.has_value());
  EXPECT_FALSE(s.Next(64).has_value());
  s.Return(*batch);
  EXPECT_EQ(s.remaining(), 64u);
  auto again = s.Next(64);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->pages, batch->pages);
}

}  // namespace
}  // namespace faultline::migration
