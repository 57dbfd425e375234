#include "src/sys/pagemap.h"

#include <fcntl.h>
#include <sys/ioctl.h>

#include <cerrno>
#include <cstddef>
#include <type_traits>

#include "src/sys/linux_abi.h"

namespace faultline::sys {
namespace {

static_assert(kPageIsWpAllowed == PAGE_IS_WPALLOWED);
static_assert(kPageIsWritten == PAGE_IS_WRITTEN);
static_assert(kPageIsFile == PAGE_IS_FILE);
static_assert(kPageIsPresent == PAGE_IS_PRESENT);
static_assert(kPageIsSwapped == PAGE_IS_SWAPPED);
static_assert(kPageIsPfnZero == PAGE_IS_PFNZERO);
static_assert(kPageIsHuge == PAGE_IS_HUGE);
static_assert(kPageIsSoftDirty == PAGE_IS_SOFT_DIRTY);
static_assert(kPageIsGuard == PAGE_IS_GUARD);
static_assert(kPmScanWpMatching == PM_SCAN_WP_MATCHING);
static_assert(kPmScanCheckWpAsync == PM_SCAN_CHECK_WPASYNC);

// The kernel writes struct page_region straight into the caller's span.
static_assert(sizeof(PageRegion) == sizeof(page_region));
static_assert(offsetof(PageRegion, start) == offsetof(page_region, start));
static_assert(offsetof(PageRegion, end) == offsetof(page_region, end));
static_assert(offsetof(PageRegion, categories) == offsetof(page_region, categories));
static_assert(std::is_trivially_copyable_v<PageRegion> && std::is_standard_layout_v<PageRegion>);

constexpr const char* kPath = "/proc/self/pagemap";

}  // namespace

Result<Pagemap> Pagemap::Open() {
  const int fd = ::open(kPath, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    return ErrnoError(err, "open {}", kPath);
  }
  return Pagemap(UniqueFd(fd));
}

Result<PagemapScanResult> Pagemap::Scan(const PagemapScanRequest& request,
                                        std::span<PageRegion> out) const {
  if (!valid()) return Error("PAGEMAP_SCAN: {} is not open", kPath);
  if (request.end < request.start) {
    return Error("PAGEMAP_SCAN [0x{:x}, 0x{:x}): the range ends before it starts",
                 request.start.value, request.end.value);
  }
  pm_scan_arg arg = {};
  arg.size = sizeof(arg);
  arg.flags = request.flags;
  arg.start = request.start.value;
  arg.end = request.end.value;
  arg.vec = out.empty() ? 0 : reinterpret_cast<uintptr_t>(out.data());
  arg.vec_len = out.size();
  arg.max_pages = request.max_pages;
  arg.category_inverted = request.category_inverted;
  arg.category_mask = request.category_mask;
  arg.category_anyof_mask = request.category_anyof_mask;
  arg.return_mask = request.return_mask;
  const int ret = ::ioctl(fd_.get(), PAGEMAP_SCAN, &arg);
  if (ret < 0) {
    const int err = errno;
    if (err == ENOTTY) {
      return ErrnoError(err,
                        "PAGEMAP_SCAN: not supported by this kernel (needs Linux 6.7 or later)");
    }
    if (err == EPERM && (request.flags & kPmScanCheckWpAsync) != 0) {
      return ErrnoError(err,
                        "PAGEMAP_SCAN [0x{:x}, 0x{:x}): part of the range is not registered "
                        "with a userfaultfd in WP mode with WP_ASYNC",
                        request.start.value, request.end.value);
    }
    return ErrnoError(err, "PAGEMAP_SCAN [0x{:x}, 0x{:x}) flags 0x{:x}", request.start.value,
                      request.end.value, request.flags);
  }
  if (static_cast<size_t>(ret) > out.size()) {
    return Error("PAGEMAP_SCAN [0x{:x}, 0x{:x}): the kernel reported {} regions for {} slots",
                 request.start.value, request.end.value, ret, out.size());
  }
  PagemapScanResult result{static_cast<size_t>(ret), Hva(arg.walk_end)};
  // The kernel walks with a 512-entry buffer of its own, refilled as often
  // as `out` has room, and records walk_end each time that buffer fills; a
  // walk that then goes on to the end leaves the stale value (seen on 6.18:
  // 2048 runs into 4096 slots gave a walk_end three quarters of the way).
  // The walk stops early only when `out` is full or max_pages pages were
  // reported, so when neither happened it covered the whole range.
  if (result.regions < out.size() && result.walk_end < request.end) {
    uint64_t pages = 0;
    for (const PageRegion& r : out.first(result.regions)) pages += r.bytes() / kPageSize;
    if (request.max_pages == 0 || pages < request.max_pages) {
      result.walk_end = Hva(AlignUp(request.end.value, kPageSize));
    }
  }
  return result;
}

}  // namespace faultline::sys
