#include "src/migration/served_memory.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <utility>

#include "faultline/types.h"

namespace faultline::migration {
namespace {

// Blocks in memory: a fetch makes the range present, then copies it.
class BlockReader final : public paging::PageSource {
 public:
  BlockReader(std::vector<std::shared_ptr<RamBlock>> blocks, ServedMemory::EnsurePresent ensure)
      : blocks_(std::move(blocks)), ensure_(std::move(ensure)) {}

  void Fetch(const paging::FetchRequest& request, paging::FetchCallback done) override {
    const RamBlock& block = *blocks_[request.block_id];
    if (Status s = ensure_(request.block_id, request.offset, request.dest.size()); !s.ok()) {
      return done(paging::FetchResult::Failed(std::move(s)));
    }
    std::memcpy(request.dest.data(), block.host() + request.offset, request.dest.size());
    done(paging::FetchResult::Filled());
  }
  void CancelAll() override {}

 private:
  const std::vector<std::shared_ptr<RamBlock>> blocks_;
  const ServedMemory::EnsurePresent ensure_;
};

// A client's view: its regions over the memory's blocks. Fetches complete
// inline because the reader's do (the snapshot source has no delay
// configured; the block reader waits in its caller's thread).
class RegionSource final : public paging::PageSource {
 public:
  // reader_ block b holds `block_sizes[b]` bytes of the memory, in order.
  RegionSource(std::shared_ptr<paging::PageSource> reader, std::vector<uint64_t> block_sizes,
               std::vector<UffdRegion> regions)
      : reader_(std::move(reader)),
        block_sizes_(std::move(block_sizes)),
        regions_(std::move(regions)) {}

  void Fetch(const paging::FetchRequest& request, paging::FetchCallback done) override {
    if (cancelled_.load(std::memory_order_acquire)) {
      return done(paging::FetchResult::Failed(Error("page server: the client is released")));
    }
    if (request.block_id >= regions_.size() ||
        request.offset + request.dest.size() > regions_[request.block_id].size) {
      return done(paging::FetchResult::Failed(
          Error("page server: fetch of region {} [{:#x}, +{:#x}) outside the regions",
                request.block_id, request.offset, request.dest.size())));
    }
    uint64_t at = regions_[request.block_id].offset + request.offset;
    uint64_t done_bytes = 0;
    paging::FetchResult result;
    // A unit may straddle two snapshot blocks: one read per piece.
    while (done_bytes < request.dest.size() && result.kind == paging::FetchResult::Kind::kFilled) {
      const auto [block, start] = BlockAt(at);
      const uint64_t piece =
          std::min<uint64_t>(request.dest.size() - done_bytes, block_sizes_[block] - (at - start));
      paging::FetchRequest part = request;
      part.block_id = static_cast<uint32_t>(block);
      part.offset = at - start;
      part.dest = request.dest.subspan(done_bytes, piece);
      reader_->Fetch(part, [&](paging::FetchResult r) { result = std::move(r); });
      at += piece;
      done_bytes += piece;
    }
    done(std::move(result));
  }
  void CancelAll() override { cancelled_.store(true, std::memory_order_release); }

 private:
  // The block holding memory offset `at` and the block's start.
  std::pair<size_t, uint64_t> BlockAt(uint64_t at) const {
    // Regions were checked against the memory's size: `at` is inside.
    uint64_t start = 0;
    for (size_t b = 0; b + 1 < block_sizes_.size(); ++b) {
      if (at < start + block_sizes_[b]) return {b, start};
      start += block_sizes_[b];
    }
    return {block_sizes_.size() - 1, start};
  }

  std::shared_ptr<paging::PageSource> reader_;
  std::vector<uint64_t> block_sizes_;
  std::vector<UffdRegion> regions_;
  std::atomic<bool> cancelled_{false};
};

}  // namespace

Result<std::shared_ptr<const ServedMemory>> ServedMemory::FromSnapshot(
    const SnapshotReader& snapshot) {
  std::shared_ptr<ServedMemory> memory(new ServedMemory());
  ASSIGN_OR_RETURN(std::vector<DirtyBitmap> data, snapshot.DataPages());
  ASSIGN_OR_RETURN(memory->reader_, snapshot.MakePageSource());
  const auto& blocks = snapshot.manifest().blocks;
  if (blocks.empty()) return Error("page server: snapshot {} has no memory", snapshot.dir());
  for (size_t b = 0; b < blocks.size(); ++b) {
    if (blocks[b].size % kPageSize != 0) {
      return Error("page server: block '{}' of {} is not whole pages", blocks[b].name,
                   snapshot.dir());
    }
    memory->data_pages_ += data[b].Count();
    memory->blocks_.push_back({memory->size_, blocks[b].size, std::move(data[b])});
    memory->size_ += blocks[b].size;
  }
  return std::shared_ptr<const ServedMemory>(std::move(memory));
}

Result<std::shared_ptr<const ServedMemory>> ServedMemory::FromBlocks(
    std::vector<std::shared_ptr<RamBlock>> blocks, EnsurePresent ensure) {
  if (blocks.empty()) return Error("page server: no memory to serve");
  std::shared_ptr<ServedMemory> memory(new ServedMemory());
  for (const auto& block : blocks) {
    DirtyBitmap data(block->size() / kPageSize);
    data.SetAll();
    memory->data_pages_ += data.pages();
    memory->blocks_.push_back({memory->size_, block->size(), std::move(data)});
    memory->size_ += block->size();
  }
  memory->reader_ = std::make_shared<BlockReader>(std::move(blocks), std::move(ensure));
  return std::shared_ptr<const ServedMemory>(std::move(memory));
}

template <typename Fn>
void ServedMemory::ForEachPiece(uint64_t offset, uint64_t length, Fn&& fn) const {
  const uint64_t end = std::min(offset + length, size_);
  for (size_t b = 0; b < blocks_.size() && offset < end; ++b) {
    const Block& block = blocks_[b];
    if (offset >= block.start + block.size) continue;
    const uint64_t piece = std::min(end, block.start + block.size) - offset;
    fn(b, offset - block.start, piece);
    offset += piece;
  }
}

bool ServedMemory::AnyData(uint64_t offset, uint64_t length) const {
  bool any = false;
  ForEachPiece(offset, length, [&](size_t b, uint64_t at, uint64_t n) {
    const uint64_t first = at / kPageSize;
    any = any || blocks_[b].data.AnyInRange(first, (at + n + kPageSize - 1) / kPageSize - first);
  });
  return any;
}

paging::PresentMap ServedMemory::ZeroUnits(uint64_t offset, uint64_t length, uint64_t unit) const {
  std::vector<paging::PageRun> runs;
  for (uint64_t u = 0; u < length / unit; ++u) {
    if (AnyData(offset + u * unit, unit)) continue;
    if (!runs.empty() && runs.back().first + runs.back().count == u) {
      ++runs.back().count;
    } else {
      runs.push_back({u, 1});
    }
  }
  auto map = paging::PresentMap::FromRuns(std::move(runs));
  return map.has_value() ? std::move(*map) : paging::PresentMap();
}

std::vector<std::pair<uint64_t, uint64_t>> ServedMemory::DataRanges(uint64_t offset,
                                                                    uint64_t length) const {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  ForEachPiece(offset, length, [&](size_t b, uint64_t at, uint64_t n) {
    const Block& block = blocks_[b];
    const uint64_t lo = at / kPageSize;
    const uint64_t hi = (at + n + kPageSize - 1) / kPageSize;
    for (uint64_t p = block.data.FindNextSet(lo); p < hi; p = block.data.FindNextSet(p)) {
      const uint64_t q = std::min(block.data.FindNextClear(p), hi);
      const uint64_t first = block.start + p * kPageSize;
      if (!out.empty() && out.back().first + out.back().second == first) {
        out.back().second += (q - p) * kPageSize;
      } else {
        out.emplace_back(first, (q - p) * kPageSize);
      }
      p = q;
    }
  });
  return out;
}

std::shared_ptr<paging::PageSource> ServedMemory::SourceFor(std::vector<UffdRegion> regions) const {
  std::vector<uint64_t> sizes;
  for (const Block& b : blocks_) sizes.push_back(b.size);
  return std::make_shared<RegionSource>(reader_, std::move(sizes), std::move(regions));
}

}  // namespace faultline::migration
