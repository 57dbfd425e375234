// DemandPager: discards (UFFD_EVENT_REMOVE), fetch failures, queue
// partitioning, configuration errors.
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/paging/demand_pager.h"
#include "src/paging/fault_injecting_page_source.h"
#include "src/paging/paging_test_util.h"
#include "src/paging/snapshot_page_source.h"

namespace faultline::paging {
namespace {

using ::testing::HasSubstr;
using testing::PatternBytes;
using testing::WrongPages;
using namespace std::chrono_literals;

constexpr uint64_t kSize = 4ull << 20;
constexpr uint64_t kPages = kSize / kPageSize;

struct Paged {
  std::shared_ptr<RamBlock> block;
  std::shared_ptr<SnapshotPageSource> snapshot;
  uint32_t id = 0;
  std::unique_ptr<DemandPager> pager;
};

Paged Make(Backing backing, InstallerKind kind, PagerOptions options = {},
           SnapshotPageSource::Options source_options = {},
           std::function<std::shared_ptr<PageSource>(std::shared_ptr<SnapshotPageSource>, uint32_t)>
               wrap = nullptr) {
  Paged s;
  auto block = RamBlock::Create({.name = "ram0", .size = kSize, .backing = backing});
  EXPECT_TRUE(block.has_value()) << block.error().ToString();
  if (!block.has_value()) return s;
  s.block = *block;
  s.snapshot = std::make_shared<SnapshotPageSource>(source_options);
  s.id = *s.snapshot->AddCopy("ram0", PatternBytes(kSize));
  std::shared_ptr<PageSource> source = wrap ? wrap(s.snapshot, s.id) : s.snapshot;
  auto pager = DemandPager::Create(source, std::move(options));
  EXPECT_TRUE(pager.has_value());
  s.pager = std::move(*pager);
  Status added = s.pager->AddBlock(s.block, kind, s.id);
  EXPECT_TRUE(added.ok()) << added.ToString();
  EXPECT_TRUE(s.pager->Start().ok());
  return s;
}

bool AllZero(const uint8_t* p, uint64_t n) {
  for (uint64_t i = 0; i < n; i += 8) {
    if (*reinterpret_cast<const volatile uint64_t*>(p + i) != 0) return false;
  }
  return true;
}

// MADV_DONTNEED (anonymous) and MADV_REMOVE (memfd) on paged memory raise
// UFFD_EVENT_REMOVE: the pages then read as zeros, without a fetch.
TEST(DemandPagerEventsTest, DiscardedPagesReadZeroAndAreNotRefetched) {
  struct Case {
    Backing backing;
    InstallerKind kind;
    int advice;
  };
  for (Case c : {Case{Backing::kAnonymous, InstallerKind::kMove, MADV_DONTNEED},
                 Case{Backing::kAnonymous, InstallerKind::kCopy, MADV_DONTNEED},
                 Case{Backing::kMemfd, InstallerKind::kContinue, MADV_REMOVE}}) {
    SCOPED_TRACE(InstallerName(c.kind));
    Paged s = Make(c.backing, c.kind);
    ASSERT_NE(s.pager, nullptr);
    uint8_t* host = s.block->host();
    std::jthread([&] { EXPECT_EQ(WrongPages(host, 0, kPages), 0u); }).join();
    // From another thread: madvise waits until a handler has read the event.
    std::jthread([&] {
      ASSERT_EQ(::madvise(host + 8 * kPageSize, 4 * kPageSize, c.advice), 0);
    }).join();
    std::jthread([&] {
      EXPECT_TRUE(AllZero(host + 8 * kPageSize, 4 * kPageSize));
      EXPECT_EQ(WrongPages(host + 12 * kPageSize, 12, 4), 0u);
    }).join();
    // The reader is woken from inside the last install's ioctl, possibly
    // before the installer has counted it.
    PagingStats stats = s.pager->stats();
    for (int i = 0; i < 1000 && stats.zero_installs < 4; ++i) {
      std::this_thread::sleep_for(1ms);
      stats = s.pager->stats();
    }
    EXPECT_GE(stats.remove_events, 1u) << stats.ToString();
    EXPECT_EQ(stats.zero_installs, 4u) << stats.ToString();
    EXPECT_EQ(s.snapshot->refetched_pages(s.id), 0u);
    EXPECT_TRUE(s.pager->first_error().ok()) << s.pager->first_error().ToString();
  }
}

// A page discarded while its fetch is in flight must read as zeros once
// the discard has returned: the fetched data is dropped, not installed.
TEST(DemandPagerEventsTest, DiscardDuringFetchWins) {
  for (InstallerKind kind : {InstallerKind::kMove, InstallerKind::kContinue}) {
    SCOPED_TRACE(InstallerName(kind));
    const Backing backing = kind == InstallerKind::kMove ? Backing::kAnonymous : Backing::kMemfd;
    Paged s = Make(backing, kind, {}, {.delay = 300ms});
    ASSERT_NE(s.pager, nullptr);
    uint8_t* page = s.block->host() + 5 * kPageSize;
    std::atomic<uint64_t> seen{1};
    std::jthread reader([&] { seen = *reinterpret_cast<volatile uint64_t*>(page); });
    std::this_thread::sleep_for(100ms);  // the fetch is in flight now
    ASSERT_EQ(
        ::madvise(page, kPageSize, backing == Backing::kAnonymous ? MADV_DONTNEED : MADV_REMOVE),
        0);
    reader.join();
    // The reader raced with the discard: it may see either; afterwards the
    // page is zero.
    EXPECT_TRUE(seen == 0 || seen == testing::PatternWord(5, 0)) << seen;
    std::jthread([&] { EXPECT_TRUE(AllZero(page, kPageSize)); }).join();
    EXPECT_TRUE(s.pager->first_error().ok()) << s.pager->first_error().ToString();
  }
}

TEST(DemandPagerEventsTest, FailedFetchesAreRetried) {
  Paged s = Make(Backing::kAnonymous, InstallerKind::kMove, {.fetch_attempts = 3}, {},
                 [](std::shared_ptr<SnapshotPageSource> inner, uint32_t id) {
                   auto f = std::make_shared<FaultInjectingPageSource>(inner);
                   f->FailFetches(id, 7 * kPageSize, kPageSize, 2);
                   return f;
                 });
  ASSERT_NE(s.pager, nullptr);
  std::jthread([&] { EXPECT_EQ(WrongPages(s.block->host(), 0, kPages), 0u); }).join();
  PagingStats stats = s.pager->stats();
  EXPECT_EQ(stats.fetch_retries, 2u);
  EXPECT_EQ(stats.poisoned, 0u);
  EXPECT_TRUE(s.pager->first_error().ok());
}

TEST(DemandPagerEventsTest, FetchThatKeepsFailingIsPoisonedAndReported) {
  Paged s = Make(Backing::kAnonymous, InstallerKind::kCopy, {.fetch_attempts = 3}, {},
                 [](std::shared_ptr<SnapshotPageSource> inner, uint32_t id) {
                   auto f = std::make_shared<FaultInjectingPageSource>(inner);
                   f->FailFetches(id, 7 * kPageSize, kPageSize, 100);
                   return f;
                 });
  ASSERT_NE(s.pager, nullptr);
  testing::SigbusCatcher catcher;
  uint64_t wrong = 0;
  bool ok = true;
  std::jthread([&] {
    ok = testing::CheckCatchingSigbus(catcher, s.block->host() + 7 * kPageSize, 7, 1, &wrong);
  }).join();
  EXPECT_FALSE(ok) << "the page should have been poisoned";
  EXPECT_THAT(s.pager->first_error().ToString(), HasSubstr("fetch failed 3 times"));
  ASSERT_EQ(s.pager->poisoned().size(), 1u);
  EXPECT_EQ(s.pager->poisoned()[0].offset, 7 * kPageSize);
}

TEST(DemandPagerEventsTest, QueuesShareOutTheFaults) {
  Paged s = Make(Backing::kAnonymous, InstallerKind::kMove, {.queues_per_block = 4});
  ASSERT_NE(s.pager, nullptr);
  std::vector<std::jthread> threads;
  for (uint32_t t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      s.pager->threads().Add(::gettid(), t);
      const uint64_t first = kPages * t / 4;
      EXPECT_EQ(WrongPages(s.block->host() + first * kPageSize, first, kPages / 4), 0u);
    });
  }
  threads.clear();
  PagingStats stats = s.pager->stats();
  ASSERT_EQ(stats.queue_faults.size(), 4u);
  ASSERT_EQ(stats.vcpu_faults.size(), 4u);
  for (uint32_t q = 0; q < 4; ++q) {
    EXPECT_EQ(stats.queue_faults[q], kPages / 4) << "queue " << q;
    EXPECT_EQ(stats.vcpu_faults[q], kPages / 4) << "vcpu " << q;
  }
}

TEST(DemandPagerEventsTest, UnsupportedCombinationsSayWhatToUse) {
  auto source = std::make_shared<SnapshotPageSource>();
  auto pager = DemandPager::Create(source);
  ASSERT_TRUE(pager.has_value());
  auto memfd = RamBlock::Create({.name = "m", .size = kSize, .backing = Backing::kMemfd});
  auto anon = RamBlock::Create({.name = "a", .size = kSize});
  ASSERT_TRUE(memfd.has_value() && anon.has_value());
  EXPECT_THAT((*pager)->AddBlock(*memfd, InstallerKind::kMove, 0).ToString(),
              HasSubstr("use continue"));
  EXPECT_THAT((*pager)->AddBlock(*anon, InstallerKind::kContinue, 0).ToString(),
              HasSubstr("use move"));
  EXPECT_THAT(CheckInstaller(InstallerKind::kCopy, Backing::kGuestMemfd).ToString(),
              HasSubstr("--installer hole"));
  EXPECT_THAT((*pager)->AddBlock(*anon, InstallerKind::kHole, 0).ToString(),
              HasSubstr("HolePager"));
  ASSERT_TRUE((*pager)->AddBlock(*anon, InstallerKind::kMove, 0).ok());
  EXPECT_THAT((*pager)->AddBlock(*anon, InstallerKind::kMove, 0).ToString(),
              HasSubstr("already paged"));
  EXPECT_FALSE(DemandPager::Create(source, {.queues_per_block = 0}).has_value());
  EXPECT_EQ(BestInstaller(Backing::kAnonymous), InstallerKind::kMove);
  EXPECT_EQ(BestInstaller(Backing::kHugetlb), InstallerKind::kContinue);
  EXPECT_EQ(BestInstaller(Backing::kGuestMemfd), InstallerKind::kHole);
}

}  // namespace
}  // namespace faultline::paging
