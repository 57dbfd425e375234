// faultline run: boot the test guest, run a workload, print its report.
#include <chrono>
#include <cstdio>
#include <string>

#include <fmt/format.h>

#include "src/vmm/vm.h"
#include "tools/faultline/cli_util.h"
#include "tools/faultline/commands.h"

namespace faultline::cli {
namespace {

struct RunOptions {
  std::string guest = FAULTLINE_DEFAULT_GUEST;
  std::string mem = "1G";
  uint32_t vcpus = 1;
  std::string workload = "verify";
  double duration_s = 0;
  double timeout_s = 0;
  std::string backing = "anon";
  bool json = false;
  bool quiet = false;
};

int Fail(const Status& status) {
  fmt::print(stderr, "faultline run: error: {}\n", status.ToString());
  return 1;
}

int Run(const RunOptions& o) {
  vmm::VmConfig config;
  config.guest_path = o.guest;
  Result<uint64_t> mem = ParseSize(o.mem);
  if (!mem.has_value()) return Fail(mem.error().WithContext("--mem"));
  config.mem_size = *mem;
  config.vcpus = o.vcpus;
  Result<Backing> backing = ParseBacking(o.backing);
  if (!backing.has_value()) return Fail(backing.error().WithContext("--backing"));
  config.backing = *backing;
  Result<std::string> args = WorkloadToGuestArgs(o.workload, o.duration_s);
  if (!args.has_value()) return Fail(args.error().WithContext("--workload"));
  config.guest_args = *args;
  if (!o.quiet) {
    config.serial = [](const std::string& line) { fmt::print(stderr, "guest| {}\n", line); };
  }

  auto start = std::chrono::steady_clock::now();
  Result<std::unique_ptr<vmm::Vm>> vm = vmm::Vm::Create(config);
  if (!vm.has_value()) return Fail(vm.error());
  if (Status s = (*vm)->Start(); !s.ok()) return Fail(s);
  // Without an explicit timeout: generous for a fill and verify of 16 GiB on
  // these machines, plus the requested duration.
  double timeout = o.timeout_s > 0 ? o.timeout_s : 300 + o.duration_s * 2;
  Result<GuestReport> report =
      (*vm)->Wait(std::chrono::milliseconds(static_cast<int64_t>(timeout * 1000)));
  if (!report.has_value()) return Fail(report.error());
  double elapsed_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  if (o.json) {
    nlohmann::json j = ReportToJson(*report);
    j["elapsed_ms"] = elapsed_ms;
    j["mem_bytes"] = config.mem_size;
    j["backing"] = BackingName(config.backing);
    fmt::print("{}\n", j.dump());
  } else {
    fmt::print("{}", FormatReport(*report));
    fmt::print("elapsed {:.0f} ms ({} MiB, {} vCPUs, {} backing)\n", elapsed_ms,
               config.mem_size >> 20, config.vcpus, BackingName(config.backing));
  }
  if (report->success()) return 0;
  for (size_t i = 0; i < report->vcpus.size(); ++i) {
    const GuestVcpuReport& v = report->vcpus[i];
    if (v.panic) fmt::print(stderr, "faultline run: vcpu {}: guest {}\n", i, *v.panic);
  }
  fmt::print(stderr, "faultline run: the guest reported failure ({} bad pages)\n",
             report->bad_page_count());
  return 1;
}

}  // namespace

void AddRunCommand(CLI::App& app, Action& action) {
  auto options = std::make_shared<RunOptions>();
  CLI::App* run =
      app.add_subcommand("run", "Boot the test guest, run a workload, print its report");
  run->add_option("--guest", options->guest, "Guest ELF image (default: the one the build made)");
  run->add_option("--mem", options->mem, "Guest RAM, e.g. 1G (multiple of 2M, 64M..16G)")
      ->capture_default_str();
  run->add_option("--vcpus", options->vcpus, "Number of vCPUs, 1..8")->capture_default_str();
  run->add_option("--workload", options->workload,
                  "NAME[,key=value...]: verify, fill, random, hotset, touch, triplefault; "
                  "options go to the guest (rate=MiBps, ops=N, hot_pages=N, seed=N)")
      ->capture_default_str();
  run->add_option("--duration", options->duration_s, "Seconds for random/hotset phases");
  run->add_option("--backing", options->backing, "RAM backing: anon, memfd, hugetlb, gmem")
      ->capture_default_str();
  run->add_option("--timeout", options->timeout_s, "Give up after this many seconds");
  run->add_flag("--json", options->json, "Print one JSON object on stdout");
  run->add_flag("--quiet", options->quiet, "Do not echo the guest console");
  run->callback([options, &action] { action = [options] { return Run(*options); }; });
}

}  // namespace faultline::cli
