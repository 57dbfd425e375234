#include "src/memory/uffd_wp_tracker.h"

#include <fcntl.h>

#include <cerrno>
#include <chrono>
#include <utility>

namespace faultline {
namespace {

constexpr uint64_t kDirtyPage = 4096;  // the bitmap's unit, whatever the block's page size

// WP_HUGETLBFS_SHMEM lets memfd and hugetlb blocks be registered in WP mode;
// WP_ASYNC implies WP_UNPOPULATED, named for the error message.
constexpr uint64_t kFeatures =
    sys::kUffdFeatureWpAsync | sys::kUffdFeatureWpUnpopulated | sys::kUffdFeatureWpHugetlbfsShmem;

constexpr const char* kNeedsKernel =
    "dirty tracking by userfaultfd write-protect needs Linux 6.7 or later (userfaultfd "
    "WP_ASYNC and the PAGEMAP_SCAN ioctl) — use KVM's dirty log instead";

uint64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

Result<std::unique_ptr<UffdWpTracker>> UffdWpTracker::Create(const Options& options) {
  if (options.regions_per_scan == 0) return Error("uffd-wp tracker: regions_per_scan is 0");
  // User-mode-only is enough: async write-protect faults are resolved by the
  // kernel without ever reaching the userfaultfd, from user or kernel mode
  // alike, and the flag lets an unprivileged process have a userfaultfd.
  auto uffd = sys::Userfaultfd::Create(O_NONBLOCK | sys::kUffdUserModeOnly, kFeatures);
  if (!uffd.has_value()) {
    if (uffd.error().code() == EINVAL) return uffd.error().WithContext(kNeedsKernel);
    return uffd.error().WithContext("uffd-wp tracker");
  }
  ASSIGN_OR_RETURN(sys::Pagemap pagemap, sys::Pagemap::Open());
  // An empty scan: fails only where the ioctl does not exist.
  auto probe = pagemap.Scan({}, {});
  if (!probe.has_value()) {
    if (probe.error().code() == ENOTTY) return probe.error().WithContext(kNeedsKernel);
    return probe.error().WithContext("uffd-wp tracker");
  }
  return std::unique_ptr<UffdWpTracker>(
      new UffdWpTracker(std::move(*uffd), std::move(pagemap), options));
}

UffdWpTracker::UffdWpTracker(sys::Userfaultfd uffd, sys::Pagemap pagemap, const Options& options)
    : uffd_(std::move(uffd)), pagemap_(std::move(pagemap)), regions_(options.regions_per_scan) {}

UffdWpTracker::~UffdWpTracker() = default;

Status UffdWpTracker::Track(std::shared_ptr<RamBlock> block) {
  if (block == nullptr) return Error("uffd-wp: Track(nullptr)");
  const std::string what =
      fmt::format("uffd-wp: RAM block '{}' ({})", block->name(), BackingName(block->backing()));
  if (block->backing() == Backing::kGuestMemfd) {
    return Error(
        "{}: guest_memfd memory cannot be registered with userfaultfd, so writes to it cannot be "
        "tracked — use KVM's dirty log, or treat the whole block as dirty",
        what);
  }
  if (!IsAligned(block->size(), kDirtyPage)) {
    return Error("{}: size 0x{:x} is not a multiple of 4 KiB", what, block->size());
  }
  sys::MutexLock lock(mu_);
  if (tracked_.contains(block.get())) return Error("{}: already tracked", what);

  const Hva start(block->host());
  auto registration = uffd_.Register(start, block->size(), sys::UffdMode::kWriteProtect);
  if (!registration.has_value()) {
    if (registration.error().code() == EBUSY) {
      return registration.error().WithContext(fmt::format(
          "{}: its memory is already registered with another userfaultfd (a demand pager or "
          "another tracker); the kernel allows one per range — stop that one first",
          what));
    }
    return registration.error().WithContext(what);
  }
  if (!registration->Allows(sys::UffdIoctl::kWriteProtect)) {
    return Error("{}: the kernel does not offer UFFDIO_WRITEPROTECT on this memory", what);
  }
  // Protects every page, present or not (WP_UNPOPULATED installs markers in
  // empty entries), so the first harvest reports only writes from here on.
  RETURN_IF_ERROR(uffd_.WriteProtect(start, block->size(), /*protect=*/true).WithContext(what));
  const RamBlock* key = block.get();
  tracked_.emplace(key, Tracked{std::move(block), std::move(*registration)});
  return Status::Ok();
}

Status UffdWpTracker::Untrack(const RamBlock& block) {
  sys::MutexLock lock(mu_);
  auto it = tracked_.find(&block);
  if (it == tracked_.end()) return Error("uffd-wp: RAM block '{}' is not tracked", block.name());
  Status status = it->second.registration.Unregister();
  tracked_.erase(it);
  if (!status.ok()) {
    return status.WithContext(fmt::format("uffd-wp: untracking RAM block '{}'", block.name()));
  }
  return Status::Ok();
}

bool UffdWpTracker::tracking(const RamBlock& block) const {
  sys::MutexLock lock(mu_);
  return tracked_.contains(&block);
}

Status UffdWpTracker::Harvest(const RamBlock& block, DirtyBitmap& bits) {
  sys::MutexLock lock(mu_);
  const uint64_t start_ns = NowNs();
  uint64_t pages = 0;
  uint64_t scans = 0;
  RETURN_IF_ERROR(HarvestLocked(block, bits, &pages, &scans));
  const uint64_t ns = NowNs() - start_ns;
  stats_.harvests++;
  stats_.pages += pages;
  stats_.scans += scans;
  stats_.ns += ns;
  stats_.last_pages = pages;
  stats_.last_scans = scans;
  stats_.last_ns = ns;
  return Status::Ok();
}

Status UffdWpTracker::HarvestLocked(const RamBlock& block, DirtyBitmap& bits, uint64_t* pages,
                                    uint64_t* scans) {
  if (!tracked_.contains(&block)) {
    return Error("uffd-wp: harvest of RAM block '{}', which is not tracked", block.name());
  }
  const uint64_t expected = block.size() / kDirtyPage;
  if (bits.pages() != expected) {
    return Error("uffd-wp: harvest of RAM block '{}' into a bitmap of {} pages (needs {})",
                 block.name(), bits.pages(), expected);
  }
  const Hva base(block.host());
  const Hva end = base + block.size();
  // category_mask == return_mask == WRITTEN, nothing else: the kernel's fast
  // path (which also counts an empty 4 KiB entry as written: see Harvest on
  // discards), and adjacent written pages come back as one region.
  sys::PagemapScanRequest request;
  request.start = base;
  request.end = end;
  request.flags = sys::kPmScanWpMatching | sys::kPmScanCheckWpAsync;
  request.category_mask = sys::kPageIsWritten;
  request.return_mask = sys::kPageIsWritten;
  // Each page is reported and re-protected under its page table lock, so a
  // concurrent write lands either before (reported now) or after (faults,
  // shows next time). A store through a TLB entry still writable can land
  // just after its page was reported, but only until the kernel flushes the
  // TLB for that page table, before the ioctl returns: the caller, who reads
  // the page after Harvest, sees it. A walk that fills regions_ stops before
  // the first page it could not report, leaving that page as it was:
  // continuing from walk_end loses nothing.
  while (request.start < end) {
    ASSIGN_OR_RETURN(sys::PagemapScanResult scan, pagemap_.Scan(request, regions_));
    ++*scans;
    for (size_t i = 0; i < scan.regions; ++i) {
      const sys::PageRegion& r = regions_[i];
      if (r.start < request.start || r.end > end || r.end <= r.start ||
          !IsAligned(r.start.value, kDirtyPage) || !IsAligned(r.end.value, kDirtyPage)) {
        return Error(
            "uffd-wp: PAGEMAP_SCAN of RAM block '{}' reported [0x{:x}, 0x{:x}) outside "
            "[0x{:x}, 0x{:x})",
            block.name(), r.start.value, r.end.value, request.start.value, end.value);
      }
      const uint64_t count = r.bytes() / kDirtyPage;
      bits.SetRange((r.start.value - base.value) / kDirtyPage, count);
      *pages += count;
    }
    if (scan.walk_end >= end) break;
    if (scan.walk_end <= request.start) {
      // The kernel always reports at least one region before stopping.
      return Error("uffd-wp: PAGEMAP_SCAN of RAM block '{}' made no progress at 0x{:x}",
                   block.name(), request.start.value);
    }
    request.start = scan.walk_end;
  }
  return Status::Ok();
}

UffdWpHarvestStats UffdWpTracker::stats() const {
  sys::MutexLock lock(mu_);
  return stats_;
}

}  // namespace faultline
