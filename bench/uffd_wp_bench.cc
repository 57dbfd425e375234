// The cost of dirty tracking by userfaultfd write-protect (UffdWpTracker):
//
//   build/release/bench/faultline_bench_uffd_wp [MEM_MIB] [anon|memfd|hugetlb...]
//
// (default: 1024 MiB, anon and memfd; hugetlb only if the pool already has
// the pages: the benchmark does not reserve any.) For each backing, on a
// block whose every page is populated, as a running guest's RAM is:
//  - harvest cost: a harvest with no page written, and with N scattered
//    written pages, in ms per GiB of block (median of several);
//  - host write loops over the whole block, sparse (one 8-byte store per
//    4 KiB page: all faults, little work) and dense (memset), with tracking
//    off, and on with every page protected (a harvest between passes: each
//    pass takes a write-protect fault on every page, as a guest rewriting
//    all its memory during pre-copy does) and on with every page already
//    written since the last harvest (no faults). Only the loops are timed;
//    the throughput ratios are against "off", measured in the same run,
//    interleaved. The first touch of the block is printed as a reference
//    for what any page fault costs on the machine.
// Where /dev/kvm opens, the same harvest with no page written through KVM's
// dirty log (a reference VM of the same size, bitmap mode: KVM_GET_DIRTY_LOG
// and KVM_CLEAR_DIRTY_LOG over its 16 MiB memslots) is printed first, as the
// baseline: KVM has no cost on host writes, so there is no write-loop row.
// Figures only.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "src/memory/uffd_wp_tracker.h"
#include "src/sys/memfd.h"
#include "src/vmm/vm.h"

namespace faultline {
namespace {

constexpr uint64_t kSmall = 4096;
constexpr int kRounds = 5;

double Since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

[[noreturn]] void Die(const Status& s) {
  fmt::print(stderr, "{}\n", s.ToString());
  std::exit(1);
}

// One pass over the whole block: one 8-byte store per 4 KiB page (sparse,
// the worst case for tracking: all fault, little work) or every byte of
// every page (dense: memset, bandwidth-bound). Seconds.
enum class Loop { kSparse, kDense };

double WritePass(const RamBlock& block, Loop loop, uint64_t value) {
  const auto start = std::chrono::steady_clock::now();
  if (loop == Loop::kDense) {
    std::memset(block.host(), static_cast<int>(value), block.size());
  } else {
    for (uint64_t off = 0; off < block.size(); off += kSmall) {
      *reinterpret_cast<volatile uint64_t*>(block.host() + off) = value;
    }
  }
  return Since(start);
}

// KVM's dirty log with nothing written: harvest (GET + CLEAR over every
// slot) and take the block's bits, ms per GiB; nullopt without /dev/kvm.
std::optional<double> KvmBitmapHarvest(uint64_t mem) {
  vmm::VmConfig config;
  config.accel = hv::AccelChoice::kKvm;
  config.mem_size = mem;
  config.boot = false;
  config.dirty_mode = DirtyLogMode::kBitmap;
  auto vm = vmm::Vm::Create(config);
  if (!vm.has_value()) {
    fmt::print("kvm     bitmap baseline skipped: {}\n", vm.error().ToString());
    return std::nullopt;
  }
  GuestMemory& memory = (*vm)->memory();
  std::memset((*vm)->ram().data(), 1, mem);  // populated, as the uffd-wp rows
  if (Status s = memory.StartDirtyTracking(); !s.ok()) Die(s);
  DirtyBitmap bits(mem / kSmall);
  auto harvest = [&] {
    bits.ClearAll();
    const auto start = std::chrono::steady_clock::now();
    if (Status s = memory.HarvestDirty(); !s.ok()) Die(s);
    if (Status s = memory.TakeDirty("ram0", bits); !s.ok()) Die(s);
    return Since(start);
  };
  (void)harvest();  // KVM may start with every page dirty (INITIALLY_SET)
  std::vector<double> times;
  for (int i = 0; i < kRounds; ++i) times.push_back(harvest());
  const double gib = static_cast<double>(mem) / (1ull << 30);
  const double ms = Median(times) * 1e3 / gib;
  fmt::print(
      "kvm     {:.2f} GiB, bitmap mode, {} memslots: harvest, 0 dirty pages: {:8.3f} ms/GiB\n", gib,
      memory.memslots().size(), ms);
  return ms;
}

void Run(Backing backing, uint64_t mem, std::optional<double> kvm_ms_per_gib) {
  const double gib = static_cast<double>(mem) / (1ull << 30);
  const uint64_t pages = mem / kSmall;
  if (backing == Backing::kHugetlb) {
    auto pool = sys::ReadHugePagePool();
    if (!pool.has_value() || pool->available() < mem / kHugePageSize) {
      fmt::print("{:<7} skipped: {}\n", BackingName(backing),
                 sys::HugePageShortage("the benchmark's block", mem));
      return;
    }
  }
  auto block = RamBlock::Create({.name = "ram0", .size = mem, .backing = backing});
  if (!block.has_value()) Die(block.error());
  const RamBlock& b = **block;
  // Populated, as a running guest's RAM; this first touch (a page fault and
  // zeroing per page) is a reference for what a fault costs on this machine.
  const double first_touch = WritePass(b, Loop::kSparse, 1);

  auto created = UffdWpTracker::Create();
  if (!created.has_value()) Die(created.error());
  UffdWpTracker& tracker = **created;
  auto start = std::chrono::steady_clock::now();
  if (Status s = tracker.Track(*block); !s.ok()) Die(s);
  const double track = Since(start);
  DirtyBitmap bits(pages);
  auto harvest = [&] {
    bits.ClearAll();
    start = std::chrono::steady_clock::now();
    if (Status s = tracker.Harvest(b, bits); !s.ok()) Die(s);
    return Since(start);
  };

  fmt::print(
      "{:<7} {:.2f} GiB: first touch {:.0f} ns/page (reference fault cost); Track (register + "
      "protect) {:.2f} ms\n",
      BackingName(backing), gib, first_touch * 1e9 / pages, track * 1e3);
  std::vector<double> clean;
  for (int i = 0; i < kRounds; ++i) clean.push_back(harvest());
  const double clean_ms = Median(clean) * 1e3 / gib;
  if (kvm_ms_per_gib) {
    fmt::print("{:<7} harvest, 0 dirty pages: {:8.3f} ms/GiB ({:.2f}x KVM's bitmap)\n", "",
               clean_ms, clean_ms / *kvm_ms_per_gib);
  } else {
    fmt::print("{:<7} harvest, 0 dirty pages: {:8.3f} ms/GiB\n", "", clean_ms);
  }

  std::mt19937_64 rng(42);
  for (uint64_t n : {uint64_t{1000}, uint64_t{10'000}, uint64_t{100'000}}) {
    if (n > pages / 2) break;
    std::vector<double> times;
    uint64_t reported = 0;
    for (int i = 0; i < kRounds; ++i) {
      for (uint64_t k = 0; k < n; ++k) {
        *reinterpret_cast<volatile uint64_t*>(b.host() + (rng() % pages) * kSmall) = k;
      }
      times.push_back(harvest());
      reported = tracker.stats().last_pages;
    }
    fmt::print(
        "{:<7} harvest, {:>6} random writes ({:>6} pages reported, {:>3} scans): {:8.3f} "
        "ms/GiB, {:.0f} ns/page\n",
        "", n, reported, tracker.stats().last_scans, Median(times) * 1e3 / gib,
        Median(times) * 1e9 / static_cast<double>(reported));
  }

  for (Loop loop : {Loop::kSparse, Loop::kDense}) {
    auto pass = [&](uint64_t value) { return WritePass(b, loop, value); };
    // Off / on with every page protected / on with every page already
    // written, interleaved. The steady-state figures are of a third pass:
    // unregistering leaves a memfd block's entries read-only (anon's are
    // made writable again), so the first pass after Untrack faults on every
    // page (reported on its own).
    std::vector<double> off, after_untrack, on_protected, on_written;
    for (int i = 0; i < kRounds; ++i) {
      if (Status s = tracker.Untrack(b); !s.ok()) Die(s);
      after_untrack.push_back(pass(i));
      (void)pass(i);
      off.push_back(pass(i));
      if (Status s = tracker.Track(*block); !s.ok()) Die(s);
      on_protected.push_back(pass(i));  // protected by Track: every page faults
      (void)pass(i);                    // no harvest since: writable
      on_written.push_back(pass(i));
      (void)harvest();  // protects every page again
      on_protected.push_back(pass(i));
      (void)harvest();
    }
    const double t_off = Median(off);
    const double t_on = Median(on_protected);
    const double t_written = Median(on_written);
    auto ns = [&](double t) { return t * 1e9 / static_cast<double>(pages); };
    fmt::print("{:<7} write loop, {}: off {:.2f} GiB/s ({:.1f} ns/page)\n", "",
               loop == Loop::kSparse ? "1 store per 4 KiB page" : "memset of every page",
               gib / t_off, ns(t_off));
    fmt::print(
        "{:<7}   on, every page protected: {:8.2f} GiB/s ({:7.1f} ns/page), throughput "
        "on/off {:.4f}\n",
        "", gib / t_on, ns(t_on), t_off / t_on);
    fmt::print(
        "{:<7}   on, every page written:   {:8.2f} GiB/s ({:7.1f} ns/page), throughput "
        "on/off {:.3f}\n",
        "", gib / t_written, ns(t_written), t_off / t_written);
    fmt::print("{:<7}   first pass after Untrack:                   ({:7.1f} ns/page)\n", "",
               ns(Median(after_untrack)));
  }
}

}  // namespace
}  // namespace faultline

int main(int argc, char** argv) {
  const uint64_t mib = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1024;
  std::vector<faultline::Backing> backings;
  for (int i = 2; i < argc; ++i) {
    auto b = faultline::ParseBacking(argv[i]);
    if (!b.has_value()) {
      fmt::print(stderr, "{}\n", b.error().ToString());
      return 2;
    }
    backings.push_back(*b);
  }
  if (backings.empty()) backings = {faultline::Backing::kAnonymous, faultline::Backing::kMemfd};
  fmt::print("uffd-wp dirty tracking, {} MiB blocks, median of {} rounds\n", mib,
             faultline::kRounds);
  const std::optional<double> kvm = faultline::KvmBitmapHarvest(mib << 20);
  for (faultline::Backing b : backings) faultline::Run(b, mib << 20, kvm);
  return 0;
}
