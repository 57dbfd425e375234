#include "src/paging/snapshot_page_source.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <future>
#include <numeric>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "faultline/types.h"
#include "src/paging/fault_injecting_page_source.h"

namespace faultline::paging {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;

std::vector<uint8_t> Pattern(uint64_t size) {
  std::vector<uint8_t> v(size);
  for (uint64_t i = 0; i < size; ++i) v[i] = static_cast<uint8_t>(i * 7 + (i >> 12));
  return v;
}

// Fetches synchronously (waits for the callback).
FetchResult FetchNow(PageSource& source, uint32_t block, uint64_t offset, std::span<uint8_t> dest) {
  std::promise<FetchResult> promise;
  source.Fetch({block, offset, dest, FetchPriority::kFault},
               [&](FetchResult r) { promise.set_value(std::move(r)); });
  return promise.get_future().get();
}

TEST(SnapshotPageSourceTest, ServesCopyInlineAndCounts) {
  const std::vector<uint8_t> data = Pattern(8 * kPageSize);
  SnapshotPageSource source;
  auto id = source.AddCopy("ram0", data);
  ASSERT_TRUE(id.has_value()) << id.error().ToString();
  std::vector<uint8_t> page(kPageSize);
  bool called = false;
  source.Fetch({*id, 3 * kPageSize, page, FetchPriority::kFault}, [&](FetchResult r) {
    EXPECT_EQ(r.kind, FetchResult::Kind::kFilled);
    called = true;
  });
  EXPECT_TRUE(called) << "no delay: completes before Fetch returns";
  EXPECT_EQ(0, std::memcmp(page.data(), data.data() + 3 * kPageSize, kPageSize));
  EXPECT_EQ(source.fetch_count(*id, 3), 1u);
  EXPECT_EQ(source.fetch_count(*id, 2), 0u);
  EXPECT_EQ(source.fetches(), 1u);
  EXPECT_EQ(source.bytes_served(), kPageSize);
  FetchNow(source, *id, 3 * kPageSize, page);
  EXPECT_EQ(source.refetched_pages(*id), 1u);
}

TEST(SnapshotPageSourceTest, ServesFromFile) {
  const std::vector<uint8_t> data = Pattern(4 * kPageSize);
  char path[] = "/tmp/faultline_source_XXXXXX";
  int fd = ::mkstemp(path);
  ASSERT_GE(fd, 0);
  ::unlink(path);
  ASSERT_EQ(::pwrite(fd, data.data(), data.size(), 512), static_cast<ssize_t>(data.size()));
  SnapshotPageSource source;
  uint32_t id = source.AddFile("ram0", sys::UniqueFd(fd), 512, data.size());
  std::vector<uint8_t> page(2 * kPageSize);
  EXPECT_EQ(FetchNow(source, id, 2 * kPageSize, page).kind, FetchResult::Kind::kFilled);
  EXPECT_EQ(0, std::memcmp(page.data(), data.data() + 2 * kPageSize, page.size()));
}

TEST(SnapshotPageSourceTest, BadRequestsFailWithoutTouchingMemory) {
  SnapshotPageSource source;
  auto id = source.AddCopy("ram0", Pattern(2 * kPageSize));
  ASSERT_TRUE(id.has_value());
  std::vector<uint8_t> page(kPageSize, 0xee);
  FetchResult outside = FetchNow(source, *id, 2 * kPageSize, page);
  EXPECT_EQ(outside.kind, FetchResult::Kind::kFailed);
  EXPECT_THAT(outside.error.message(), HasSubstr("outside"));
  FetchResult no_block = FetchNow(source, 7, 0, page);
  EXPECT_EQ(no_block.kind, FetchResult::Kind::kFailed);
  EXPECT_EQ(page[0], 0xee);
}

TEST(SnapshotPageSourceTest, DelayedFetchesOverlap) {
  SnapshotPageSource source({.delay = 50ms});
  auto id = source.AddCopy("ram0", Pattern(64 * kPageSize));
  ASSERT_TRUE(id.has_value());
  std::vector<uint8_t> buf(64 * kPageSize);
  std::atomic<int> done{0};
  const auto start = std::chrono::steady_clock::now();
  for (uint64_t p = 0; p < 64; ++p) {
    source.Fetch(
        {*id, p * kPageSize, {buf.data() + p * kPageSize, kPageSize}, FetchPriority::kFault},
        [&](FetchResult r) {
          EXPECT_EQ(r.kind, FetchResult::Kind::kFilled);
          done.fetch_add(1);
          done.notify_all();
        });
  }
  EXPECT_LT(done.load(), 64) << "a 50 ms delay should not have elapsed yet";
  for (int n = done.load(); n < 64; n = done.load()) done.wait(n);
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_GE(elapsed, 50ms);
  EXPECT_LT(elapsed, 64 * 50ms / 4) << "fetches ran one after another";
  EXPECT_EQ(0, std::memcmp(buf.data(), Pattern(64 * kPageSize).data(), buf.size()));
}

TEST(SnapshotPageSourceTest, CancelCompletesPendingFetches) {
  SnapshotPageSource source({.delay = 10s});
  auto id = source.AddCopy("ram0", Pattern(kPageSize));
  ASSERT_TRUE(id.has_value());
  std::vector<uint8_t> page(kPageSize);
  std::atomic<int> failed{0};
  for (int i = 0; i < 3; ++i) {
    source.Fetch({*id, 0, page, FetchPriority::kFault}, [&](FetchResult r) {
      EXPECT_EQ(r.kind, FetchResult::Kind::kFailed);
      failed.fetch_add(1);
    });
  }
  source.CancelAll();
  EXPECT_EQ(failed.load(), 3);
  EXPECT_EQ(FetchNow(source, *id, 0, page).kind, FetchResult::Kind::kFailed);
}

TEST(FaultInjectingPageSourceTest, UnavailableAndFailingPages) {
  auto inner = std::make_shared<SnapshotPageSource>();
  auto id = inner->AddCopy("ram0", Pattern(16 * kPageSize));
  ASSERT_TRUE(id.has_value());
  FaultInjectingPageSource source(inner);
  source.MakeUnavailable(*id, 5 * kPageSize, kPageSize);
  source.FailFetches(*id, 7 * kPageSize, kPageSize, 2);
  std::vector<uint8_t> page(kPageSize);
  FetchResult bad = FetchNow(source, *id, 5 * kPageSize, page);
  EXPECT_EQ(bad.kind, FetchResult::Kind::kUnavailable);
  EXPECT_THAT(bad.error.message(), HasSubstr("unavailable"));
  EXPECT_EQ(FetchNow(source, *id, 7 * kPageSize, page).kind, FetchResult::Kind::kFailed);
  EXPECT_EQ(FetchNow(source, *id, 7 * kPageSize, page).kind, FetchResult::Kind::kFailed);
  EXPECT_EQ(FetchNow(source, *id, 7 * kPageSize, page).kind, FetchResult::Kind::kFilled);
  EXPECT_EQ(FetchNow(source, *id, 4 * kPageSize, page).kind, FetchResult::Kind::kFilled);
  EXPECT_EQ(source.injected_unavailable(), 1u);
  EXPECT_EQ(source.injected_failures(), 2u);
  EXPECT_EQ(inner->fetch_count(*id, 5), 0u) << "the inner source was never asked";
  // A two-page request overlapping the unavailable page is unavailable.
  std::vector<uint8_t> two(2 * kPageSize);
  EXPECT_EQ(FetchNow(source, *id, 4 * kPageSize, two).kind, FetchResult::Kind::kUnavailable);
}

TEST(FaultInjectingPageSourceTest, EveryNthFails) {
  auto inner = std::make_shared<SnapshotPageSource>();
  auto id = inner->AddCopy("ram0", Pattern(kPageSize));
  ASSERT_TRUE(id.has_value());
  FaultInjectingPageSource source(inner);
  source.FailEveryNth(3);
  std::vector<uint8_t> page(kPageSize);
  int failed = 0;
  for (int i = 0; i < 9; ++i) {
    failed += FetchNow(source, *id, 0, page).kind == FetchResult::Kind::kFailed;
  }
  EXPECT_EQ(failed, 3);
}

}  // namespace
}  // namespace faultline::paging
