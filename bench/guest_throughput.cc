// Guest first-touch and steady-state write throughput under the reference
// VMM, with 1 and 2 vCPUs, on each accelerator the machine has (KVM where
// /dev/kvm opens, the software CPU always), against the host writing the
// same amount of fresh and then resident memory in the same run, and, for
// the software CPU, against QEMU's TCG running the same guest image and
// workload with 1 vCPU (its multiboot path starts only the boot processor)
// where qemu-system-x86_64 is installed. QEMU's RDTSC reads the host TSC
// under TCG, as the software CPU's does, so the guest's own cycle counts
// compare directly.
//
//   build/release/bench/faultline_bench_guest_throughput [MEM_MIB]
//
// Figures only; nothing here passes or fails on time.
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "guest/abi.h"
#include "src/vmm/qemu_command.h"
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
// Also sets `tsc_khz` from the guest's report.
Rates GuestRun(uint64_t bytes, uint32_t vcpus, hv::AccelChoice accel, uint32_t* tsc_khz) {
  vmm::VmConfig config;
  config.mem_size = bytes;
  config.vcpus = vcpus;
  config.accel = accel;
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
  *tsc_khz = report->tsc_khz;
  Rates r;
  for (const GuestVcpuReport& v : report->vcpus) {
    if (v.phases.size() != 2) std::exit(1);
    r.first_touch += v.phases[0].ops / (report->CyclesToUs(v.phases[0].cycles) / 1e6);
    r.steady += v.phases[1].ops / (report->CyclesToUs(v.phases[1].cycles) / 1e6);
  }
  return r;
}

// QEMU TCG, 1 vCPU, the same guest and workload: the rates from the
// guest's serial lines "[vcpu0] fill: N pages, generation G, C cycles";
// nullopt (and why on stderr) if QEMU is missing or the run failed.
std::optional<Rates> QemuRun(uint64_t bytes, uint32_t tsc_khz) {
  const char* qemu = "/usr/bin/qemu-system-x86_64";
  if (access(qemu, X_OK) != 0) {
    fmt::print(stderr,
               "QEMU baseline skipped: {} is not installed (apt-get install "
               "qemu-system-x86)\n",
               qemu);
    return std::nullopt;
  }
  const std::filesystem::path serial =
      std::filesystem::temp_directory_path() / fmt::format("faultline-qemu-{}.txt", getpid());
  std::vector<std::string> args = vmm::QemuTcgCommand(
      qemu, FAULTLINE_DEFAULT_GUEST, "workload=fill,fill", bytes >> 20, serial.string());
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  if (posix_spawn(&pid, qemu, nullptr, nullptr, argv.data(), environ) != 0) return std::nullopt;
  int status = 0;
  waitpid(pid, &status, 0);
  std::ifstream in(serial);
  std::vector<double> rates;
  for (std::string line; std::getline(in, line);) {
    unsigned long long pages = 0, cycles = 0;
    unsigned generation = 0;
    if (std::sscanf(line.c_str(), "[vcpu0] fill: %llu pages, generation %u, %llu cycles", &pages,
                    &generation, &cycles) == 3 &&
        cycles > 0) {
      rates.push_back(static_cast<double>(pages) / (static_cast<double>(cycles) / (tsc_khz * 1e3)));
    }
  }
  std::filesystem::remove(serial);
  if (rates.size() != 2) {
    fmt::print(stderr, "QEMU baseline: no fill reports on its serial port\n");
    return std::nullopt;
  }
  return Rates{rates[0], rates[1]};
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
  std::vector<hv::AccelChoice> accels;
  if (hv::ProbeAccel().accel == hv::Accel::kKvm) accels.push_back(hv::AccelChoice::kKvm);
  accels.push_back(hv::AccelChoice::kTcg);
  uint32_t tsc_khz = 0;
  std::optional<Rates> tcg_one;
  for (hv::AccelChoice accel : accels) {
    const char* name = accel == hv::AccelChoice::kKvm ? "kvm" : "tcg";
    for (uint32_t vcpus : {1u, 2u}) {
      Rates g = GuestRun(bytes, vcpus, accel, &tsc_khz);
      if (accel == hv::AccelChoice::kTcg && vcpus == 1) tcg_one = g;
      fmt::print("{:<22} {:>14.0f} {:>14.0f}   ratio to host {:.3f} / {:.3f}\n",
                 fmt::format("{} guest, {} vCPU{}", name, vcpus, vcpus > 1 ? "s" : ""),
                 g.first_touch, g.steady, g.first_touch / host.first_touch, g.steady / host.steady);
    }
  }
  if (std::optional<Rates> q = QemuRun(bytes, tsc_khz); q && tcg_one) {
    fmt::print("{:<22} {:>14.0f} {:>14.0f}   ratio to host {:.3f} / {:.3f}\n", "QEMU TCG, 1 vCPU",
               q->first_touch, q->steady, q->first_touch / host.first_touch,
               q->steady / host.steady);
    fmt::print("{:<22} {:>14.3f} {:>14.3f}   (tcg guest, 1 vCPU, over QEMU TCG)\n",
               "software CPU / QEMU", tcg_one->first_touch / q->first_touch,
               tcg_one->steady / q->steady);
  }
  return 0;
}
