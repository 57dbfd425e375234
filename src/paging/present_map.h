// PresentMap: the pages of a RAM block that are already present when demand
// paging starts (received during pre-copy, or written before), as maximal
// runs. At the start of post-copy the set is large and sparse; the pager
// marks each run present with one operation (a range UFFDIO_CONTINUE, or
// nothing for anonymous pages that are mapped already), so the guest never
// faults on memory it has.
//
// Pages are counted in the block's page size (2 MiB on hugetlb).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "faultline/ram_block.h"
#include "faultline/status.h"
#include "src/memory/dirty_bitmap.h"

namespace faultline::paging {

struct PageRun {
  uint64_t first = 0;  // page index
  uint64_t count = 0;
  friend bool operator==(const PageRun&, const PageRun&) = default;
};

class PresentMap {
 public:
  PresentMap() = default;  // nothing present
  // Runs of set bits.
  static PresentMap FromBitmap(const DirtyBitmap& present);
  // Every page of a block of `pages` pages.
  static PresentMap All(uint64_t pages);
  // From sorted, disjoint runs (checked; adjacent runs are merged).
  static Result<PresentMap> FromRuns(std::vector<PageRun> runs);
  // The pages of `block` that are resident right now (mincore on the
  // primary mapping for anonymous memory; on the alias, i.e. in the page
  // cache, for file-backed memory).
  static Result<PresentMap> FromResidency(const RamBlock& block);

  std::span<const PageRun> runs() const { return runs_; }
  uint64_t present_pages() const { return present_pages_; }
  bool empty() const { return runs_.empty(); }
  bool Contains(uint64_t page) const;  // O(log runs)

 private:
  std::vector<PageRun> runs_;  // sorted, disjoint, not adjacent
  uint64_t present_pages_ = 0;
};

}  // namespace faultline::paging
