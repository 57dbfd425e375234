// faultline bench paging: demand-paging throughput and fault latency of each
// installer, against the floor measured in the same run (the same accesses
// resolved by UFFDIO_ZEROPAGE, with no source work).
#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "src/paging/host_benchmark.h"
#include "tools/faultline/cli_util.h"
#include "tools/faultline/commands.h"

namespace faultline::cli {
namespace {

using paging::InstallerKind;
using paging::PagingBenchConfig;
using paging::PagingBenchRun;

struct BenchOptions {
  std::string installer = "best";
  std::string backing = "anon";
  uint32_t vcpus = 2;
  std::string mem = "1G";
  uint32_t queues = 0;
  uint32_t threads_per_queue = 1;
  double delay_us = 0;
  uint32_t repeat = 1;
  std::string driver = "host";
  bool json = false;
};

int Fail(const Status& status) {
  fmt::print(stderr, "faultline bench paging: error: {}\n", status.ToString());
  return 1;
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
      "{:<9} {:>9.0f} pages/s  p50 {:6.1f} us  p99 {:6.1f} us  max {:7.1f} us  {:4.0f} B "
      "copied/page  wrong {}  (per vCPU:{})",
      name, r.pages_per_sec, r.stats.latency.p50_us, r.stats.latency.p99_us, r.stats.latency.max_us,
      r.stats.bytes_copied_per_page(), r.wrong_pages, vcpus);
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

int RunPaging(const BenchOptions& o) {
  Result<Backing> backing = ParseBacking(o.backing);
  if (!backing.has_value()) return Fail(backing.error().WithContext("--backing"));
  Result<uint64_t> mem = ParseSize(o.mem);
  if (!mem.has_value()) return Fail(mem.error().WithContext("--mem"));
  auto installers = Installers(o.installer, *backing, o.driver == "guest");
  if (!installers.has_value()) return Fail(installers.error().WithContext("--installer"));
  if (o.driver != "host") {
    return Fail(Error("--driver {}: only 'host' is available in this build", o.driver));
  }
  if (o.repeat == 0) return Fail(Error("--repeat must be at least 1"));

  PagingBenchConfig config;
  config.backing = *backing;
  config.threads = o.vcpus;
  config.mem = *mem;
  config.queues_per_block = o.queues;
  config.threads_per_queue = o.threads_per_queue;
  config.source_delay = std::chrono::nanoseconds(static_cast<int64_t>(o.delay_us * 1000));

  // Floor and installers alternate, so that drift in the machine's load
  // affects them alike; the median of each is reported.
  std::vector<PagingBenchRun> floor_runs;
  std::vector<std::vector<PagingBenchRun>> runs(installers->size());
  for (uint32_t rep = 0; rep < o.repeat; ++rep) {
    config.installer = InstallerKind::kZero;
    auto floor = paging::RunHostPagingBench(config);
    if (!floor.has_value()) return Fail(floor.error().WithContext("floor"));
    floor_runs.push_back(std::move(*floor));
    for (size_t i = 0; i < installers->size(); ++i) {
      config.installer = (*installers)[i];
      auto run = paging::RunHostPagingBench(config);
      if (!run.has_value()) {
        return Fail(run.error().WithContext(paging::InstallerName(config.installer)));
      }
      runs[i].push_back(std::move(*run));
    }
  }
  const PagingBenchRun floor = Median(std::move(floor_runs));

  nlohmann::json results = nlohmann::json::array();
  if (!o.json) {
    fmt::print(
        "faultline bench paging: {} backing, {} vCPUs ({} driver), {} MiB, {} queues, "
        "source delay {} us, median of {}\n",
        BackingName(*backing), o.vcpus, o.driver, *mem >> 20, o.queues != 0 ? o.queues : o.vcpus,
        o.delay_us, o.repeat);
    fmt::print("{}\n", RunLine("floor", floor));
  }
  uint64_t wrong = 0;
  for (size_t i = 0; i < installers->size(); ++i) {
    const PagingBenchRun r = Median(std::move(runs[i]));
    const double ratio = floor.pages_per_sec > 0 ? r.pages_per_sec / floor.pages_per_sec : 0;
    wrong += r.wrong_pages;
    if (o.json) {
      nlohmann::json j = RunJson(r);
      j["installer"] = paging::InstallerName((*installers)[i]);
      j["floor_pages_per_sec"] = floor.pages_per_sec;
      j["floor_p50_us"] = floor.stats.latency.p50_us;
      j["floor_p99_us"] = floor.stats.latency.p99_us;
      j["ratio_to_floor"] = ratio;
      results.push_back(std::move(j));
    } else {
      fmt::print("{}  = {:.2f}x floor\n", RunLine(paging::InstallerName((*installers)[i]), r),
                 ratio);
    }
  }
  if (o.json) {
    nlohmann::json out;
    out["backing"] = BackingName(*backing);
    out["vcpus"] = o.vcpus;
    out["mem_bytes"] = *mem;
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
  paging->add_option("--driver", o->driver, "host (threads) or guest (vCPUs of the test guest)")
      ->capture_default_str();
  paging->add_flag("--json", o->json, "Print one JSON object on stdout");
  paging->callback([o, &action] { action = [o] { return RunPaging(*o); }; });
}

}  // namespace faultline::cli
