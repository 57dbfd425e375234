// Pagemap: /proc/self/pagemap opened once, and its PAGEMAP_SCAN ioctl
// (Linux 6.7): the page table state of a range reported as runs of pages
// with PAGE_IS_* categories, optionally write-protecting the pages it
// reports in the same walk (PM_SCAN_WP_MATCHING), for memory registered
// with a userfaultfd in WP mode with UFFD_FEATURE_WP_ASYNC.
//
// Like userfaultfd.h, this header does not include the kernel's: the
// constants below are checked against linux_abi.h in pagemap.cc.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "faultline/status.h"
#include "faultline/types.h"
#include "src/sys/unique_fd.h"

namespace faultline::sys {

// PAGE_IS_* categories: masks of a PagemapScanRequest, and what a
// PageRegion reports (of return_mask).
inline constexpr uint64_t kPageIsWpAllowed = 1ull << 0;  // async write-protect enabled
inline constexpr uint64_t kPageIsWritten = 1ull << 1;    // written since write-protected
inline constexpr uint64_t kPageIsFile = 1ull << 2;
inline constexpr uint64_t kPageIsPresent = 1ull << 3;
inline constexpr uint64_t kPageIsSwapped = 1ull << 4;
inline constexpr uint64_t kPageIsPfnZero = 1ull << 5;
inline constexpr uint64_t kPageIsHuge = 1ull << 6;  // THP or hugetlb
inline constexpr uint64_t kPageIsSoftDirty = 1ull << 7;
inline constexpr uint64_t kPageIsGuard = 1ull << 8;  // Linux 6.15

// PM_SCAN_* flags.
// Write-protects the pages reported (those matching the masks; only pages
// that are written are actually changed). A page is reported and protected
// under its page table lock, so a write racing with the scan is either seen
// now or faults afterwards and shows at the next scan.
inline constexpr uint64_t kPmScanWpMatching = 1ull << 0;
// Fails with EPERM on a range not registered for async write-protect,
// instead of silently skipping it.
inline constexpr uint64_t kPmScanCheckWpAsync = 1ull << 1;

// One run of pages with the same reported categories: struct page_region.
struct PageRegion {
  Hva start;
  Hva end;  // exclusive
  uint64_t categories = 0;

  uint64_t bytes() const { return end.value - start.value; }
};

struct PagemapScanRequest {
  Hva start;           // page-aligned
  Hva end;             // rounded up to a page by the kernel
  uint64_t flags = 0;  // kPmScan*
  // A page is reported if all of category_mask and (when non-zero) any of
  // category_anyof_mask are set in its categories XOR category_inverted.
  uint64_t category_mask = 0;
  uint64_t category_anyof_mask = 0;
  uint64_t category_inverted = 0;
  // The categories reported in each PageRegion; adjacent pages whose
  // reported categories are equal share a region.
  uint64_t return_mask = 0;
  // Stop after this many pages (0: no limit). With kPmScanWpMatching the
  // kernel splits a THP that the limit cuts through, and cannot protect part
  // of a hugetlb page: leave it 0 on hugetlb.
  uint64_t max_pages = 0;
};

struct PagemapScanResult {
  size_t regions = 0;  // filled at the start of the output span
  // Where the walk stopped: the request's end (rounded up to a page) when it
  // covered everything, lower when the output span (or max_pages) filled up.
  // Pages from here on were neither reported nor write-protected: scan again
  // from walk_end. (Corrected for a kernel quirk: see Scan in pagemap.cc.)
  Hva walk_end;
};

class Pagemap {
 public:
  // Opens /proc/self/pagemap. The file describes the address space of the
  // process that opened it, also when the descriptor is inherited across
  // fork (O_CLOEXEC is set, but a forked child must open its own).
  static Result<Pagemap> Open();

  Pagemap() = default;
  Pagemap(Pagemap&&) noexcept = default;
  Pagemap& operator=(Pagemap&&) noexcept = default;
  Pagemap(const Pagemap&) = delete;
  Pagemap& operator=(const Pagemap&) = delete;

  bool valid() const { return fd_.valid(); }
  int fd() const { return fd_.get(); }

  // PAGEMAP_SCAN of [request.start, request.end) into `out`. With an empty
  // `out` and kPmScanWpMatching the kernel write-protects the range's
  // written pages without reporting them (whatever the masks). Fails with
  // ENOTTY, saying that Linux 6.7 is needed, on older kernels.
  Result<PagemapScanResult> Scan(const PagemapScanRequest& request,
                                 std::span<PageRegion> out) const;

 private:
  explicit Pagemap(UniqueFd fd) : fd_(std::move(fd)) {}
  UniqueFd fd_;
};

}  // namespace faultline::sys
