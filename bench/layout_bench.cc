// Guest-memory layout and dirty tracking costs on the real /dev/kvm:
//  - the vCPU pause of one atomic layout change (punch or fill a 2 MiB hole)
//    in a running 4 GiB VM with 1 and 2 vCPUs, next to one bare KVM
//    delete+add of the same slot measured in the same run;
//  - dirty harvest time per GiB, bitmap and ring, while the guest writes.
//
//   build/release/bench/faultline_bench_layout [MEM_GIB] [CHANGES]
//
// Figures only; nothing here passes or fails on time.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "guest/abi.h"
#include "src/vmm/vm.h"

namespace faultline {
namespace {

using Clock = std::chrono::steady_clock;

double Us(uint64_t ns) { return ns / 1000.0; }

struct Stats {
  double p50, p99, max;
};

Stats Summarise(std::vector<uint64_t> ns) {
  std::sort(ns.begin(), ns.end());
  return {Us(ns[ns.size() / 2]), Us(ns[ns.size() * 99 / 100]), Us(ns.back())};
}

std::unique_ptr<vmm::Vm> StartVm(uint64_t mem, uint32_t vcpus, DirtyLogMode mode,
                                 const std::string& args,
                                 uint64_t granule = kDefaultMemslotGranule) {
  vmm::VmConfig config;
  config.memslot_granule = granule;
  config.mem_size = mem;
  config.vcpus = vcpus;
  config.dirty_mode = mode;
  config.guest_args = args + " quiet=1";
  // The guest's console, for when a run fails.
  config.serial = [](const std::string& line) { fmt::print(stderr, "guest| {}\n", line); };
  auto vm = vmm::Vm::Create(config);
  if (!vm.has_value() || !(*vm)->Start().ok()) {
    fmt::print(stderr, "cannot start VM: {}\n", vm.has_value() ? "start" : vm.error().ToString());
    std::exit(1);
  }
  return std::move(*vm);
}

void Finish(vmm::Vm& vm) {
  vm.SetGuestCommand(FL_CMD_STOP);
  auto report = vm.Wait(std::chrono::minutes(10));
  if (!report.has_value() || !report->success()) {
    fmt::print(stderr, "guest failed: {}\n",
               report.has_value() ? fmt::format("{} bad pages, panic {}", report->bad_page_count(),
                                                report->vcpus[0].panic.value_or("none"))
                                  : report.error().ToString());
    std::exit(1);
  }
}

void LayoutPause(uint64_t mem, uint32_t vcpus, int changes, uint64_t granule) {
  // The guest writes random pages everywhere but the window, so the vCPUs
  // are busy in the guest when the VMM stops them.
  const uint64_t window = mem / 4;  // inside vCPU 0's pages, clear of any ledger
  auto vm = StartVm(
      mem, vcpus, DirtyLogMode::kBitmap,
      fmt::format("workload=random until_command=1 skip={:#x}:{:#x}", window, kHugePageSize),
      granule);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  GuestMemory& memory = vm->memory();
  std::vector<uint64_t> pause, hold;
  for (int i = 0; i < changes; ++i) {
    // Let the vCPUs run between changes, so every hold has to kick a vCPU
    // that is inside the guest (back to back, it would find them parked).
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    bool punch = i % 2 == 0;
    Status s = punch ? memory.PunchHole(Gpa(window), kHugePageSize)
                     : memory.FillHole(Gpa(window), kHugePageSize);
    if (!s.ok()) std::exit(1);
    LayoutChangeStats st = memory.last_change();
    pause.push_back(st.hold_ns + st.pause_ns);
    hold.push_back(st.hold_ns);
  }
  // Baseline in the same run: one bare KVM add and delete of a slot of the
  // size the change replaced, no vCPU pause (what a VMM without kick-and-hold
  // does).
  const uint64_t slot_size = granule ? granule : mem;
  auto block = RamBlock::Create({.name = "scratch", .size = slot_size});
  if (!block.has_value()) std::exit(1);
  std::vector<uint64_t> bare;
  for (int i = 0; i < changes; ++i) {
    MemslotRegion r{
        .id = 1000, .gpa = Gpa(64ull << 30), .size = slot_size, .hva = Hva((*block)->host())};
    auto t0 = Clock::now();
    if (!vm->machine().SetMemslot(r).ok()) std::exit(1);
    r.size = 0;
    if (!vm->machine().SetMemslot(r).ok()) std::exit(1);
    bare.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count());
  }
  Finish(*vm);
  Stats p = Summarise(pause), h = Summarise(hold), b = Summarise(bare);
  fmt::print(
      "{} GiB, {} vCPU{}, slots of {:>4} MiB: layout change pause p50 {:.1f} us p99 "
      "{:.1f} us max {:.1f} us (stopping vCPUs p50 {:.1f} us); bare delete+add of the same "
      "slot p50 {:.1f} us; ratio {:.3f}\n",
      mem >> 30, vcpus, vcpus > 1 ? "s" : " ", (granule ? granule : mem) >> 20, p.p50, p.p99, p.max,
      h.p50, b.p50, p.p50 / b.p50);
}

void HarvestCost(uint64_t mem, DirtyLogMode mode) {
  auto vm = StartVm(mem, 2, mode, "workload=random until_command=1 rate=256");
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  GuestMemory& memory = vm->memory();
  if (!memory.StartDirtyTracking().ok()) std::exit(1);
  std::vector<uint64_t> ns;
  uint64_t pages = 0;
  DirtyBitmap bits;
  for (int i = 0; i < 40; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
    auto t0 = Clock::now();
    if (!memory.HarvestDirty().ok()) std::exit(1);
    ns.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count());
    if (!memory.TakeDirty("ram0", bits).ok()) std::exit(1);
    pages += bits.Count();
  }
  Finish(*vm);
  Stats s = Summarise(ns);
  double gib = static_cast<double>(mem) / (1ull << 30);
  fmt::print(
      "dirty harvest, {:<6}: p50 {:.1f} us per GiB (p99 {:.1f}), {:.0f} dirty pages per "
      "harvest\n",
      DirtyLogModeName(mode), s.p50 / gib, s.p99 / gib, pages / 40.0);
}

}  // namespace
}  // namespace faultline

int main(int argc, char** argv) {
  using namespace faultline;
  uint64_t gib = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 4;
  int changes = argc > 2 ? std::atoi(argv[2]) : 400;
  for (uint32_t vcpus : {1u, 2u}) {
    for (uint64_t granule : {uint64_t{0}, uint64_t{256} << 20, kDefaultMemslotGranule}) {
      LayoutPause(gib << 30, vcpus, changes, granule);
    }
  }
  HarvestCost(gib << 30, DirtyLogMode::kBitmap);
  HarvestCost(gib << 30, DirtyLogMode::kRing);
  return 0;
}
