// DemandPager over an adopted userfaultfd: ranges registered by "someone
// else" (here: this test, through a second descriptor of its userfaultfd),
// served through one queue by several threads, with known-zero pages,
// REMOVE events and hugetlb units. The cross-process case (another VMM's
// memory) is tests/integration/page_server_test.cc.
#include "src/paging/adopted_uffd.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/paging/demand_pager.h"
#include "src/paging/foreign_block.h"
#include "src/paging/paging_test_util.h"
#include "src/paging/snapshot_page_source.h"
#include "src/sys/mapping.h"

namespace faultline::paging {
namespace {

using ::testing::HasSubstr;
using testing::PatternBytes;
using testing::PatternWord;

constexpr uint64_t kRegion = 2ull << 20;  // two regions of 512 pages

struct Adopted {
  sys::Mapping memory;  // two regions with a gap page between them
  sys::Userfaultfd owner;
  std::vector<sys::UffdRegistration> registrations;
  std::unique_ptr<DemandPager> pager;
  uint8_t* region(int i) const { return memory.data() + i * (kRegion + kPageSize); }
};

// Regions 0 and 1 hold pattern pages 0..511 and 512..1023 of the source;
// the first `zero_pages` of each are known zero.
Adopted Make(uint64_t zero_pages, uint32_t threads) {
  Adopted a;
  auto memory = sys::Mapping::Anonymous(2 * kRegion + kPageSize, "adopted test");
  EXPECT_TRUE(memory.has_value());
  a.memory = std::move(*memory);
  auto uffd = sys::Userfaultfd::Create(0, sys::kUffdFeatureEventRemove);
  EXPECT_TRUE(uffd.has_value()) << uffd.error().ToString();
  a.owner = std::move(*uffd);
  auto source = std::make_shared<SnapshotPageSource>();
  const uint32_t id = *source->AddCopy("file", PatternBytes(2 * kRegion));
  auto pager = DemandPager::Create(source, {.queues_per_block = 1, .threads_per_queue = threads});
  a.pager = std::move(*pager);
  auto adopted = sys::Userfaultfd::Adopt(sys::UniqueFd(::dup(a.owner.fd())));
  EXPECT_TRUE(adopted.has_value()) << adopted.error().ToString();
  EXPECT_TRUE(a.pager->AdoptUserfaultfd(std::move(*adopted)).ok());
  for (int i = 0; i < 2; ++i) {
    auto reg = a.owner.Register(Hva(a.region(i)), kRegion, sys::UffdMode::kMissing);
    EXPECT_TRUE(reg.has_value()) << reg.error().ToString();
    a.registrations.push_back(std::move(*reg));
    auto block =
        ForeignBlock::Create(fmt::format("region{}", i), Hva(a.region(i)), kRegion, kPageSize);
    EXPECT_TRUE(block.has_value()) << block.error().ToString();
    // The source's offset of region i: block `id` at i * kRegion, through
    // the source block id (the test source has one block; see Wrap below).
    PresentMap zero;
    if (zero_pages > 0) zero = *PresentMap::FromRuns({{0, zero_pages}});
    Status added = a.pager->AddAdoptedBlock(*block, id, zero);
    EXPECT_TRUE(added.ok()) << added.ToString();
  }
  return a;
}

// The pager's stats once `done` holds of them (at most 5 s): an install is
// counted just after it woke the thread that faulted, so a test that reads
// the stats as soon as its touchers return may miss the last one.
template <typename Done>
PagingStats SettledStats(DemandPager& pager, Done done) {
  PagingStats stats = pager.stats();
  for (int i = 0; i < 2500 && !done(stats); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    stats = pager.stats();
  }
  return stats;
}

TEST(AdoptedUffdTest, ServesEveryRegionThroughOneQueueWithSeveralThreads) {
  Adopted a = Make(/*zero_pages=*/16, /*threads=*/3);
  ASSERT_TRUE(a.pager->Start().ok());
  uint64_t wrong = 0;
  std::vector<std::jthread> touchers;
  for (int i = 0; i < 2; ++i) {
    touchers.emplace_back([&, i] {
      const uint8_t* p = a.region(i);
      for (uint64_t page = 0; page < kRegion / kPageSize; ++page) {
        const auto* w = reinterpret_cast<const volatile uint64_t*>(p + page * kPageSize);
        // Both regions are served from block offset 0 (one source block).
        const uint64_t want = page < 16 ? 0 : PatternWord(page, 0);
        if (w[0] != want) ++wrong;
      }
    });
  }
  touchers.clear();
  EXPECT_EQ(wrong, 0u);
  const PagingStats stats = SettledStats(
      *a.pager, [](const PagingStats& s) { return s.units_installed >= 2 * kRegion / kPageSize; });
  EXPECT_EQ(stats.zero_installs, 32u);
  EXPECT_EQ(stats.units_installed, 2 * kRegion / kPageSize);
  EXPECT_EQ(stats.bytes_fetched, 2 * (kRegion - 16 * kPageSize));
  EXPECT_EQ(stats.queue_faults.size(), 1u);
  EXPECT_TRUE(a.pager->first_error().ok()) << a.pager->first_error().ToString();
  a.pager->Stop();
  // The pager unregistered nothing: the owner's registrations still hold
  // (a page dropped now faults again; reading it would block, so only
  // the registration is checked).
  EXPECT_TRUE(a.registrations[0].valid());
}

TEST(AdoptedUffdTest, RemovedPagesReadZeroAfterwards) {
  Adopted a = Make(/*zero_pages=*/0, /*threads=*/2);
  ASSERT_TRUE(a.pager->Start().ok());
  uint8_t* p = a.region(1);
  std::jthread([&] { EXPECT_EQ(testing::WrongPages(p, 0, kRegion / kPageSize), 0u); }).join();
  // The balloon's discard: the handler reads REMOVE, the pages read zero.
  std::jthread([&] {
    EXPECT_EQ(::madvise(p + 64 * kPageSize, 32 * kPageSize, MADV_DONTNEED), 0);
  }).join();
  uint64_t nonzero = 0;
  std::jthread([&] {
    for (uint64_t page = 64; page < 96; ++page) {
      nonzero += *reinterpret_cast<const volatile uint64_t*>(p + page * kPageSize) != 0;
    }
  }).join();
  EXPECT_EQ(nonzero, 0u);
  EXPECT_EQ(testing::WrongPages(p, 0, 64), 0u);
  const PagingStats stats =
      SettledStats(*a.pager, [](const PagingStats& s) { return s.zero_installs >= 32; });
  EXPECT_GE(stats.remove_events, 1u);
  EXPECT_EQ(stats.zero_installs, 32u);
  a.pager->Stop();
}

TEST(AdoptedUffdTest, RefusesWhatCannotBeServed) {
  auto source = std::make_shared<SnapshotPageSource>();
  auto pager = *DemandPager::Create(source);
  auto block = *ForeignBlock::Create("r", Hva(kRegion), kRegion, kPageSize);
  Status no_uffd = pager->AddAdoptedBlock(block, 0);
  EXPECT_THAT(no_uffd.ToString(), HasSubstr("AdoptUserfaultfd"));
  auto not_uffd = sys::Userfaultfd::Adopt(sys::UniqueFd(::open("/dev/null", O_RDWR)));
  ASSERT_FALSE(not_uffd.has_value());
  EXPECT_THAT(not_uffd.error().ToString(), HasSubstr("not a userfaultfd"));
  EXPECT_FALSE(ForeignBlock::Create("r", Hva(kRegion + 1), kRegion, kPageSize).has_value());
  EXPECT_FALSE(ForeignBlock::Create("r", Hva(kRegion), kRegion, 8192).has_value());
  auto uffd = sys::Userfaultfd::Create(0, 0);
  ASSERT_TRUE(uffd.has_value());
  ASSERT_TRUE(
      pager->AdoptUserfaultfd(*sys::Userfaultfd::Adopt(sys::UniqueFd(::dup(uffd->fd())))).ok());
  ASSERT_TRUE(pager->AddAdoptedBlock(block, 0).ok());
  auto overlapping = *ForeignBlock::Create("s", Hva(kRegion + kPageSize), kPageSize, kPageSize);
  EXPECT_THAT(pager->AddAdoptedBlock(overlapping, 0).ToString(), HasSubstr("overlaps"));
}

}  // namespace
}  // namespace faultline::paging
