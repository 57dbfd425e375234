#include "src/sys/pagemap.h"

#include <fcntl.h>

#include <array>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/sys/mapping.h"
#include "src/sys/userfaultfd.h"

namespace faultline::sys {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kPage = kPageSize;

Pagemap MustOpen() {
  auto pagemap = Pagemap::Open();
  EXPECT_TRUE(pagemap.has_value()) << pagemap.status().ToString();
  return pagemap.has_value() ? std::move(*pagemap) : Pagemap();
}

Mapping MustMap(uint64_t pages) {
  auto map = Mapping::Anonymous(pages * kPage, "pagemap test");
  EXPECT_TRUE(map.has_value()) << map.status().ToString();
  return map.has_value() ? std::move(*map) : Mapping();
}

// [first, end) in pages of `map`, for comparing regions.
struct PageRun {
  uint64_t first;
  uint64_t end;
  friend bool operator==(const PageRun&, const PageRun&) = default;
};

std::vector<PageRun> Runs(const Mapping& map, std::span<const PageRegion> regions) {
  std::vector<PageRun> runs;
  for (const PageRegion& r : regions) {
    runs.push_back(
        {(r.start.value - map.hva().value) / kPage, (r.end.value - map.hva().value) / kPage});
  }
  return runs;
}

// Present pages come back as maximal runs; a full output span stops the walk
// at the start of the first run it could not report, and a scan from there
// reports the rest.
TEST(PagemapTest, PresentPagesAsRunsAndPartialWalks) {
  Pagemap pagemap = MustOpen();
  Mapping map = MustMap(64);
  for (uint64_t p : {1, 2, 3, 10, 40, 41, 42, 43, 63}) map.data()[p * kPage] = 1;

  PagemapScanRequest request;
  request.start = map.hva();
  request.end = map.hva() + map.size();
  request.category_mask = kPageIsPresent;
  request.return_mask = kPageIsPresent;
  std::array<PageRegion, 8> all;
  auto scan = pagemap.Scan(request, all);
  ASSERT_TRUE(scan.has_value()) << scan.status().ToString();
  EXPECT_EQ(scan->walk_end, request.end);
  EXPECT_EQ(Runs(map, std::span(all).first(scan->regions)),
            (std::vector<PageRun>{{1, 4}, {10, 11}, {40, 44}, {63, 64}}));
  for (size_t i = 0; i < scan->regions; ++i) EXPECT_EQ(all[i].categories, kPageIsPresent);

  std::array<PageRegion, 2> two;
  scan = pagemap.Scan(request, two);
  ASSERT_TRUE(scan.has_value()) << scan.status().ToString();
  EXPECT_EQ(scan->regions, 2u);
  EXPECT_EQ(scan->walk_end, map.hva() + 40 * kPage);
  request.start = scan->walk_end;
  scan = pagemap.Scan(request, two);
  ASSERT_TRUE(scan.has_value()) << scan.status().ToString();
  EXPECT_EQ(scan->walk_end, request.end);
  EXPECT_EQ(Runs(map, std::span(two).first(scan->regions)),
            (std::vector<PageRun>{{40, 44}, {63, 64}}));

  // max_pages stops the walk too, in the middle of a run.
  request.start = map.hva();
  request.max_pages = 5;
  scan = pagemap.Scan(request, all);
  ASSERT_TRUE(scan.has_value()) << scan.status().ToString();
  EXPECT_EQ(Runs(map, std::span(all).first(scan->regions)),
            (std::vector<PageRun>{{1, 4}, {10, 11}, {40, 41}}));
  EXPECT_EQ(scan->walk_end, map.hva() + 41 * kPage);
}

// More runs than the kernel's own 512-entry buffer: into a span with room
// for all of them one call reports them all and says the walk is complete;
// into a span they fill exactly, a scan continued from walk_end misses none.
TEST(PagemapTest, MoreRunsThanTheKernelBuffers) {
  Pagemap pagemap = MustOpen();
  constexpr uint64_t kPages = 16384;
  constexpr uint64_t kRuns = kPages / 8;
  Mapping map = MustMap(kPages);
  for (uint64_t p = 0; p < kPages; p += 8) map.data()[p * kPage] = 1;
  PagemapScanRequest request{.start = map.hva(),
                             .end = map.hva() + map.size(),
                             .category_mask = kPageIsPresent,
                             .return_mask = kPageIsPresent};
  std::vector<PageRegion> out(2 * kRuns);
  auto scan = pagemap.Scan(request, out);
  ASSERT_TRUE(scan.has_value()) << scan.status().ToString();
  EXPECT_EQ(scan->regions, kRuns);
  EXPECT_EQ(scan->walk_end, request.end);

  std::vector<uint64_t> seen(kPages);
  out.resize(kRuns);
  while (true) {
    scan = pagemap.Scan(request, out);
    ASSERT_TRUE(scan.has_value()) << scan.status().ToString();
    for (const PageRun& run : Runs(map, std::span(out).first(scan->regions))) {
      for (uint64_t p = run.first; p < run.end; ++p) seen[p]++;
    }
    ASSERT_LE(scan->walk_end, request.end);
    ASSERT_GT(scan->walk_end, request.start);
    if (scan->walk_end == request.end) break;
    request.start = scan->walk_end;
  }
  for (uint64_t p = 0; p < kPages; ++p) {
    ASSERT_EQ(seen[p] > 0, p % 8 == 0) << "page " << p;
  }
}

TEST(PagemapTest, EmptyRangeAndBadArguments) {
  Pagemap pagemap = MustOpen();
  auto empty = pagemap.Scan({}, {});
  ASSERT_TRUE(empty.has_value()) << empty.status().ToString();
  EXPECT_EQ(empty->regions, 0u);

  Mapping map = MustMap(4);
  std::array<PageRegion, 4> out;
  PagemapScanRequest unaligned{.start = map.hva() + 1, .end = map.hva() + map.size()};
  auto scan = pagemap.Scan(unaligned, out);
  ASSERT_FALSE(scan.has_value());
  EXPECT_EQ(scan.error().code(), EINVAL);

  PagemapScanRequest backwards{.start = map.hva() + kPage, .end = map.hva()};
  scan = pagemap.Scan(backwards, out);
  ASSERT_FALSE(scan.has_value());
  EXPECT_THAT(scan.error().ToString(), HasSubstr("ends before it starts"));

  PagemapScanRequest unknown{.start = map.hva(), .end = map.hva() + map.size(), .flags = 1 << 7};
  scan = pagemap.Scan(unknown, out);
  ASSERT_FALSE(scan.has_value());
  EXPECT_EQ(scan.error().code(), EINVAL);

  EXPECT_THAT(Pagemap().Scan({}, {}).error().ToString(), HasSubstr("not open"));
}

TEST(PagemapTest, CheckWpAsyncRefusesUnregisteredMemory) {
  Pagemap pagemap = MustOpen();
  Mapping map = MustMap(4);
  std::array<PageRegion, 4> out;
  PagemapScanRequest request{.start = map.hva(),
                             .end = map.hva() + map.size(),
                             .flags = kPmScanWpMatching | kPmScanCheckWpAsync,
                             .category_mask = kPageIsWritten,
                             .return_mask = kPageIsWritten};
  auto scan = pagemap.Scan(request, out);
  ASSERT_FALSE(scan.has_value());
  EXPECT_EQ(scan.error().code(), EPERM);
  EXPECT_THAT(scan.error().ToString(), HasSubstr("not registered with a userfaultfd in WP mode"));
}

// The raw mechanism the dirty tracker is built on: async write-protect,
// then scans that report written pages and protect them again.
TEST(PagemapTest, WpMatchingReportsAndReprotectsWrittenPages) {
  Pagemap pagemap = MustOpen();
  Mapping map = MustMap(32);
  auto uffd = Userfaultfd::Create(O_NONBLOCK, kUffdFeatureWpAsync | kUffdFeatureWpUnpopulated);
  ASSERT_TRUE(uffd.has_value()) << uffd.status().ToString();
  map.data()[5 * kPage] = 1;  // populated before protection
  auto registration = uffd->Register(map.hva(), map.size(), UffdMode::kWriteProtect);
  ASSERT_TRUE(registration.has_value()) << registration.status().ToString();
  ASSERT_TRUE(uffd->WriteProtect(map.hva(), map.size(), true).ok());

  PagemapScanRequest request{.start = map.hva(),
                             .end = map.hva() + map.size(),
                             .flags = kPmScanWpMatching | kPmScanCheckWpAsync,
                             .category_mask = kPageIsWritten,
                             .return_mask = kPageIsWritten};
  std::array<PageRegion, 8> out;
  auto scan = pagemap.Scan(request, out);
  ASSERT_TRUE(scan.has_value()) << scan.status().ToString();
  EXPECT_EQ(scan->regions, 0u) << "nothing written since the protection";

  for (uint64_t p : {5, 6, 7, 20}) map.data()[p * kPage] = 2;  // no fault reaches the uffd
  scan = pagemap.Scan(request, out);
  ASSERT_TRUE(scan.has_value()) << scan.status().ToString();
  EXPECT_EQ(Runs(map, std::span(out).first(scan->regions)),
            (std::vector<PageRun>{{5, 8}, {20, 21}}));
  EXPECT_EQ(out[0].categories, kPageIsWritten);

  scan = pagemap.Scan(request, out);
  ASSERT_TRUE(scan.has_value()) << scan.status().ToString();
  EXPECT_EQ(scan->regions, 0u) << "the first scan protected them again";

  // Without WP_MATCHING the report leaves the pages written.
  map.data()[9 * kPage] = 3;
  request.flags = kPmScanCheckWpAsync;
  for (int i = 0; i < 2; ++i) {
    scan = pagemap.Scan(request, out);
    ASSERT_TRUE(scan.has_value()) << scan.status().ToString();
    EXPECT_EQ(Runs(map, std::span(out).first(scan->regions)), (std::vector<PageRun>{{9, 10}}));
  }
  // Nothing was ever read from the userfaultfd: async faults never queue.
  std::array<UffdMessage, 1> msg;
  EXPECT_EQ(uffd->ReadEvents(msg).value_or(1), 0u);
}

}  // namespace
}  // namespace faultline::sys
