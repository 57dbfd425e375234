// DemandPager on real userfaultfd: host threads touch RAM blocks of every
// backing and every installer that supports it.
#include "src/paging/demand_pager.h"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <latch>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/paging/fault_injecting_page_source.h"
#include "src/paging/paging_test_util.h"
#include "src/paging/snapshot_page_source.h"
#include "src/sys/memfd.h"
#include "src/sys/mutex.h"

namespace faultline::paging {
namespace {

using ::testing::HasSubstr;
using testing::PatternBytes;
using testing::PatternWord;
using testing::ScopedHugePages;
using testing::WrongPages;
using namespace std::chrono_literals;

constexpr uint64_t kBlockSize = 16ull << 20;

struct Combo {
  InstallerKind kind;
  Backing backing;
};

void PrintTo(const Combo& c, std::ostream* os) {
  *os << InstallerName(c.kind) << " on " << BackingName(c.backing);
}

std::string ComboName(const ::testing::TestParamInfo<Combo>& info) {
  return std::string(InstallerName(info.param.kind)) + "_" + BackingName(info.param.backing);
}

// A block, a snapshot of the pattern to page it from, and a pager.
class PagingTest : public ::testing::TestWithParam<Combo> {
 protected:
  void SetUp() override {
    if (GetParam().backing == Backing::kHugetlb) {
      huge_.emplace(kBlockSize / kHugePageSize + 2);
      if (!huge_->ok()) GTEST_SKIP() << "cannot reserve huge pages (not root?)";
    }
    auto block =
        RamBlock::Create({.name = "ram0", .size = kBlockSize, .backing = GetParam().backing});
    if (!block.has_value() && GetParam().backing == Backing::kHugetlb) {
      GTEST_SKIP() << block.error().ToString();
    }
    ASSERT_TRUE(block.has_value()) << block.error().ToString();
    block_ = *block;
    snapshot_ = std::make_shared<SnapshotPageSource>(source_options_);
    auto id = snapshot_->AddCopy("ram0", PatternBytes(kBlockSize));
    ASSERT_TRUE(id.has_value()) << id.error().ToString();
    id_ = *id;
  }

  void MakePager(std::shared_ptr<PageSource> source, PagerOptions options = {},
                 const PresentMap& present = {}) {
    auto pager = DemandPager::Create(std::move(source), std::move(options));
    ASSERT_TRUE(pager.has_value()) << pager.error().ToString();
    pager_ = std::move(*pager);
    Status added = pager_->AddBlock(block_, GetParam().kind, id_, present);
    ASSERT_TRUE(added.ok()) << added.ToString();
    ASSERT_TRUE(pager_->Start().ok());
  }

  // `threads` threads, registered as vCPUs 0..n-1, each reading two words of
  // every page of its 1/n of the block; returns the wrong pages seen.
  uint64_t TouchInParallel(uint32_t threads) {
    std::atomic<uint64_t> wrong{0};
    const uint64_t pages = kBlockSize / kPageSize;
    std::vector<std::jthread> workers;
    for (uint32_t t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        pager_->threads().Add(::gettid(), t);
        const uint64_t first = pages * t / threads;
        const uint64_t last = pages * (t + 1) / threads;
        wrong += WrongPages(block_->host() + first * kPageSize, first, last - first);
      });
    }
    workers.clear();
    return wrong.load();
  }

  // A faulting thread is woken from inside the install ioctl, so it can
  // finish before the installing thread has recorded the install. Waits
  // until every unit is settled.
  void WaitSettled() {
    for (int i = 0; i < 5000 && !pager_->complete(); ++i) std::this_thread::sleep_for(1ms);
  }
  // A fault is timed once its unit is settled, just after (by the settling
  // thread, or the handler of a joined fault). Waits until every fault
  // read so far is timed.
  PagingStats WaitTimed() {
    PagingStats s = pager_->stats();
    for (int i = 0; i < 5000 && s.latency.count + s.faults_unmeasured < s.faults; ++i) {
      std::this_thread::sleep_for(1ms);
      s = pager_->stats();
    }
    return s;
  }

  bool is_zero() const { return GetParam().kind == InstallerKind::kZero; }

  std::optional<ScopedHugePages> huge_;
  SnapshotPageSource::Options source_options_;
  std::shared_ptr<RamBlock> block_;
  std::shared_ptr<SnapshotPageSource> snapshot_;
  uint32_t id_ = 0;
  std::unique_ptr<DemandPager> pager_;
};

TEST_P(PagingTest, EveryPageComesFromTheSourceExactlyOnce) {
  MakePager(snapshot_, {.queues_per_block = 2});
  const uint64_t pages = kBlockSize / kPageSize;
  const uint64_t wrong = TouchInParallel(2);
  WaitSettled();
  PagingStats stats = WaitTimed();
  SCOPED_TRACE(stats.ToString());
  EXPECT_TRUE(pager_->first_error().ok()) << pager_->first_error().ToString();
  EXPECT_TRUE(pager_->complete());
  const uint64_t units = kBlockSize / block_->page_size();
  EXPECT_EQ(stats.units_installed, units);
  ASSERT_EQ(stats.vcpu_faults.size(), 2u);
  EXPECT_GT(stats.vcpu_faults[0], 0u);
  EXPECT_GT(stats.vcpu_faults[1], 0u);
  EXPECT_EQ(stats.other_faults, 0u);
  ASSERT_EQ(stats.queue_faults.size(), 2u);
  EXPECT_GT(stats.queue_faults[0], 0u);
  EXPECT_GT(stats.queue_faults[1], 0u);
  // Every fault is timed, by the vCPU that took it.
  EXPECT_GE(stats.faults, units);
  EXPECT_EQ(stats.faults_unmeasured, 0u);
  EXPECT_EQ(stats.latency.count, stats.faults);
  EXPECT_GT(stats.latency.p50_us, 0);
  ASSERT_EQ(stats.vcpu_latency.size(), 2u);
  EXPECT_EQ(stats.vcpu_latency[0].count, stats.vcpu_faults[0]);
  EXPECT_EQ(stats.vcpu_latency[1].count, stats.vcpu_faults[1]);
  EXPECT_GT(stats.vcpu_latency[0].p50_us, 0);
  EXPECT_GT(stats.vcpu_latency[1].p50_us, 0);
  EXPECT_EQ(stats.other_latency.count, 0u);
  EXPECT_GT(stats.blocked_seconds(), 0);
  if (is_zero()) {
    EXPECT_EQ(wrong, pages) << "the floor installs zeros";
    EXPECT_EQ(snapshot_->fetches(), 0u);
    return;
  }
  EXPECT_EQ(wrong, 0u);
  for (uint64_t p = 0; p < pages; ++p) {
    ASSERT_EQ(snapshot_->fetch_count(id_, p), 1u) << "page " << p;
  }
  const double copied = GetParam().kind == InstallerKind::kCopy ? 4096 : 0;
  EXPECT_EQ(stats.bytes_copied_per_page(), copied);
  EXPECT_EQ(stats.bytes_fetched, kBlockSize);
}

TEST_P(PagingTest, PresentPagesNeverFault) {
  if (is_zero()) GTEST_SKIP() << "the floor has no source";
  // Every other unit present, written beforehand where the guest would
  // find it: host() for anonymous memory, the page cache for the others.
  const uint64_t unit = block_->page_size();
  const uint64_t units = kBlockSize / unit;
  const std::vector<uint8_t> pattern = PatternBytes(kBlockSize);
  uint8_t* writer = block_->alias() != nullptr ? block_->alias() : block_->host();
  DirtyBitmap present(units);
  for (uint64_t u = 0; u < units; u += 2) {
    present.Set(u);
    std::memcpy(writer + u * unit, pattern.data() + u * unit, unit);
  }
  MakePager(snapshot_, {}, PresentMap::FromBitmap(present));
  EXPECT_EQ(pager_->missing_units(), units / 2);
  EXPECT_EQ(TouchInParallel(1), 0u);
  WaitSettled();
  PagingStats stats = pager_->stats();
  SCOPED_TRACE(stats.ToString());
  EXPECT_EQ(stats.faults, units / 2) << "only the missing half faults";
  EXPECT_EQ(stats.faults_spurious, 0u);
  for (uint64_t u = 0; u < units; ++u) {
    ASSERT_EQ(snapshot_->fetch_count(id_, u * unit / kPageSize), u % 2 == 0 ? 0u : 1u)
        << "unit " << u;
  }
}

TEST_P(PagingTest, ConcurrentFaultsOnOnePageFetchItOnce) {
  // A slow source widens the window in which several threads wait on the
  // same page.
  auto slow = std::make_shared<SnapshotPageSource>(
      SnapshotPageSource::Options{.delay = 2ms, .delay_threads = 2});
  auto id = slow->AddCopy("ram0", PatternBytes(kBlockSize));
  ASSERT_TRUE(id.has_value());
  id_ = *id;
  snapshot_ = slow;
  MakePager(slow, {.queues_per_block = 2, .threads_per_queue = 2});
  constexpr uint64_t kPages = 256;
  std::atomic<uint64_t> wrong{0};
  {
    std::latch ready(4);  // all start together, so that they meet on pages
    std::vector<std::jthread> workers;
    for (uint32_t t = 0; t < 4; ++t) {
      workers.emplace_back([&, t] {
        pager_->threads().Add(::gettid(), t);
        ready.arrive_and_wait();
        // Everyone walks the same pages (two from each end of the block).
        for (uint64_t i = 0; i < kPages; ++i) {
          const uint64_t page = i % 2 == 0 ? i : kBlockSize / kPageSize - i;
          const uint8_t* p = block_->host() + page * kPageSize;
          wrong += is_zero() ? *reinterpret_cast<const volatile uint64_t*>(p) != 0
                             : WrongPages(p, page, 1);
        }
      });
    }
  }
  PagingStats stats = pager_->stats();
  SCOPED_TRACE(stats.ToString());
  EXPECT_EQ(wrong.load(), 0u);
  if (!is_zero()) {
    // The floor has no fetch to wait on: its faults are resolved at once,
    // so whether two ever overlap is down to scheduling.
    EXPECT_GT(stats.faults_joined, 0u) << "threads never met on a page";
    EXPECT_EQ(slow->refetched_pages(id_), 0u);
  }
  // Joined faults are timed too, each by its own vCPU.
  stats = WaitTimed();
  EXPECT_EQ(stats.faults_unmeasured, 0u);
  EXPECT_EQ(stats.latency.count, stats.faults);
  // One entry per vCPU up to the last that faulted (on the floor with huge
  // pages, the first thread may take every fault: 2 units, resolved at once).
  ASSERT_LE(stats.vcpu_latency.size(), 4u);
  ASSERT_EQ(stats.vcpu_latency.size(), stats.vcpu_faults.size());
  for (uint32_t t = 0; t < stats.vcpu_latency.size(); ++t) {
    EXPECT_EQ(stats.vcpu_latency[t].count, stats.vcpu_faults[t]) << "vcpu " << t;
  }
  EXPECT_TRUE(pager_->first_error().ok()) << pager_->first_error().ToString();
}

TEST_P(PagingTest, UnavailablePageIsPoisonedAndTheRestIsRight) {
  if (is_zero()) GTEST_SKIP() << "the floor has no source";
  auto faulty = std::make_shared<FaultInjectingPageSource>(snapshot_);
  const uint64_t bad = 5 * block_->page_size() + 3 * kPageSize;  // inside unit 5
  faulty->MakeUnavailable(id_, bad, kPageSize);
  std::vector<PoisonedUnit> reported;
  sys::Mutex mu;
  MakePager(faulty, {.on_poison = [&](const PoisonedUnit& u) {
              sys::MutexLock lock(mu);
              reported.push_back(u);
            }});
  testing::SigbusCatcher catcher;
  uint64_t sigbus = 0, wrong = 0;
  uintptr_t sigbus_addr = 0;
  int sigbus_code = 0;
  std::jthread toucher([&] {
    const uint64_t unit = block_->page_size();
    for (uint64_t u = 0; u < kBlockSize / unit; ++u) {
      if (!testing::CheckCatchingSigbus(catcher, block_->host() + u * unit, u * unit / kPageSize,
                                        unit / kPageSize, &wrong)) {
        ++sigbus;
        sigbus_addr = testing::SigbusCatcher::last_address();
        sigbus_code = testing::SigbusCatcher::last_code();
      }
    }
  });
  toucher.join();
  WaitSettled();
  EXPECT_EQ(sigbus, 1u);
  EXPECT_EQ(wrong, 0u);
  // BUS_MCEERR_AR where the kernel has CONFIG_MEMORY_FAILURE; this one has
  // not, and reports BUS_ADRERR. (KVM reports BUS_MCEERR_AR either way.)
  EXPECT_TRUE(sigbus_code == BUS_MCEERR_AR || sigbus_code == BUS_ADRERR) << sigbus_code;
  const uint64_t unit_start = AlignDown(bad, block_->page_size());
  EXPECT_GE(sigbus_addr, reinterpret_cast<uintptr_t>(block_->host() + unit_start));
  EXPECT_LT(sigbus_addr,
            reinterpret_cast<uintptr_t>(block_->host() + unit_start) + block_->page_size());
  auto poisoned = pager_->poisoned();
  ASSERT_EQ(poisoned.size(), 1u);
  EXPECT_EQ(poisoned[0].offset, unit_start);
  EXPECT_EQ(poisoned[0].block, "ram0");
  EXPECT_THAT(poisoned[0].reason, HasSubstr("unavailable"));
  ASSERT_EQ(reported.size(), 1u);
  EXPECT_EQ(pager_->stats().poisoned, 1u);
  Status vmm = pager_->EnsurePresent(*block_, unit_start, kPageSize);
  EXPECT_THAT(vmm.ToString(), HasSubstr("poisoned"));
  EXPECT_TRUE(pager_->complete());
}

TEST_P(PagingTest, EnsurePresentFetchesAndWaits) {
  if (is_zero()) GTEST_SKIP() << "the floor has no source";
  MakePager(snapshot_);
  const uint64_t offset = 3 * block_->page_size() + 100;
  ASSERT_TRUE(pager_->EnsurePresent(*block_, offset, 3 * kPageSize).ok());
  // Present now: reading does not fault.
  const uint64_t first = AlignDown(offset, block_->page_size()) / kPageSize;
  EXPECT_EQ(WrongPages(block_->host() + first * kPageSize, first, 3), 0u);
  PagingStats stats = pager_->stats();
  EXPECT_EQ(stats.faults, 0u) << stats.ToString();
  EXPECT_GT(stats.vmm_fetches, 0u);
  EXPECT_EQ(snapshot_->fetch_count(id_, first), 1u);
  EXPECT_FALSE(pager_->EnsurePresent(*block_, kBlockSize - kPageSize, 2 * kPageSize).ok());
}

TEST_P(PagingTest, PushRacingFaultsFetchesEachPageOnce) {
  if (is_zero()) GTEST_SKIP() << "the floor has no source";
  MakePager(snapshot_, {.queues_per_block = 2});
  std::jthread pusher([&] { ASSERT_TRUE(pager_->Push(*block_, 0, kBlockSize).ok()); });
  EXPECT_EQ(TouchInParallel(2), 0u);
  pusher.join();
  WaitSettled();
  EXPECT_TRUE(pager_->complete());
  EXPECT_EQ(snapshot_->refetched_pages(id_), 0u);
  EXPECT_GT(pager_->stats().pushes, 0u);
}

// The source's push, by hand: it claims the places of 8 units (fewer than
// the staging slots: a claim waits for a free one), the pager hands each
// missing unit out once, a fault on a claimed unit waits
// until the pusher fills and completes it, and the claimed units never go
// to the source.
TEST_P(PagingTest, ClaimedUnitsWaitForThePusherAndAreNotFetched) {
  if (is_zero()) GTEST_SKIP() << "the floor has no source";
  MakePager(snapshot_, {.queues_per_block = 2});
  const uint64_t unit = block_->page_size();
  const uint64_t claimed = 8 * unit;
  std::vector<PushSlot> slots = pager_->Claim(id_, 0, claimed);
  ASSERT_EQ(slots.size(), claimed / unit);
  EXPECT_TRUE(pager_->Claim(id_, 0, claimed).empty()) << "a unit is handed out twice";
  EXPECT_TRUE(pager_->Claim(id_ + 1, 0, claimed).empty()) << "a block the pager does not page";
  for (size_t i = 0; i < slots.size(); ++i) {
    EXPECT_EQ(slots[i].offset, i * unit);
    EXPECT_EQ(slots[i].dest.size(), unit);
  }
  // A fault on the first claimed unit: it waits for the pusher.
  std::atomic<bool> read{false};
  std::jthread reader([&] {
    EXPECT_EQ(WrongPages(block_->host(), 0, 1), 0u);
    read = true;
  });
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(read.load()) << "the fault did not wait for the claimed unit";
  const std::vector<uint8_t> pattern = PatternBytes(kBlockSize);
  for (PushSlot& slot : slots) {
    std::memcpy(slot.dest.data(), pattern.data() + slot.offset, slot.dest.size());
    slot.done(FetchResult::Filled());
  }
  reader.join();
  EXPECT_TRUE(read.load());
  EXPECT_EQ(TouchInParallel(2), 0u);
  WaitSettled();
  EXPECT_TRUE(pager_->complete());
  for (uint64_t page = 0; page < claimed / kPageSize; page += unit / kPageSize) {
    EXPECT_EQ(snapshot_->fetch_count(id_, page), 0u) << "claimed page " << page << " fetched";
  }
  EXPECT_EQ(pager_->stats().pushes, claimed / unit);
  pager_->Stop();
  EXPECT_TRUE(pager_->Claim(id_, 0, kBlockSize).empty()) << "claims after Stop()";
}

std::vector<Combo> AllCombos() {
  return {
      {InstallerKind::kCopy, Backing::kAnonymous}, {InstallerKind::kCopy, Backing::kMemfd},
      {InstallerKind::kCopy, Backing::kHugetlb},   {InstallerKind::kMove, Backing::kAnonymous},
      {InstallerKind::kContinue, Backing::kMemfd}, {InstallerKind::kContinue, Backing::kHugetlb},
      {InstallerKind::kZero, Backing::kAnonymous}, {InstallerKind::kZero, Backing::kMemfd},
      {InstallerKind::kZero, Backing::kHugetlb}};
}

INSTANTIATE_TEST_SUITE_P(Installers, PagingTest, ::testing::ValuesIn(AllCombos()), ComboName);

}  // namespace
}  // namespace faultline::paging
