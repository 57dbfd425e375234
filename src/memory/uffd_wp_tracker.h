// UffdWpTracker: dirty tracking of RAM blocks without KVM.
//
// Each tracked block's host range is registered with one userfaultfd in
// write-protect mode with UFFD_FEATURE_WP_ASYNC (the kernel resolves a write
// fault itself and marks the page table entry written: no thread reads the
// userfaultfd) and WP_UNPOPULATED (pages never touched are protected too, by
// markers in their page table entries). Harvest reads the written pages with
// PAGEMAP_SCAN and re-protects them in the same walk (PM_SCAN_WP_MATCHING),
// so a later write shows again. Needs Linux 6.7.
//
// What it sees: every write through the block's host() mapping, by any
// thread, the kernel (read(2) into it, KVM's own accesses) included. What it
// does not see:
//  - writes through the block's alias() mapping (a different VMA);
//  - a page that only changed by being discarded (RamBlock::Discard): see
//    Harvest.
// A range can be registered with one userfaultfd at a time, so a tracked
// block cannot also be demand-paged (or tracked by a second tracker).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "faultline/ram_block.h"
#include "faultline/status.h"
#include "src/memory/dirty_bitmap.h"
#include "src/sys/mutex.h"
#include "src/sys/pagemap.h"
#include "src/sys/userfaultfd.h"

namespace faultline {

// Totals since Create, and the figures of the last Harvest.
struct UffdWpHarvestStats {
  uint64_t harvests = 0;  // successful Harvest calls
  uint64_t pages = 0;     // 4 KiB pages reported, over all harvests
  uint64_t scans = 0;     // PAGEMAP_SCAN calls (several per harvest if walks were partial)
  uint64_t ns = 0;        // time spent in Harvest
  uint64_t last_pages = 0;
  uint64_t last_scans = 0;
  uint64_t last_ns = 0;
};

class UffdWpTracker {
 public:
  struct Options {
    // Output regions per PAGEMAP_SCAN: a walk that finds more runs of written
    // pages stops there and Harvest continues it from where it stopped.
    // 4096 regions are 96 KiB; tests use a handful to exercise continuation.
    size_t regions_per_scan = 4096;
  };

  // Opens the userfaultfd and /proc/self/pagemap. Fails, saying that Linux
  // 6.7 is needed, if the kernel lacks WP_ASYNC or PAGEMAP_SCAN.
  static Result<std::unique_ptr<UffdWpTracker>> Create() { return Create(Options{}); }
  static Result<std::unique_ptr<UffdWpTracker>> Create(const Options& options);

  ~UffdWpTracker();  // unregisters every tracked block
  UffdWpTracker(const UffdWpTracker&) = delete;
  UffdWpTracker& operator=(const UffdWpTracker&) = delete;

  // Registers the block's host range and write-protects all of it: pages
  // written afterwards are what the first Harvest reports. Fails for a gmem
  // block (guest_memfd cannot be registered), for a block already tracked,
  // and (EBUSY) for a range registered with another userfaultfd. The tracker
  // keeps the block alive until Untrack (the range must stay mapped while
  // registered).
  Status Track(std::shared_ptr<RamBlock> block);
  // Unregisters the block (which also removes its write protection).
  Status Untrack(const RamBlock& block);
  bool tracking(const RamBlock& block) const;

  // ORs into `bits` (one bit per 4 KiB page: bits.pages() == block.size() /
  // 4096) the pages of `block` written since Track or the previous Harvest,
  // and write-protects them again. A written 2 MiB hugetlb page sets its 512
  // bits. Safe while other threads write the block: a write racing with the
  // harvest is reported by this harvest or by the next, never lost.
  //
  // Transparent huge pages: a write into a protected THP makes the kernel
  // split it, and only the 4 KiB page written is reported. (Protecting
  // memory never touched fills in its page tables, so no THP forms there.)
  //
  // Discarded pages (RamBlock::Discard) change (to zeros) without being
  // written, and the kernel reports them unevenly: anon reports every
  // discarded page (MADV_DONTNEED drops the write-protect marker, and an
  // empty 4 KiB entry counts as written); memfd only those written since the
  // last harvest (a protected page keeps its marker); hugetlb none. A caller
  // that discards tracked memory must mark the range dirty itself.
  Status Harvest(const RamBlock& block, DirtyBitmap& bits);

  UffdWpHarvestStats stats() const;

 private:
  struct Tracked {
    // Declared first so it is destroyed last: the registration must go
    // while the block's range is still mapped.
    std::shared_ptr<RamBlock> block;
    sys::UffdRegistration registration;
  };

  UffdWpTracker(sys::Userfaultfd uffd, sys::Pagemap pagemap, const Options& options);
  Status HarvestLocked(const RamBlock& block, DirtyBitmap& bits, uint64_t* pages, uint64_t* scans)
      REQUIRES(mu_);

  const sys::Userfaultfd uffd_;
  const sys::Pagemap pagemap_;

  // Harvests of different blocks serialize on mu_: the scan is short (about
  // a millisecond per clean GiB) and the region buffer is shared.
  mutable sys::Mutex mu_;
  std::map<const RamBlock*, Tracked> tracked_ GUARDED_BY(mu_);
  std::vector<sys::PageRegion> regions_ GUARDED_BY(mu_);  // PAGEMAP_SCAN output
  UffdWpHarvestStats stats_ GUARDED_BY(mu_);
};

}  // namespace faultline
