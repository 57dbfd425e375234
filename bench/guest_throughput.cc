// Guest first-touch and steady-state write throughput under the reference
// VMM, with 1 and 2 vCPUs, against the host writing the same amount of fresh
// and then resident memory in the same run.
//
//   build/release/bench/faultline_bench_guest_throughput [MEM_MIB]
//
// Figures only; nothing here passes or fails on time.
#include <sys/mman.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

#include "guest/abi.h"
#include "src/vmm/vm.h"

namespace faultline {
namespace {

struct Rates {
  double first_touch = 0;  // pages/s, all vCPUs together
  double steady = 0;
};

// The host baseline: one thread writes every page of a fresh mapping, then
// writes it again.
Rates HostBaseline(uint64_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) std::abort();
  auto pages = static_cast<double>(bytes / kPageSize);
  Rates r;
  for (int pass = 0; pass < 2; ++pass) {
    auto start = std::chrono::steady_clock::now();
    std::memset(p, pass + 1, bytes);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    (pass == 0 ? r.first_touch : r.steady) = pages / s;
  }
  munmap(p, bytes);
  return r;
}

// Phase rates summed over vCPUs (each vCPU's own pages over its own time).
Rates GuestRun(uint64_t bytes, uint32_t vcpus) {
  vmm::VmConfig config;
  config.mem_size = bytes;
  config.vcpus = vcpus;
  config.guest_args = "workload=fill,fill quiet=1";
  auto vm = vmm::Vm::Create(config);
  if (!vm.has_value()) {
    fmt::print(stderr, "{}\n", vm.error().ToString());
    std::exit(1);
  }
  if (!(*vm)->Start().ok()) std::exit(1);
  auto report = (*vm)->Wait(std::chrono::minutes(10));
  if (!report.has_value() || report->vcpus.empty()) {
    fmt::print(stderr, "{}\n", report.has_value() ? "no report" : report.error().ToString());
    std::exit(1);
  }
  Rates r;
  for (const GuestVcpuReport& v : report->vcpus) {
    if (v.phases.size() != 2) std::exit(1);
    r.first_touch += v.phases[0].ops / (report->CyclesToUs(v.phases[0].cycles) / 1e6);
    r.steady += v.phases[1].ops / (report->CyclesToUs(v.phases[1].cycles) / 1e6);
  }
  return r;
}

}  // namespace
}  // namespace faultline

int main(int argc, char** argv) {
  using namespace faultline;
  uint64_t mib = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1024;
  uint64_t bytes = mib << 20;
  Rates host = HostBaseline(bytes);
  fmt::print("guest throughput, {} MiB of RAM, 4 KiB pages/s (host = one host thread, same run)\n",
             mib);
  fmt::print("{:<22} {:>14} {:>14}\n", "", "first touch", "steady state");
  fmt::print("{:<22} {:>14.0f} {:>14.0f}\n", "host memset", host.first_touch, host.steady);
  for (uint32_t vcpus : {1u, 2u}) {
    Rates g = GuestRun(bytes, vcpus);
    fmt::print("{:<22} {:>14.0f} {:>14.0f}   ratio to host {:.3f} / {:.3f}\n",
               fmt::format("guest, {} vCPU{}", vcpus, vcpus > 1 ? "s" : ""), g.first_touch,
               g.steady, g.first_touch / host.first_touch, g.steady / host.steady);
  }
  return 0;
}
