#include "src/memory/uffd_wp_tracker.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/sys/memfd.h"
#include "src/sys/userfaultfd.h"

namespace faultline {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kGiB = 1ull << 30;
constexpr uint64_t kSmall = 4096;                           // the bitmap's page
constexpr uint64_t kSmallPerHuge = kHugePageSize / kSmall;  // 512

// Makes `pages` 2 MiB huge pages available for the scope: raises
// /proc/sys/vm/nr_hugepages by the shortfall only (nothing if the pool has
// enough), and lowers it by the same amount afterwards (not back to a saved
// value, which would undo a reservation another process made meanwhile).
class HugePageReservation {
 public:
  explicit HugePageReservation(uint64_t pages) {
    auto pool = sys::ReadHugePagePool();
    if (!pool.has_value()) {
      reason_ = pool.error().ToString();
      return;
    }
    if (pool->available() >= pages) return;
    const uint64_t before = Read();
    if (!Write(before + pages - pool->available())) {
      reason_ = fmt::format("cannot write {} (not root?)", kPath);
      return;
    }
    const uint64_t after = Read();
    raised_ = after > before ? after - before : 0;
    pool = sys::ReadHugePagePool();
    if (!pool.has_value() || pool->available() < pages) {
      reason_ = fmt::format("the kernel gave {} of the {} 2 MiB huge pages asked for (fragmented?)",
                            pool.has_value() ? pool->available() : 0, pages);
    }
  }
  ~HugePageReservation() {
    if (raised_ == 0) return;
    const uint64_t now = Read();
    Write(now > raised_ ? now - raised_ : 0);
  }
  HugePageReservation(const HugePageReservation&) = delete;
  HugePageReservation& operator=(const HugePageReservation&) = delete;

  // Empty when the pages are available; otherwise why not.
  const std::string& reason() const { return reason_; }

 private:
  static constexpr const char* kPath = "/proc/sys/vm/nr_hugepages";
  static uint64_t Read() {
    std::ifstream in(kPath);
    uint64_t n = 0;
    in >> n;
    return n;
  }
  static bool Write(uint64_t n) {
    std::ofstream out(kPath);
    out << n << '\n';
    out.flush();
    return out.good();
  }
  uint64_t raised_ = 0;
  std::string reason_;
};

void WritePage(const RamBlock& block, uint64_t page, uint8_t value) {
  // volatile: the stores are what is under test, not their values.
  reinterpret_cast<volatile uint8_t*>(block.host())[page * kSmall + (page % 61) * 64] = value;
}

uint8_t ReadPage(const RamBlock& block, uint64_t page) {
  return reinterpret_cast<const volatile uint8_t*>(block.host())[page * kSmall + 8];
}

// What a harvest must report after writes to `pages`: on hugetlb, every 4 KiB
// page of each huge page written.
DirtyBitmap Expected(const RamBlock& block, const std::vector<uint64_t>& pages) {
  DirtyBitmap bits(block.size() / kSmall);
  const uint64_t unit = block.page_size() / kSmall;
  for (uint64_t p : pages) bits.SetRange(p / unit * unit, unit);
  return bits;
}

// `n` distinct random pages of `total`, sorted.
std::vector<uint64_t> RandomPages(std::mt19937_64& rng, uint64_t total, uint64_t n) {
  DirtyBitmap chosen(total);
  while (chosen.Count() < n) chosen.Set(rng() % total);
  std::vector<uint64_t> pages;
  chosen.ForEachSet([&](uint64_t p) { pages.push_back(p); });
  return pages;
}

std::string Describe(const DirtyBitmap& got, const DirtyBitmap& want) {
  std::string out = fmt::format("got {} pages, want {}", got.Count(), want.Count());
  int shown = 0;
  for (uint64_t p = 0; p < want.pages() && shown < 8; ++p) {
    if (got.Test(p) != want.Test(p)) {
      out += fmt::format("; page {} {}", p, got.Test(p) ? "extra" : "missing");
      ++shown;
    }
  }
  return out;
}

struct Config {
  Backing backing;
  size_t regions_per_scan;
};

std::string ConfigName(const testing::TestParamInfo<Config>& info) {
  return fmt::format("{}_{}regions", BackingName(info.param.backing), info.param.regions_per_scan);
}

class UffdWpTrackerTest : public testing::TestWithParam<Config> {
 protected:
  // Creates the block (reserving huge pages if needed) and the tracker;
  // false (with GTEST_SKIP or a failure recorded) if either cannot be had.
  bool SetUpBlock(uint64_t size) {
    const Config config = GetParam();
    if (config.backing == Backing::kHugetlb) {
      reservation_ = std::make_unique<HugePageReservation>(size / kHugePageSize);
      if (!reservation_->reason().empty()) {
        fmt::print("skipped: hugetlb block of {} MiB: {}\n", size / kMiB, reservation_->reason());
        return false;
      }
    }
    auto block = RamBlock::Create({.name = "wp", .size = size, .backing = config.backing});
    if (!block.has_value()) {
      ADD_FAILURE() << block.error().ToString();
      return false;
    }
    block_ = *block;
    auto tracker = UffdWpTracker::Create({.regions_per_scan = config.regions_per_scan});
    if (!tracker.has_value()) {
      ADD_FAILURE() << tracker.error().ToString();
      return false;
    }
    tracker_ = std::move(*tracker);
    return true;
  }

  DirtyBitmap Harvest() {
    DirtyBitmap bits(block_->size() / kSmall);
    Status s = tracker_->Harvest(*block_, bits);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return bits;
  }

  // Destroyed in reverse: tracker (unregisters), block, then the huge pages.
  std::unique_ptr<HugePageReservation> reservation_;
  std::shared_ptr<RamBlock> block_;
  std::unique_ptr<UffdWpTracker> tracker_;
};

#define SET_UP_BLOCK_OR_RETURN(size)                                         \
  do {                                                                       \
    if (!SetUpBlock(size)) {                                                 \
      if (!HasFailure()) GTEST_SKIP() << "huge pages could not be reserved"; \
      return;                                                                \
    }                                                                        \
  } while (0)

TEST_P(UffdWpTrackerTest, HarvestIsExactAndReprotects) {
  SET_UP_BLOCK_OR_RETURN(64 * kMiB);
  const uint64_t pages = block_->size() / kSmall;
  // On hugetlb one write dirties 512 bits: write fewer pages there, so that
  // the written huge pages stay scattered (several runs, partial walks).
  const bool huge = block_->page_size() > kSmall;
  auto n = [&](uint64_t count) { return huge ? std::max<uint64_t>(1, count / 200) : count; };
  std::mt19937_64 rng(1234);
  // Pages touched before tracking starts, half by writing, half by reading:
  // neither is reported unless written again.
  const std::vector<uint64_t> before = RandomPages(rng, pages, n(3000));
  for (size_t i = 0; i < before.size(); ++i) {
    if (i % 2 == 0) {
      WritePage(*block_, before[i], 1);
    } else {
      (void)ReadPage(*block_, before[i]);
    }
  }
  ASSERT_TRUE(tracker_->Track(block_).ok());
  EXPECT_TRUE(tracker_->tracking(*block_));

  // Written after Track: never-touched pages and some touched before.
  std::vector<uint64_t> written = RandomPages(rng, pages, n(2000));
  written.insert(written.end(), before.begin(), before.begin() + n(200));
  for (uint64_t p : written) WritePage(*block_, p, 2);
  // Reads are not writes, whether of never-touched or written pages.
  for (uint64_t p : RandomPages(rng, pages, n(500))) (void)ReadPage(*block_, p);

  const DirtyBitmap want = Expected(*block_, written);
  DirtyBitmap got = Harvest();
  EXPECT_EQ(got, want) << Describe(got, want);
  EXPECT_EQ(tracker_->stats().last_pages, want.Count());
  if (GetParam().regions_per_scan < 16) {
    EXPECT_GT(tracker_->stats().last_scans, 1u) << "the walk was expected to be partial";
  }

  // Nothing written since: nothing to report.
  DirtyBitmap again = Harvest();
  EXPECT_TRUE(again.Empty()) << again.Count() << " pages reported without writes";

  // Writes after a harvest are found by the next, including pages reported
  // before (they were protected again).
  std::vector<uint64_t> later = RandomPages(rng, pages, n(700));
  later.insert(later.end(), written.begin(), written.begin() + n(300));
  for (uint64_t p : later) WritePage(*block_, p, 3);
  const DirtyBitmap want_later = Expected(*block_, later);
  DirtyBitmap got_later = Harvest();
  EXPECT_EQ(got_later, want_later) << Describe(got_later, want_later);

  // Harvest ORs into the bitmap.
  DirtyBitmap merged = want;
  WritePage(*block_, 0, 4);
  ASSERT_TRUE(tracker_->Harvest(*block_, merged).ok());
  EXPECT_TRUE(merged.Test(0));
  EXPECT_EQ(merged.Count(), (want.Test(0) ? 0 : block_->page_size() / kSmall) + want.Count());

  ASSERT_TRUE(tracker_->Untrack(*block_).ok());
  EXPECT_FALSE(tracker_->tracking(*block_));
  // Unregistering removed the protection: writes now fault no more, and
  // tracking again starts from a clean slate.
  WritePage(*block_, 5, 5);
  ASSERT_TRUE(tracker_->Track(block_).ok());
  EXPECT_TRUE(Harvest().Empty());
}

TEST_P(UffdWpTrackerTest, WholeBlockWrittenIsOneRun) {
  SET_UP_BLOCK_OR_RETURN(8 * kMiB);
  ASSERT_TRUE(tracker_->Track(block_).ok());
  std::memset(block_->host(), 0x11, block_->size());
  DirtyBitmap got = Harvest();
  EXPECT_EQ(got.Count(), got.pages());
  EXPECT_TRUE(Harvest().Empty());
}

// A writer thread writes a long random sequence of pages (with repeats)
// while this thread harvests in a loop. Every write that started after
// harvest k-1 returned and completed before harvest k began must be in
// harvest k, and the union of all harvests is exactly the pages written.
TEST_P(UffdWpTrackerTest, ConcurrentWritesAreNeverLost) {
  SET_UP_BLOCK_OR_RETURN(32 * kMiB);
  ASSERT_TRUE(tracker_->Track(block_).ok());
  const uint64_t pages = block_->size() / kSmall;
  std::mt19937_64 rng(99);
  std::vector<uint64_t> sequence(300'000);
  // Concentrated on a few hot pages, so pages get re-dirtied after being
  // harvested, plus a tail of cold ones.
  const std::vector<uint64_t> hot = RandomPages(rng, pages, 64);
  for (uint64_t& p : sequence) p = (rng() % 4 != 0) ? hot[rng() % hot.size()] : rng() % pages;
  const uint64_t unit = block_->page_size() / kSmall;

  std::atomic<uint64_t> completed{0};
  std::jthread writer([&] {
    for (size_t i = 0; i < sequence.size(); ++i) {
      WritePage(*block_, sequence[i], static_cast<uint8_t>(i));
      completed.store(i + 1, std::memory_order_release);
    }
  });

  DirtyBitmap all(pages);
  uint64_t after_previous = 0;  // writes completed when the previous harvest returned
  uint64_t harvests = 0;
  uint64_t lost = 0;
  while (true) {
    const uint64_t before = completed.load(std::memory_order_acquire);
    DirtyBitmap got = Harvest();
    const uint64_t after = completed.load(std::memory_order_acquire);
    ++harvests;
    // Write number `after_previous` may have been under way during the
    // previous harvest; the ones after it started later.
    for (uint64_t i = after_previous + 1; i < before; ++i) {
      if (!got.Test(sequence[i] / unit * unit)) ++lost;
    }
    all.Merge(got);
    after_previous = after;
    if (before == sequence.size()) break;
  }
  writer.join();
  EXPECT_EQ(lost, 0u) << "writes missing from the harvest that followed them";
  const DirtyBitmap want = Expected(*block_, sequence);
  EXPECT_EQ(all, want) << Describe(all, want);
  EXPECT_GT(harvests, 2u);
  fmt::print("{} harvests during {} writes\n", harvests, sequence.size());
}

// A large block with a few thousand scattered written pages.
TEST_P(UffdWpTrackerTest, GiBWithThousandsOfPages) {
  if (GetParam().regions_per_scan < 16 && GetParam().backing != Backing::kAnonymous) {
    GTEST_SKIP() << "covered by the anon run with few regions";
  }
  SET_UP_BLOCK_OR_RETURN(kGiB);
  ASSERT_TRUE(tracker_->Track(block_).ok());
  const uint64_t pages = block_->size() / kSmall;
  std::mt19937_64 rng(7);
  const std::vector<uint64_t> written = RandomPages(rng, pages, 5000);
  for (uint64_t p : written) WritePage(*block_, p, 9);
  const DirtyBitmap want = Expected(*block_, written);
  DirtyBitmap got = Harvest();
  EXPECT_EQ(got, want) << Describe(got, want);
  const UffdWpHarvestStats stats = tracker_->stats();
  EXPECT_TRUE(Harvest().Empty());
  fmt::print("{}: {} pages in {} scans, {:.2f} ms; clean harvest {:.2f} ms\n",
             BackingName(block_->backing()), stats.last_pages, stats.last_scans,
             stats.last_ns / 1e6, tracker_->stats().last_ns / 1e6);
}

// The kernel's own writes into the block (read(2) copying to it) are
// tracked like the process's.
TEST_P(UffdWpTrackerTest, KernelWritesAreTracked) {
  SET_UP_BLOCK_OR_RETURN(4 * kMiB);
  ASSERT_TRUE(tracker_->Track(block_).ok());
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const char data[] = "written by the kernel";
  ASSERT_EQ(::write(fds[1], data, sizeof(data)), static_cast<ssize_t>(sizeof(data)));
  const uint64_t page = block_->size() / kSmall - 1;
  ASSERT_EQ(::read(fds[0], block_->host() + page * kSmall, sizeof(data)),
            static_cast<ssize_t>(sizeof(data)));
  ::close(fds[0]);
  ::close(fds[1]);
  DirtyBitmap got = Harvest();
  EXPECT_EQ(got, Expected(*block_, {page})) << Describe(got, Expected(*block_, {page}));
}

// Discarding is not writing, but it changes the page (to zeros), and the
// kernel reports it unevenly: an emptied page table entry counts as written
// for 4 KiB pages (the PAGEMAP_SCAN fast path) but not for a hugetlb page,
// and anonymous memory loses its write-protect marker with the page while
// memfd/hugetlb keep it. So: anon reports every discarded page; memfd those
// written since the last harvest; hugetlb none. Pins what Linux 6.18 does,
// which the header tells callers (who must record discards themselves).
TEST_P(UffdWpTrackerTest, DiscardedPages) {
  SET_UP_BLOCK_OR_RETURN(8 * kMiB);
  std::memset(block_->host(), 1, block_->size());
  ASSERT_TRUE(tracker_->Track(block_).ok());
  const uint64_t unit = block_->page_size() / kSmall;
  const uint64_t written = 1 * unit;    // written, then discarded
  const uint64_t discarded = 3 * unit;  // only discarded
  WritePage(*block_, written, 2);
  ASSERT_TRUE(block_->Discard(written * kSmall, block_->page_size()).ok());
  ASSERT_TRUE(block_->Discard(discarded * kSmall, block_->page_size()).ok());
  DirtyBitmap got = Harvest();
  std::vector<uint64_t> reported;
  switch (block_->backing()) {
    case Backing::kAnonymous:
      reported = {written, discarded};
      break;
    case Backing::kMemfd:
      reported = {written};
      break;
    default:
      break;
  }
  const DirtyBitmap want = Expected(*block_, reported);
  EXPECT_EQ(got, want) << Describe(got, want);
  EXPECT_TRUE(Harvest().Empty());
  // Either way a write to a discarded page shows.
  WritePage(*block_, written, 3);
  WritePage(*block_, discarded, 3);
  got = Harvest();
  EXPECT_EQ(got, Expected(*block_, {written, discarded}))
      << Describe(got, Expected(*block_, {written, discarded}));
}

INSTANTIATE_TEST_SUITE_P(Backings, UffdWpTrackerTest,
                         testing::Values(Config{Backing::kAnonymous, 4096},
                                         Config{Backing::kAnonymous, 3},
                                         Config{Backing::kMemfd, 4096}, Config{Backing::kMemfd, 3},
                                         Config{Backing::kHugetlb, 4096},
                                         Config{Backing::kHugetlb, 2}),
                         ConfigName);

std::shared_ptr<RamBlock> MustCreate(const RamBlockOptions& options) {
  auto block = RamBlock::Create(options);
  EXPECT_TRUE(block.has_value()) << block.status().ToString();
  return block.has_value() ? *block : nullptr;
}

std::unique_ptr<UffdWpTracker> MustCreateTracker() {
  auto tracker = UffdWpTracker::Create();
  EXPECT_TRUE(tracker.has_value()) << tracker.status().ToString();
  return tracker.has_value() ? std::move(*tracker) : nullptr;
}

// A write into a write-protected transparent huge page makes the kernel
// split it: only the 4 KiB page written is reported. (Without THP the
// memory is in 4 KiB pages anyway and the result is the same.)
TEST(UffdWpTrackerThpTest, WriteIntoAHugePageReportsThatPage) {
  auto block = MustCreate({.name = "thp",
                           .size = 16 * kMiB,
                           .backing = Backing::kAnonymous,
                           .transparent_huge_pages = true});
  ASSERT_NE(block, nullptr);
  std::memset(block->host(), 1, block->size());  // THPs where the kernel can
  auto tracker = MustCreateTracker();
  ASSERT_NE(tracker, nullptr);
  ASSERT_TRUE(tracker->Track(block).ok());
  const uint64_t page = 4 * kSmallPerHuge + 3;
  WritePage(*block, page, 2);
  DirtyBitmap bits(block->size() / kSmall);
  ASSERT_TRUE(tracker->Harvest(*block, bits).ok());
  EXPECT_EQ(bits, Expected(*block, {page})) << Describe(bits, Expected(*block, {page}));
}

// Tracking is per mapping: writes through a memfd block's alias() (where
// the VMM installs received pages) are not seen; writes through host() are.
TEST(UffdWpTrackerAliasTest, AliasWritesAreNotTracked) {
  auto block = MustCreate({.name = "shm", .size = 2 * kMiB, .backing = Backing::kMemfd});
  ASSERT_NE(block, nullptr);
  auto tracker = MustCreateTracker();
  ASSERT_NE(tracker, nullptr);
  ASSERT_TRUE(tracker->Track(block).ok());
  (void)ReadPage(*block, 6);  // mapped in host() too
  block->alias()[5 * kSmall] = 1;
  block->alias()[6 * kSmall] = 1;
  DirtyBitmap bits(block->size() / kSmall);
  ASSERT_TRUE(tracker->Harvest(*block, bits).ok());
  EXPECT_TRUE(bits.Empty()) << bits.Count() << " pages";
  EXPECT_EQ(block->host()[6 * kSmall], 1) << "the same memory, seen through host()";
  WritePage(*block, 5, 2);
  ASSERT_TRUE(tracker->Harvest(*block, bits).ok());
  EXPECT_EQ(bits, Expected(*block, {5}));
}

TEST(UffdWpTrackerMisuseTest, ErrorsSayWhatIsWrong) {
  auto tracker = MustCreateTracker();
  ASSERT_NE(tracker, nullptr);
  auto block = MustCreate({.name = "ram0", .size = 1 * kMiB});
  ASSERT_NE(block, nullptr);
  DirtyBitmap bits(block->size() / kSmall);

  Status s = tracker->Harvest(*block, bits);
  EXPECT_THAT(s.ToString(), HasSubstr("'ram0', which is not tracked"));
  EXPECT_THAT(tracker->Untrack(*block).ToString(), HasSubstr("'ram0' is not tracked"));
  EXPECT_THAT(tracker->Track(nullptr).ToString(), HasSubstr("nullptr"));

  ASSERT_TRUE(tracker->Track(block).ok());
  EXPECT_THAT(tracker->Track(block).ToString(), HasSubstr("'ram0' (anon): already tracked"));
  DirtyBitmap wrong(block->size() / kSmall - 1);
  EXPECT_THAT(tracker->Harvest(*block, wrong).ToString(), HasSubstr("(needs 256)"));
  EXPECT_TRUE(tracker->Harvest(*block, bits).ok());
}

// guest_memfd memory cannot be registered with a userfaultfd: refused up
// front, before any system call.
TEST(UffdWpTrackerMisuseTest, RefusesGuestMemfd) {
  class FakeGmem final : public RamBlock {
   public:
    FakeGmem() : RamBlock("gmem0", Backing::kGuestMemfd, 1 * kMiB, kSmall) {}
    int fd() const override { return -1; }
    Status Discard(uint64_t, uint64_t) override { return Status::Ok(); }
  };
  auto tracker = MustCreateTracker();
  ASSERT_NE(tracker, nullptr);
  const std::string error = tracker->Track(std::make_shared<FakeGmem>()).ToString();
  EXPECT_THAT(error, HasSubstr("'gmem0' (gmem)"));
  EXPECT_THAT(error, HasSubstr("guest_memfd memory cannot be registered with userfaultfd"));
}

// A range registered with one userfaultfd cannot be registered with another.
TEST(UffdWpTrackerMisuseTest, RangeOfAnotherUserfaultfdIsBusy) {
  auto block = MustCreate({.name = "paged", .size = 1 * kMiB});
  ASSERT_NE(block, nullptr);
  auto pager = sys::Userfaultfd::Create(O_NONBLOCK, 0);
  ASSERT_TRUE(pager.has_value()) << pager.status().ToString();
  auto registration = pager->Register(Hva(block->host()), block->size(), sys::UffdMode::kMissing);
  ASSERT_TRUE(registration.has_value()) << registration.status().ToString();

  auto tracker = MustCreateTracker();
  ASSERT_NE(tracker, nullptr);
  Status s = tracker->Track(block);
  EXPECT_EQ(s.code(), EBUSY) << s.ToString();
  EXPECT_THAT(s.ToString(), HasSubstr("already registered with another userfaultfd"));
  EXPECT_FALSE(tracker->tracking(*block));

  // Once the other registration is gone the block can be tracked.
  ASSERT_TRUE(registration->Unregister().ok());
  EXPECT_TRUE(tracker->Track(block).ok());
}

// Two blocks with one tracker: harvesting one does not consume the other's
// writes; destroying the tracker unregisters both.
TEST(UffdWpTrackerMisuseTest, BlocksAreIndependent) {
  auto a = MustCreate({.name = "a", .size = 2 * kMiB});
  auto b = MustCreate({.name = "b", .size = 2 * kMiB, .backing = Backing::kMemfd});
  ASSERT_TRUE(a != nullptr && b != nullptr);
  {
    auto tracker = MustCreateTracker();
    ASSERT_NE(tracker, nullptr);
    ASSERT_TRUE(tracker->Track(a).ok());
    ASSERT_TRUE(tracker->Track(b).ok());
    WritePage(*a, 3, 1);
    WritePage(*b, 4, 1);
    DirtyBitmap bits_a(a->size() / kSmall);
    DirtyBitmap bits_b(b->size() / kSmall);
    ASSERT_TRUE(tracker->Harvest(*a, bits_a).ok());
    ASSERT_TRUE(tracker->Harvest(*b, bits_b).ok());
    EXPECT_EQ(bits_a, Expected(*a, {3}));
    EXPECT_EQ(bits_b, Expected(*b, {4}));
    EXPECT_EQ(tracker->stats().harvests, 2u);
    EXPECT_EQ(tracker->stats().pages, 2u);
  }
  // Unregistered: another userfaultfd may take the ranges now.
  auto other = sys::Userfaultfd::Create(O_NONBLOCK, 0);
  ASSERT_TRUE(other.has_value());
  EXPECT_TRUE(other->Register(Hva(a->host()), a->size(), sys::UffdMode::kMissing).has_value());
  EXPECT_TRUE(other->Register(Hva(b->host()), b->size(), sys::UffdMode::kMissing).has_value());
}

}  // namespace
}  // namespace faultline
