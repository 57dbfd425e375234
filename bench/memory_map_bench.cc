// Guest-physical lookups, map changes, memslot planning and dirty bitmap
// scans. Figures only, never pass/fail:
//
//   cmake -S . -B build/rel -G Ninja -DCMAKE_BUILD_TYPE=Release
//   cmake --build build/rel --target faultline_bench_memory_map
//   build/rel/bench/faultline_bench_memory_map
//
// Maps of N mapped ranges are one anonymous block with N - 1 one-page holes
// (every other page), so a range is one page and every lookup lands in one.
// The block is never touched, so even 32,000 ranges cost no RAM.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <vector>

#include <benchmark/benchmark.h>

#include "faultline/memory_map.h"
#include "faultline/ram_block.h"
#include "src/memory/dirty_bitmap.h"
#include "src/memory/memslot_plan.h"

namespace faultline {
namespace {

constexpr uint64_t kBase = 1ull << 32;
constexpr uint64_t kPagesPerGiB = (1ull << 30) / kPageSize;

std::shared_ptr<const MemoryMap> MapWithRanges(int64_t ranges) {
  const uint64_t pages = 2 * static_cast<uint64_t>(ranges) - 1;
  auto block = RamBlock::Create({.name = "ram", .size = pages * kPageSize});
  if (!block) {
    fprintf(stderr, "%s\n", block.error().ToString().c_str());
    std::abort();
  }
  auto builder = MemoryMap::Empty()->Edit();
  if (!builder.Place(*block, Gpa(kBase)).ok()) std::abort();
  for (uint64_t page = 1; page < pages; page += 2) {
    if (!builder.PunchHole(Gpa(kBase + page * kPageSize), kPageSize).ok()) std::abort();
  }
  auto map = builder.Build();
  if (map->ranges().size() != static_cast<size_t>(ranges)) std::abort();
  return map;
}

// Random addresses inside mapped pages, so lookups neither all hit the same
// cache lines nor let the branch predictor learn the path.
std::vector<Gpa> Addresses(const MemoryMap& map) {
  std::mt19937_64 rng(1);
  std::vector<Gpa> addresses(4096);
  for (Gpa& gpa : addresses) {
    const MappedRange& range = map.ranges()[rng() % map.ranges().size()];
    gpa = range.gpa + rng() % range.size;
  }
  return addresses;
}

void BM_Lookup(benchmark::State& state) {
  auto map = MapWithRanges(state.range(0));
  const std::vector<Gpa> addresses = Addresses(*map);
  size_t i = 0;
  for (auto _ : state) {
    auto translation = map->Lookup(addresses[i++ & 4095]);
    benchmark::DoNotOptimize(translation);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Lookup)->ArgName("ranges")->Arg(1)->Arg(1000)->Arg(32000);

// Baseline for BM_Lookup: the same search with std::upper_bound over the
// ranges, as a straightforward implementation would write it.
void BM_LookupUpperBoundBaseline(benchmark::State& state) {
  auto map = MapWithRanges(state.range(0));
  const std::vector<Gpa> addresses = Addresses(*map);
  const std::span<const MappedRange> ranges = map->ranges();
  size_t i = 0;
  for (auto _ : state) {
    const Gpa gpa = addresses[i++ & 4095];
    auto it = std::upper_bound(ranges.begin(), ranges.end(), gpa,
                               [](Gpa g, const MappedRange& r) { return g < r.gpa; });
    std::optional<Translation> translation;
    if (it != ranges.begin() && gpa < std::prev(it)->end()) {
      const MappedRange& range = *std::prev(it);
      const uint64_t delta = gpa - range.gpa;
      translation = Translation{range.block, range.block_offset + delta, range.hva + delta,
                                range.size - delta};
    }
    benchmark::DoNotOptimize(translation);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_LookupUpperBoundBaseline)->ArgName("ranges")->Arg(1)->Arg(1000)->Arg(32000);

// A reader that takes a fresh snapshot per lookup (shared reference count)
// against one that keeps a cached snapshot (AtomicMemoryMap::Reader).
void BM_LookupAtomicLoad(benchmark::State& state) {
  static AtomicMemoryMap* atomic = new AtomicMemoryMap(MapWithRanges(1000));
  const std::vector<Gpa> addresses = Addresses(*atomic->Load());
  size_t i = 0;
  for (auto _ : state) {
    auto translation = atomic->Load()->Lookup(addresses[i++ & 4095]);
    benchmark::DoNotOptimize(translation);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_LookupAtomicLoad)->Threads(1)->Threads(2);

void BM_LookupCachedReader(benchmark::State& state) {
  static AtomicMemoryMap* atomic = new AtomicMemoryMap(MapWithRanges(1000));
  AtomicMemoryMap::Reader reader(*atomic);
  const std::vector<Gpa> addresses = Addresses(*atomic->Load());
  size_t i = 0;
  for (auto _ : state) {
    auto translation = reader.Get().Lookup(addresses[i++ & 4095]);
    benchmark::DoNotOptimize(translation);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_LookupCachedReader)->Threads(1)->Threads(2);

// Deriving a map rebuilds it: O(ranges) per change, paid by the writer only.
void BM_PunchAndFillHole(benchmark::State& state) {
  auto map = MapWithRanges(state.range(0));
  const Gpa hole = map->ranges().back().gpa;
  for (auto _ : state) {
    auto holed = map->PunchHole(hole, kPageSize);
    auto filled = (*holed)->FillHole(hole, kPageSize);
    benchmark::DoNotOptimize(filled);
  }
  state.SetItemsProcessed(2 * state.iterations());
}
BENCHMARK(BM_PunchAndFillHole)->ArgName("ranges")->Arg(1)->Arg(1000)->Arg(32000);

void BM_PlanOneHole(benchmark::State& state) {
  auto map = MapWithRanges(state.range(0));
  MemslotPlanner planner;
  const MemslotTable table = planner.Plan(MemslotTable(), map)->next;
  auto holed = *map->PunchHole(map->ranges().back().gpa, kPageSize);
  for (auto _ : state) {
    auto plan = planner.Plan(table, holed);
    benchmark::DoNotOptimize(plan);
  }
}
BENCHMARK(BM_PlanOneHole)->ArgName("ranges")->Arg(1)->Arg(1000)->Arg(32000);

// One GiB of 4 KiB pages at a given density of dirty pages. Patterns:
// 0 clean, 1 sparse (1% scattered), 2 runs (64 pages every 512), 3 half
// (random, the worst case for runs), 4 full.
enum Pattern { kClean, kSparse, kRuns, kHalf, kFull };
DirtyBitmap GiBBitmap(int64_t pattern) {
  DirtyBitmap bitmap(kPagesPerGiB);
  std::mt19937_64 rng(2);
  switch (pattern) {
    case kClean:
      break;
    case kSparse:  // 1% of pages, scattered
      for (uint64_t k = 0; k < kPagesPerGiB / 100; ++k) bitmap.Set(rng() % kPagesPerGiB);
      break;
    case kRuns:  // 64-page runs every 512 pages
      for (uint64_t page = 100; page + 64 < kPagesPerGiB; page += 512) bitmap.SetRange(page, 64);
      break;
    case kHalf:  // each page with probability 1/2: the worst case for runs
      for (uint64_t page = 0; page < kPagesPerGiB; ++page) {
        if (rng() & 1) bitmap.Set(page);
      }
      break;
    case kFull:
      bitmap.SetAll();
      break;
  }
  return bitmap;
}

// Time per iteration is time per GiB scanned.
void BM_BitmapRunsPerGiB(benchmark::State& state) {
  const DirtyBitmap bitmap = GiBBitmap(state.range(0));
  uint64_t runs = 0;
  for (auto _ : state) {
    runs = 0;
    bitmap.ForEachRun([&](uint64_t, uint64_t) { ++runs; });
    benchmark::DoNotOptimize(runs);
  }
  state.counters["runs"] = static_cast<double>(runs);
  state.counters["dirty"] = static_cast<double>(bitmap.Count());
}
BENCHMARK(BM_BitmapRunsPerGiB)->ArgName("pattern")->DenseRange(kClean, kFull);

// Baseline for BM_BitmapRunsPerGiB: testing page by page.
void BM_BitmapRunsBitByBitBaseline(benchmark::State& state) {
  const DirtyBitmap bitmap = GiBBitmap(state.range(0));
  uint64_t runs = 0;
  for (auto _ : state) {
    runs = 0;
    bool open = false;
    for (uint64_t page = 0; page < bitmap.pages(); ++page) {
      const bool dirty = bitmap.Test(page);
      runs += dirty && !open;
      open = dirty;
    }
    benchmark::DoNotOptimize(runs);
  }
  state.counters["runs"] = static_cast<double>(runs);
}
BENCHMARK(BM_BitmapRunsBitByBitBaseline)->ArgName("pattern")->DenseRange(kClean, kFull);

void BM_BitmapSetPagesPerGiB(benchmark::State& state) {
  const DirtyBitmap bitmap = GiBBitmap(state.range(0));
  for (auto _ : state) {
    uint64_t sum = 0;
    bitmap.ForEachSet([&](uint64_t page) { sum += page; });
    benchmark::DoNotOptimize(sum);
  }
}
BENCHMARK(BM_BitmapSetPagesPerGiB)->ArgName("pattern")->DenseRange(kClean, kFull);

// Merging a slot's KVM dirty log into its block's bitmap, with the slot at
// a word-aligned or an unaligned page offset in the block.
void BM_BitmapMergeRawPerGiB(benchmark::State& state) {
  const DirtyBitmap slot_log = GiBBitmap(kHalf);
  DirtyBitmap block(kPagesPerGiB + 64);
  const uint64_t offset = static_cast<uint64_t>(state.range(0));
  for (auto _ : state) {
    block.MergeRaw(slot_log.words(), kPagesPerGiB, offset);
    benchmark::DoNotOptimize(block.words().data());
  }
}
BENCHMARK(BM_BitmapMergeRawPerGiB)->ArgName("offset")->Arg(0)->Arg(3);

}  // namespace
}  // namespace faultline

BENCHMARK_MAIN();
