// The cost of marking pages present in bulk when demand paging starts: a
// block of which half the pages are present (sparse: every page present
// with probability 1/2, the worst case for runs; clustered: runs of 64
// pages), as post-copy finds it after pre-copy.
//
//   build/release/bench/faultline_bench_paging_present_map [MEM_GIB]
//
// For each backing and pattern: the bitmap -> runs conversion, the marking
// itself (memfd: one UFFDIO_CONTINUE per run; anon: nothing but the state
// table, the pages are mapped already), the same map found by mincore, and
// a check that touching every present page afterwards faults zero times.
// memfd's baseline, measured in the same run on a second block holding the
// same pages: one UFFDIO_CONTINUE per present page (marking without runs).
// Figures only.
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "src/paging/demand_pager.h"
#include "src/paging/snapshot_page_source.h"
#include "src/sys/userfaultfd.h"

namespace faultline::paging {
namespace {

double Since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

DirtyBitmap Pattern(uint64_t pages, bool clustered) {
  DirtyBitmap present(pages);
  std::mt19937_64 rng(42);
  if (clustered) {
    for (uint64_t p = 0; p < pages; p += 64) {
      if (rng() & 1) present.SetRange(p, std::min<uint64_t>(64, pages - p));
    }
  } else {
    for (uint64_t p = 0; p < pages; ++p) {
      if (rng() & 1) present.Set(p);
    }
  }
  return present;
}

// Seconds to mark `present` on a fresh memfd block page by page; < 0 if
// something failed (printed).
double PerPageBaseline(uint64_t mem, const DirtyBitmap& present) {
  auto block = RamBlock::Create({.name = "baseline", .size = mem, .backing = Backing::kMemfd});
  if (!block.has_value()) {
    fmt::print(stderr, "{}\n", block.error().ToString());
    return -1;
  }
  present.ForEachSet([&](uint64_t p) { (*block)->alias()[p * kPageSize] = 1; });
  auto uffd = sys::Userfaultfd::Create(O_NONBLOCK,
                                       sys::kUffdFeatureMissingShmem | sys::kUffdFeatureMinorShmem);
  if (!uffd.has_value()) {
    fmt::print(stderr, "{}\n", uffd.error().ToString());
    return -1;
  }
  auto registration =
      uffd->Register(Hva((*block)->host()), mem, sys::UffdMode::kMissing | sys::UffdMode::kMinor);
  if (!registration.has_value()) {
    fmt::print(stderr, "{}\n", registration.error().ToString());
    return -1;
  }
  bool ok = true;
  const auto start = std::chrono::steady_clock::now();
  present.ForEachSet([&](uint64_t p) {
    auto fill = uffd->Continue(Hva((*block)->host() + p * kPageSize), kPageSize);
    ok = ok && fill.has_value() && fill->done();
  });
  const double seconds = Since(start);
  if (!ok) {
    fmt::print(stderr, "per-page UFFDIO_CONTINUE failed\n");
    return -1;
  }
  return seconds;
}

void Run(Backing backing, uint64_t mem, bool clustered) {
  const uint64_t pages = mem / kPageSize;
  auto block = RamBlock::Create({.name = "ram0", .size = mem, .backing = backing});
  if (!block.has_value()) {
    fmt::print(stderr, "{}\n", block.error().ToString());
    std::exit(1);
  }
  const DirtyBitmap present = Pattern(pages, clustered);
  // Put the present pages where paging expects them (not timed).
  uint8_t* writer = (*block)->alias() != nullptr ? (*block)->alias() : (*block)->host();
  present.ForEachSet([&](uint64_t p) { writer[p * kPageSize] = 1; });

  auto start = std::chrono::steady_clock::now();
  PresentMap map = PresentMap::FromBitmap(present);
  const double to_runs = Since(start);
  start = std::chrono::steady_clock::now();
  auto resident = PresentMap::FromResidency(**block);
  const double mincore = Since(start);
  if (!resident.has_value() || resident->runs().size() != map.runs().size()) {
    fmt::print(stderr, "mincore disagrees with the bitmap\n");
    std::exit(1);
  }

  auto source = std::make_shared<SnapshotPageSource>();
  const InstallerKind kind = BestInstaller(backing);
  auto pager = DemandPager::Create(source, {.queues_per_block = 2});
  start = std::chrono::steady_clock::now();
  Status added = (*pager)->AddBlock(*block, kind, 0, map);
  const double add = Since(start);
  if (!added.ok() || !(*pager)->Start().ok()) {
    fmt::print(stderr, "{}\n", added.ToString());
    std::exit(1);
  }
  // Touch every present page from another thread: none may fault.
  std::thread([&] {
    present.ForEachSet([&](uint64_t p) {
      (void)*reinterpret_cast<volatile uint8_t*>((*block)->host() + p * kPageSize);
    });
  }).join();
  const PagingStats stats = (*pager)->stats();
  fmt::print(
      "{:<5} {:<9} {:>7} runs, {:>7} present pages: to runs {:7.2f} ms, mincore {:7.2f} ms, "
      "register+mark {:8.2f} ms (marking {:8.2f} ms, {:.2f} us/run), faults on present pages: "
      "{}\n",
      BackingName(backing), clustered ? "clustered" : "sparse", map.runs().size(),
      map.present_pages(), to_runs * 1e3, mincore * 1e3, add * 1e3,
      (*pager)->mark_present_seconds() * 1e3,
      (*pager)->mark_present_seconds() * 1e6 / static_cast<double>(map.runs().size()),
      stats.faults);
  const double marking = (*pager)->mark_present_seconds();
  (*pager)->Stop();
  if (backing == Backing::kMemfd) {
    pager->reset();  // only one block of this size at a time
    block->reset();
    const double per_page = PerPageBaseline(mem, present);
    if (per_page > 0) {
      fmt::print(
          "{:<5} {:<9} baseline: one UFFDIO_CONTINUE per present page {:8.2f} ms; bulk "
          "marking takes {:.3f}x of it\n",
          "", "", per_page * 1e3, marking / per_page);
    }
  }
}

}  // namespace
}  // namespace faultline::paging

int main(int argc, char** argv) {
  const uint64_t gib = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 4;
  fmt::print("present map of {} GiB, 50% present\n", gib);
  for (faultline::Backing b : {faultline::Backing::kMemfd, faultline::Backing::kAnonymous}) {
    for (bool clustered : {false, true}) faultline::paging::Run(b, gib << 30, clustered);
  }
  return 0;
}
