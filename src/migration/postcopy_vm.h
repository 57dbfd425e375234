// What the post-copy destination needs from a VMM besides DestinationVm:
// starting the guest with its memory demand-paged from a PageSource, and
// the pager's background fetch. memory_postcopy_vm.cc implements it for any
// VMM whose RAM is a GuestMemory, with a paging::GuestPager (memory_vm.h).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "src/memory/dirty_bitmap.h"
#include "src/migration/migratable.h"
#include "src/paging/fault_metrics.h"
#include "src/paging/installer.h"
#include "src/paging/page_source.h"
#include "src/paging/pager_context.h"
#include "src/sys/sched.h"

namespace faultline::migration {

class PostcopyDestinationVm : public DestinationVm {
 public:
  // Loads the vCPU and device state, sets up demand paging of every block
  // from `source` (block b is the source's block b), with the pages set in
  // present[b] (4 KiB pages) holding their final contents already, and runs
  // the vCPUs. Pages not present fault until `source` delivers them.
  // Stale pages of 4 KiB-page blocks must have been dropped (DropPages).
  virtual Status StartPostcopy(std::shared_ptr<paging::PageSource> source,
                               std::span<const DirtyBitmap> present,
                               std::span<const std::vector<uint8_t>> vcpus,
                               std::span<const DeviceBlob> devices) = 0;
  // Drops block `block`'s wire pages [first, first + count) (stale copies
  // written during pre-copy) so that they fault. For blocks of 4 KiB pages
  // the engine drops every stale page it wrote before StartPostcopy, from
  // the channel thread that wrote it (in parallel, while other channels
  // still receive); blocks of huge pages are dropped by StartPostcopy, a
  // whole huge page at a time.
  virtual Status DropPages(uint32_t block, uint64_t first, uint64_t count) = 0;
  // Where pushed pages of block `b` that nobody waits for may be written
  // directly (its memory, when paged through memslot holes), or nullptr
  // when the pager hands out their places (push_target). Known before
  // StartPostcopy.
  virtual uint8_t* direct_push_target(uint32_t block) = 0;
  // The pager's side of pushed pages: it claims places for them, which the
  // network source fills and completes. After StartPostcopy, valid while
  // the VM lives; nullptr if no block goes through it.
  virtual paging::PushTarget* push_target() = 0;
  // Fetches every page still missing, and waits.
  virtual Status FetchMissing() = 0;
  // Every page present: paging ends (memslots merged, userfaultfds gone).
  virtual Status FinishPaging() = 0;
  virtual bool paging_complete() = 0;
  virtual paging::PagingStats paging_stats() = 0;
  virtual paging::InstallerKind installer() const = 0;
  // OK if installer() can demand-page every block over the network; else
  // why not (the installer, the backing) and what to choose instead. The
  // destination refuses a source with it before any page moves.
  virtual Status CheckPaging() = 0;
};

struct PostcopyVmOptions {
  // Default per backing: continue for memfd and hugetlb, move for
  // anonymous memory, hole for guest_memfd.
  std::optional<paging::InstallerKind> installer;
  paging::PagerOptions pager;
  // The fault handler threads' SCHED_FIFO priority (overrides
  // pager.realtime_priority; 0: the default policy). See src/sys/sched.h.
  int realtime_priority = sys::kDefaultRealtimePriority;
  uint64_t hole_chunk = 2ull << 20;
};

}  // namespace faultline::migration
