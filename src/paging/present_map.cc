#include "src/paging/present_map.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <vector>

namespace faultline::paging {

PresentMap PresentMap::FromBitmap(const DirtyBitmap& present) {
  PresentMap map;
  present.ForEachRun([&](uint64_t first, uint64_t count) {
    map.runs_.push_back({first, count});
    map.present_pages_ += count;
  });
  return map;
}

PresentMap PresentMap::All(uint64_t pages) {
  PresentMap map;
  if (pages != 0) map.runs_.push_back({0, pages});
  map.present_pages_ = pages;
  return map;
}

Result<PresentMap> PresentMap::FromRuns(std::vector<PageRun> runs) {
  PresentMap map;
  for (const PageRun& run : runs) {
    if (run.count == 0) continue;
    if (run.first + run.count < run.first) {
      return Error("present map: run [{}, +{}) wraps around", run.first, run.count);
    }
    if (!map.runs_.empty()) {
      PageRun& last = map.runs_.back();
      if (run.first < last.first + last.count) {
        return Error("present map: run at page {} overlaps or precedes the run at page {}",
                     run.first, last.first);
      }
      if (run.first == last.first + last.count) {
        last.count += run.count;
        map.present_pages_ += run.count;
        continue;
      }
    }
    map.runs_.push_back(run);
    map.present_pages_ += run.count;
  }
  return map;
}

Result<PresentMap> PresentMap::FromResidency(const RamBlock& block) {
  // mincore reports per 4 KiB page; a block page is present if its first
  // 4 KiB page is (hugetlb pages are all or nothing). On a shmem mapping it
  // reports the page cache; on a hugetlb mapping only that mapping's own
  // page table entries, so a huge page written through the other mapping
  // would look missing there: ask both mappings.
  std::vector<const uint8_t*> bases = {block.host()};
  if (block.alias() != nullptr) bases.push_back(block.alias());
  const uint64_t small_pages = block.size() / kPageSize;
  const uint64_t step = block.page_size() / kPageSize;
  constexpr uint64_t kChunk = 1 << 16;  // small pages per mincore call
  std::vector<unsigned char> vec(kChunk);
  DirtyBitmap present(block.pages());
  for (const uint8_t* base : bases) {
    for (uint64_t first = 0; first < small_pages; first += kChunk) {
      const uint64_t n = std::min(kChunk, small_pages - first);
      if (::mincore(const_cast<uint8_t*>(base) + first * kPageSize, n * kPageSize, vec.data()) !=
          0) {
        const int err = errno;
        return ErrnoError(err, "present map: mincore on block '{}'", block.name());
      }
      for (uint64_t i = 0; i < n; i += step) {
        if (vec[i] & 1) present.Set((first + i) / step);
      }
    }
  }
  return FromBitmap(present);
}

bool PresentMap::Contains(uint64_t page) const {
  auto it = std::upper_bound(runs_.begin(), runs_.end(), page,
                             [](uint64_t p, const PageRun& run) { return p < run.first; });
  if (it == runs_.begin()) return false;
  --it;
  return page - it->first < it->count;
}

}  // namespace faultline::paging
