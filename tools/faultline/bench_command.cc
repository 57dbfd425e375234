// faultline bench paging: demand-paging throughput and fault latency of each
// installer, against the floor measured in the same run (the same accesses
// resolved by UFFDIO_ZEROPAGE, with no source work).
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "guest/abi.h"
#include "src/paging/guest_pager.h"
#include "src/paging/host_benchmark.h"
#include "src/paging/snapshot_page_source.h"
#include "src/sys/mapping.h"
#include "src/vmm/vm.h"
#include "tools/faultline/cli_util.h"
#include "tools/faultline/commands.h"

namespace faultline::cli {
namespace {

using paging::InstallerKind;
using paging::PagingBenchConfig;
using paging::PagingBenchRun;

struct BenchOptions {
  AccelOptions accel;
  std::string installer = "best";
  std::string backing = "anon";
  uint32_t vcpus = 2;
  std::string mem = "1G";
  uint32_t queues = 0;
  uint32_t threads_per_queue = 1;
  double delay_us = 0;
  uint32_t repeat = 1;
  std::string driver = "guest";
  std::string chunk = "2M";  // hole installer
  std::string guest = FAULTLINE_DEFAULT_GUEST;
  bool json = false;
};

int Fail(const Status& status) {
  fmt::print(stderr, "faultline bench paging: error: {}\n", status.ToString());
  return 1;
}

// The value below which `fraction` of the guest's per-page times lie, from
// its log2 histogram (bucket b: 2^b <= cycles < 2^(b+1)); the bucket's
// geometric middle, so within a factor of 1.4.
double HistogramPercentileUs(const GuestReport& report, uint32_t phase, double fraction) {
  std::array<uint64_t, 48> sum{};
  uint64_t total = 0;
  for (const GuestVcpuReport& v : report.vcpus) {
    for (const GuestPhase& p : v.phases) {
      if (p.phase != phase) continue;
      for (size_t b = 0; b < sum.size(); ++b) sum[b] += p.histogram[b], total += p.histogram[b];
    }
  }
  if (total == 0) return 0;
  uint64_t seen = 0;
  for (size_t b = 0; b < sum.size(); ++b) {
    seen += sum[b];
    if (static_cast<double>(seen) >= fraction * static_cast<double>(total)) {
      return report.CyclesToUs(static_cast<uint64_t>(std::ldexp(1.41421356, static_cast<int>(b))));
    }
  }
  return 0;
}

// The guest driver: the test guest boots with only what the VMM wrote (its
// image and boot structures) present; every other page is paged in as its
// vCPUs touch every page of their regions once. Rates are the guest's own
// (its touch phase, timed with RDTSC).
Result<PagingBenchRun> RunGuestPagingBench(const PagingBenchConfig& c, uint64_t chunk,
                                           const std::string& guest_path,
                                           const AccelOptions& accel) {
  vmm::VmConfig config;
  RETURN_IF_ERROR(ApplyAccelOptions(accel, config));
  config.guest_path = guest_path;
  config.mem_size = c.mem;
  config.vcpus = c.threads;
  config.backing = c.backing;
  config.guest_args = "workload=touch quiet=1";
  ASSIGN_OR_RETURN(std::unique_ptr<vmm::Vm> vm, vmm::Vm::Create(config));
  const RamBlock& block = *vm->ram_block();
  ASSIGN_OR_RETURN(paging::PresentMap present, paging::PresentMap::FromResidency(block));
  // The source: the present pages as they are (the image and boot
  // structures), a non-zero pattern on every other page. It must not be
  // read from the VM's missing pages: reading them would map them (the
  // zero page on anonymous memory, a fresh page on shmem) and they would
  // never fault.
  ASSIGN_OR_RETURN(sys::Mapping data, sys::Mapping::Anonymous(c.mem, "bench paging source"));
  std::memset(data.data(), 0xa5, c.mem);
  const uint8_t* resident = block.alias() != nullptr ? block.alias() : block.host();
  for (const paging::PageRun& run : present.runs()) {
    const uint64_t at = run.first * block.page_size();
    std::memcpy(data.data() + at, resident + at, run.count * block.page_size());
  }
  auto bytes = std::make_shared<sys::Mapping>(std::move(data));
  auto source = std::make_shared<paging::SnapshotPageSource>(paging::SnapshotPageSource::Options{
      .delay = c.source_delay, .delay_threads = c.source_threads});
  const uint32_t id = source->AddMemory("ram0", {bytes->data(), c.mem}, bytes);
  paging::GuestPagingOptions options;
  options.installer = c.installer;
  options.pager.queues_per_block = c.queues_per_block != 0 ? c.queues_per_block : c.threads;
  options.pager.threads_per_queue = c.threads_per_queue;
  options.hole_chunk = chunk;
  ASSIGN_OR_RETURN(
      auto pager,
      paging::GuestPager::Create(vm->memory(), source, {{vm->ram_block(), id, present}}, options));
  vm->AttachPager(pager.get());
  Status status;
  for (uint32_t i = 0; status.ok() && i < c.threads; ++i) {
    status = pager->PrepareVcpu(vm->vcpus().vcpu(i));
  }
  if (status.ok()) status = pager->Start();
  if (status.ok()) status = vm->Start();
  Result<GuestReport> done =
      status.ok() ? vm->Wait(std::chrono::minutes(10)) : Result<GuestReport>(status);
  vm->Stop();
  vm->AttachPager(nullptr);
  RETURN_IF_ERROR(done.status());
  if (!done->success()) return Error("the guest failed: {}", FormatReport(*done));
  PagingBenchRun run;
  run.stats = pager->stats();
  if (run.stats.faults == 0) {
    return Error(
        "no page was demand-paged: the guest's memory was present before paging started, so "
        "this run measured nothing");
  }
  double slowest = 0;
  for (const GuestVcpuReport& v : done->vcpus) {
    for (const GuestPhase& p : v.phases) {
      if (p.phase != FL_PHASE_TOUCH) continue;
      const double s = done->CyclesToUs(p.cycles) / 1e6;
      run.thread_pages_per_sec.push_back(static_cast<double>(p.ops) / s);
      run.pages += p.ops;
      slowest = std::max(slowest, s);
    }
  }
  run.seconds = slowest;
  run.pages_per_sec = slowest > 0 ? static_cast<double>(run.pages) / slowest : 0;
  run.observed.p50_us = HistogramPercentileUs(*done, FL_PHASE_TOUCH, 0.50);
  run.observed.p99_us = HistogramPercentileUs(*done, FL_PHASE_TOUCH, 0.99);
  run.observed.max_us = done->CyclesToUs(done->max_stall_cycles());
  return run;
}

// The run with the median pages/s.
PagingBenchRun Median(std::vector<PagingBenchRun> runs) {
  std::sort(runs.begin(), runs.end(), [](const PagingBenchRun& a, const PagingBenchRun& b) {
    return a.pages_per_sec < b.pages_per_sec;
  });
  return runs[runs.size() / 2];
}

nlohmann::json RunJson(const PagingBenchRun& r) {
  nlohmann::json j;
  j["pages_per_sec"] = r.pages_per_sec;
  j["seconds"] = r.seconds;
  j["pages"] = r.pages;
  j["wrong_pages"] = r.wrong_pages;
  j["vcpu_pages_per_sec"] = r.thread_pages_per_sec;
  j["vcpu_faults"] = r.stats.vcpu_faults;
  j["queue_faults"] = r.stats.queue_faults;
  j["faults"] = r.stats.faults;
  j["p50_us"] = r.stats.latency.p50_us;
  j["p90_us"] = r.stats.latency.p90_us;
  j["p99_us"] = r.stats.latency.p99_us;
  j["max_us"] = r.stats.latency.max_us;
  j["observed_p50_us"] = r.observed.p50_us;
  j["observed_p99_us"] = r.observed.p99_us;
  j["pager_faults_joined"] = r.stats.faults_joined;
  j["bytes_copied_per_page"] = r.stats.bytes_copied_per_page();
  j["fetches"] = r.stats.fetches;
  return j;
}

std::string RunLine(const char* name, const PagingBenchRun& r) {
  std::string vcpus;
  for (size_t i = 0; i < r.thread_pages_per_sec.size(); ++i) {
    vcpus += fmt::format(" vcpu{} {:.0f}", i, r.thread_pages_per_sec[i]);
  }
  return fmt::format(
      "{:<9} {:>9.0f} pages/s  service p50 {:6.1f} us p99 {:6.1f} us  observed p50 {:6.1f} us "
      "p99 {:6.1f} us  {:4.0f} B copied/page  (per vCPU:{})",
      name, r.pages_per_sec, r.stats.latency.p50_us, r.stats.latency.p99_us, r.observed.p50_us,
      r.observed.p99_us, r.stats.bytes_copied_per_page(), vcpus);
}

Result<std::vector<InstallerKind>> Installers(const std::string& name, Backing backing,
                                              bool vcpus) {
  if (name == "best") return std::vector<InstallerKind>{paging::BestInstaller(backing)};
  if (name == "all") {
    std::vector<InstallerKind> all;
    for (InstallerKind k : {InstallerKind::kCopy, InstallerKind::kMove, InstallerKind::kContinue,
                            InstallerKind::kHole}) {
      if (k == InstallerKind::kHole && !vcpus) continue;  // needs vCPU exits
      if (paging::CheckInstaller(k, backing).ok()) all.push_back(k);
    }
    return all;
  }
  ASSIGN_OR_RETURN(InstallerKind kind, paging::ParseInstaller(name));
  RETURN_IF_ERROR(paging::CheckInstaller(kind, backing));
  return std::vector<InstallerKind>{kind};
}

// What `bench paging` measures: the options, checked.
struct PagingPlan {
  Backing backing = Backing::kAnonymous;
  uint64_t mem = 0;
  uint64_t chunk = 0;  // hole installer
  std::vector<InstallerKind> installers;
  PagingBenchConfig config;  // the installer set per run
};

Result<PagingPlan> PlanPaging(const BenchOptions& o) {
  PagingPlan plan;
  Result<Backing> backing = ParseBacking(o.backing);
  if (!backing.has_value()) return backing.error().WithContext("--backing");
  plan.backing = *backing;
  Result<uint64_t> mem = ParseSize(o.mem);
  if (!mem.has_value()) return mem.error().WithContext("--mem");
  plan.mem = *mem;
  auto installers = Installers(o.installer, plan.backing, o.driver == "guest");
  if (!installers.has_value()) return installers.error().WithContext("--installer");
  plan.installers = std::move(*installers);
  if (o.driver != "host" && o.driver != "guest") {
    return Error("--driver {}: expected guest or host", o.driver);
  }
  Result<uint64_t> chunk = ParseSize(o.chunk);
  if (!chunk.has_value()) return chunk.error().WithContext("--chunk");
  plan.chunk = *chunk;
  if (o.repeat == 0) return Error("--repeat must be at least 1");
  plan.config.backing = plan.backing;
  plan.config.threads = o.vcpus;
  plan.config.mem = plan.mem;
  plan.config.queues_per_block = o.queues;
  plan.config.threads_per_queue = o.threads_per_queue;
  plan.config.source_delay = std::chrono::nanoseconds(static_cast<int64_t>(o.delay_us * 1000));
  return plan;
}

// The median run of the floor and of each installer (in the plan's order).
struct PagingMedians {
  PagingBenchRun floor;
  std::vector<PagingBenchRun> installers;
};

Result<PagingMedians> MeasurePaging(const BenchOptions& o, const PagingPlan& plan) {
  // Floor and installers alternate, so that drift in the machine's load
  // affects them alike; the median of each is reported.
  std::vector<PagingBenchRun> floor_runs;
  std::vector<std::vector<PagingBenchRun>> runs(plan.installers.size());
  auto run_one = [&](const PagingBenchConfig& c) {
    return o.driver == "host" ? paging::RunHostPagingBench(c)
                              : RunGuestPagingBench(c, plan.chunk, o.guest, o.accel);
  };
  // The floor on the same backing; guest_memfd has no userfaultfd, so its
  // floor is measured on anonymous memory.
  PagingBenchConfig floor_config = plan.config;
  floor_config.installer = InstallerKind::kZero;
  if (floor_config.backing == Backing::kGuestMemfd) floor_config.backing = Backing::kAnonymous;
  PagingBenchConfig config = plan.config;
  for (uint32_t rep = 0; rep < o.repeat; ++rep) {
    auto floor = run_one(floor_config);
    if (!floor.has_value()) return floor.error().WithContext("floor");
    floor_runs.push_back(std::move(*floor));
    for (size_t i = 0; i < plan.installers.size(); ++i) {
      config.installer = plan.installers[i];
      auto run = run_one(config);
      if (!run.has_value()) return run.error().WithContext(paging::InstallerName(config.installer));
      runs[i].push_back(std::move(*run));
    }
  }
  PagingMedians medians{Median(std::move(floor_runs)), {}};
  for (std::vector<PagingBenchRun>& r : runs) medians.installers.push_back(Median(std::move(r)));
  return medians;
}

// Prints the figures (a line per installer, or one JSON object); returns
// the exit code.
int ReportPaging(const BenchOptions& o, const PagingPlan& plan, const PagingMedians& m) {
  const PagingBenchRun& floor = m.floor;
  nlohmann::json results = nlohmann::json::array();
  if (!o.json) {
    fmt::print(
        "faultline bench paging: {} backing, {} vCPUs ({} driver), {} MiB, {} queues, "
        "source delay {} us, median of {}\n",
        BackingName(plan.backing), o.vcpus, o.driver, plan.mem >> 20,
        o.queues != 0 ? o.queues : o.vcpus, o.delay_us, o.repeat);
    fmt::print("{}\n", RunLine("floor", floor));
  }
  uint64_t wrong = 0;
  for (size_t i = 0; i < plan.installers.size(); ++i) {
    const PagingBenchRun& r = m.installers[i];
    const double ratio = floor.pages_per_sec > 0 ? r.pages_per_sec / floor.pages_per_sec : 0;
    wrong += r.wrong_pages;
    if (o.json) {
      nlohmann::json j = RunJson(r);
      j["installer"] = paging::InstallerName(plan.installers[i]);
      j["floor_pages_per_sec"] = floor.pages_per_sec;
      j["floor_p50_us"] = floor.stats.latency.p50_us;
      j["floor_p99_us"] = floor.stats.latency.p99_us;
      j["floor_vcpu_pages_per_sec"] = floor.thread_pages_per_sec;
      j["ratio_to_floor"] = ratio;
      results.push_back(std::move(j));
    } else {
      fmt::print("{}  = {:.2f}x floor\n", RunLine(paging::InstallerName(plan.installers[i]), r),
                 ratio);
    }
  }
  if (o.json) {
    nlohmann::json out;
    out["backing"] = BackingName(plan.backing);
    out["vcpus"] = o.vcpus;
    out["mem_bytes"] = plan.mem;
    out["driver"] = o.driver;
    out["source_delay_us"] = o.delay_us;
    out["repeat"] = o.repeat;
    // The first (or only) installer's figures at the top level.
    out.update(results[0]);
    out["runs"] = results;
    fmt::print("{}\n", out.dump());
  }
  if (wrong != 0) {
    fmt::print(stderr, "faultline bench paging: {} pages had wrong contents\n", wrong);
    return 1;
  }
  return 0;
}

int RunPaging(const BenchOptions& o) {
  Result<PagingPlan> plan = PlanPaging(o);
  if (!plan.has_value()) return Fail(plan.error());
  Result<PagingMedians> medians = MeasurePaging(o, *plan);
  if (!medians.has_value()) return Fail(medians.error());
  return ReportPaging(o, *plan, *medians);
}

}  // namespace

void AddBenchCommand(CLI::App& app, Action& action) {
  CLI::App* bench = app.add_subcommand("bench", "Measure the memory machinery");
  bench->require_subcommand(1);
  auto o = std::make_shared<BenchOptions>();
  CLI::App* paging = bench->add_subcommand(
      "paging",
      "Demand paging: every vCPU touches every page of its region once; pages/s and "
      "fault latency against the UFFDIO_ZEROPAGE floor of the same run");
  paging->add_option("--installer", o->installer, "copy, move, continue, hole, best or all")
      ->capture_default_str();
  AddAccelOptions(paging, &o->accel);
  paging->add_option("--backing", o->backing, "RAM backing: anon, memfd, hugetlb, gmem")
      ->capture_default_str();
  paging->add_option("--vcpus", o->vcpus, "vCPUs (threads touching memory)")->capture_default_str();
  paging->add_option("--mem", o->mem, "Memory, e.g. 1G (multiple of 2M)")->capture_default_str();
  paging->add_option("--queues", o->queues, "userfaultfds per block (default: one per vCPU)");
  paging->add_option("--threads-per-queue", o->threads_per_queue, "Handler threads per queue")
      ->capture_default_str();
  paging->add_option("--delay-us", o->delay_us, "Source delay per fetch (emulated round trip)");
  paging->add_option("--repeat", o->repeat, "Runs of each; the median is reported")
      ->capture_default_str();
  paging->add_option("--driver", o->driver, "guest (vCPUs of the test guest) or host (threads)")
      ->capture_default_str();
  paging->add_option("--chunk", o->chunk, "hole installer: bytes per chunk, 4K..2M")
      ->capture_default_str();
  paging->add_option("--guest", o->guest, "Guest ELF image (default: the one the build made)");
  paging->add_flag("--json", o->json, "Print one JSON object on stdout");
  paging->callback([o, &action] { action = [o] { return RunPaging(*o); }; });
}

}  // namespace faultline::cli
