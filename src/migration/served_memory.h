// ServedMemory: what the page server serves: RAM blocks laid end to end in
// order (a snapshot's, in manifest order; or a migration's, as they
// arrive), which is the "guest memory file" a Firecracker handshake's
// offsets point into. It knows which 4 KiB pages hold data (the rest are
// zero pages, never read) and makes, per client, a PageSource whose block
// ids are the client's regions.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "faultline/ram_block.h"
#include "faultline/status.h"
#include "src/memory/dirty_bitmap.h"
#include "src/migration/snapshot.h"
#include "src/migration/uffd_handshake.h"
#include "src/paging/page_source.h"
#include "src/paging/present_map.h"
#include "src/paging/snapshot_page_source.h"

namespace faultline::migration {

class ServedMemory {
 public:
  // Opens every block file of `snapshot` and reads where its data lies
  // (SEEK_DATA/SEEK_HOLE); reads no page.
  static Result<std::shared_ptr<const ServedMemory>> FromSnapshot(const SnapshotReader& snapshot);

  // Makes block `block`'s bytes [offset, offset + length) hold their
  // contents (a post-copy pager's EnsurePresent: it may wait for the
  // network), or says why they cannot.
  using EnsurePresent = std::function<Status(uint32_t block, uint64_t offset, uint64_t length)>;
  // `blocks` as they are in memory (a migration's destination): every page
  // counts as data, and a client's fetch calls `ensure`, then copies from
  // the block's mapping. `ensure` must stay callable while any client's
  // source lives.
  static Result<std::shared_ptr<const ServedMemory>> FromBlocks(
      std::vector<std::shared_ptr<RamBlock>> blocks, EnsurePresent ensure);

  uint64_t size() const { return size_; }
  uint64_t data_pages() const { return data_pages_; }

  // The units of `unit` bytes of [offset, offset + length) (a region)
  // that are holes throughout: zero pages. Indices count from `offset`.
  paging::PresentMap ZeroUnits(uint64_t offset, uint64_t length, uint64_t unit) const;
  // The runs of data pages in [offset, offset + length), as (offset,
  // length) byte ranges of the memory, in order.
  std::vector<std::pair<uint64_t, uint64_t>> DataRanges(uint64_t offset, uint64_t length) const;

  // A page source for one client: block id i is regions[i], offsets in it
  // are the region's. Completes every fetch inline (pread).
  std::shared_ptr<paging::PageSource> SourceFor(std::vector<UffdRegion> regions) const;

 private:
  struct Block {
    uint64_t start = 0;  // in the memory
    uint64_t size = 0;
    DirtyBitmap data;  // 4 KiB pages holding data
  };
  ServedMemory() = default;
  // Calls fn(block index, offset in block, length) for the pieces of
  // [offset, offset + length), in order.
  template <typename Fn>
  void ForEachPiece(uint64_t offset, uint64_t length, Fn&& fn) const;
  bool AnyData(uint64_t offset, uint64_t length) const;

  std::vector<Block> blocks_;
  uint64_t size_ = 0;
  uint64_t data_pages_ = 0;
  // Completes every fetch inline; its block i is blocks_[i].
  std::shared_ptr<paging::PageSource> reader_;
};

}  // namespace faultline::migration
