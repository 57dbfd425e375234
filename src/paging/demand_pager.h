// DemandPager: userfaultfd demand paging for RAM blocks. Each block gets an
// installer (copy, move, continue; zero as a benchmark floor) and K fault
// queues; pages already present are marked in bulk; missing pages come from
// a PageSource, exactly once each, whoever asks first: a faulting thread,
// the VMM (EnsurePresent), the pager's own background fetch (Push) or data
// the source pushes unasked, for which it claims a place (Claim).
//
//   auto pager = DemandPager::Create(source, {.queues_per_block = 2});
//   pager->AddBlock(ram, InstallerKind::kMove, /*source_block=*/0, present);
//   pager->Start();
//   ... the guest runs; faults are served ...
//   pager->Stop();  // once complete(), or to give up
//
// Another process's memory (a VMM that handed over its userfaultfd, as
// Firecracker does): AdoptUserfaultfd(uffd), then AddAdoptedBlock for each
// range it registered (a ForeignBlock), then Start(). The pager reads that
// one userfaultfd with threads_per_queue threads and installs by
// UFFDIO_COPY; it never registers or unregisters anything on it.
//
// A page the source cannot supply is installed as poison: an access to it
// raises SIGBUS (BUS_MCEERR_AR) in the accessing thread. The pager records
// it (poisoned(), PagerOptions::on_poison); what to do with the vCPU that
// touched it is the VMM's policy.
#pragma once

#include <atomic>
#include <memory>
#include <vector>

#include "faultline/ram_block.h"
#include "faultline/status.h"
#include "src/paging/fault_metrics.h"
#include "src/paging/installer.h"
#include "src/paging/page_source.h"
#include "src/paging/pager_context.h"
#include "src/paging/present_map.h"

namespace faultline::paging {

class AdoptedUffd;
class PagedBlock;

class DemandPager final : public PushTarget {
 public:
  static Result<std::unique_ptr<DemandPager>> Create(std::shared_ptr<PageSource> source,
                                                     PagerOptions options = {});
  ~DemandPager() override;  // Stop()
  DemandPager(const DemandPager&) = delete;
  DemandPager& operator=(const DemandPager&) = delete;

  // Registers `block` for demand paging (before Start). The source knows
  // it as `source_block`. Pages in `present` (block pages) hold their
  // final contents already: written to host() for anonymous memory, or to
  // the page cache (through alias()) for memfd and hugetlb; they are made
  // accessible in bulk now and never fault. Every other page faults (the
  // thread blocks) until it is fetched and installed.
  Status AddBlock(std::shared_ptr<RamBlock> block, InstallerKind kind, uint32_t source_block,
                  const PresentMap& present = {});

  // Serves the ranges another process registered (MISSING) on `uffd`
  // (sys::Userfaultfd::Adopt). Once, before AddAdoptedBlock.
  Status AdoptUserfaultfd(sys::Userfaultfd uffd);
  // One range of the adopted userfaultfd (before Start): `block` describes
  // it (a ForeignBlock: 4 KiB anonymous or 2 MiB hugetlb pages). Units in
  // `zero` (block pages) read as zeros: a fault on one gets a zero page
  // (UFFDIO_ZEROPAGE; hugetlb: a copy of zeros) without the source; every
  // other unit is fetched and copied in (UFFDIO_COPY).
  Status AddAdoptedBlock(std::shared_ptr<RamBlock> block, uint32_t source_block,
                         const PresentMap& zero = {});

  // Starts the handler threads; faults are served from now on.
  Status Start();
  // Stops serving faults, cancels fetches in flight (waiting for their
  // completions) and unregisters every block, so that another userfaultfd
  // (a write-protect dirty tracker) may register the memory. Pages that
  // never arrived then read as zeros; call it once complete(), or to
  // abandon paging. After a Stop once complete, EnsurePresent succeeds.
  void Stop();

  // The VMM's own access: makes block bytes [offset, offset + length)
  // present (fetching what is missing, ahead of background pushes) and
  // waits. Errors if a page in the range is poisoned or outside the block.
  Status EnsurePresent(const RamBlock& block, uint64_t offset, uint64_t length);
  // Starts background fetches of the range's missing pages (post-copy's
  // push); returns without waiting. Pages being fetched or present are
  // skipped, so a push never fetches a page twice.
  Status Push(const RamBlock& block, uint64_t offset, uint64_t length);
  // PushTarget: places for pushed data of the block the source knows as
  // `block_id`; called by the source's threads, any time after Start().
  std::vector<PushSlot> Claim(uint32_t block_id, uint64_t offset, uint64_t length) override;

  // Pages (install units) still to come, over every block.
  uint64_t missing_units() const;
  bool complete() const { return missing_units() == 0; }

  // Faults by these threads count as that vCPU's.
  ThreadRegistry& threads() { return ctx_.threads(); }
  PagingStats stats() const { return ctx_.metrics().Snapshot(); }
  std::vector<PoisonedUnit> poisoned() const { return ctx_.poisoned(); }
  // The first error a handler or fetch ran into (OK if none).
  Status first_error() const { return ctx_.first_error(); }
  // Time AddBlock spent marking present pages, over every block.
  double mark_present_seconds() const;
  // The installer of `block`, or nullptr.
  const UffdInstaller* installer(const RamBlock& block) const;

 private:
  DemandPager(std::shared_ptr<PageSource> source, PagerOptions options);
  PagedBlock* Find(const RamBlock& block) const;

  PagerContext ctx_;
  std::vector<std::unique_ptr<PagedBlock>> blocks_;
  std::unique_ptr<AdoptedUffd> adopted_;  // set up before Start()
  bool started_ = false;                  // set up on the owner's thread, before Start()
  std::atomic<bool> stopped_{false};      // read by vCPU and channel threads (EnsurePresent, Claim)
  // Every page was present when Stop() began: EnsurePresent is a no-op
  // then. Written before stopped_ (seq_cst exchange), read after it.
  std::atomic<bool> complete_at_stop_{false};
};

}  // namespace faultline::paging
