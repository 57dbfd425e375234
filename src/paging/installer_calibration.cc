#include "src/paging/installer_calibration.h"

#include <fmt/format.h>

#include "src/paging/host_benchmark.h"

namespace faultline::paging {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint64_t kCalibrationBytes = 8ull << 20;

std::vector<InstallerKind> Candidates(Backing backing) {
  switch (backing) {
    case Backing::kAnonymous:
      return {InstallerKind::kCopy, InstallerKind::kMove};
    case Backing::kMemfd:
    case Backing::kHugetlb:
      return {InstallerKind::kCopy, InstallerKind::kContinue};
    case Backing::kGuestMemfd:
      break;
  }
  return {};
}

}  // namespace

InstallerChoice CalibrateInstaller(Backing backing, std::chrono::milliseconds budget) {
  InstallerChoice choice;
  choice.installer = BestInstaller(backing);
  const std::vector<InstallerKind> candidates = Candidates(backing);
  if (candidates.size() < 2) {
    choice.why = fmt::format("{} has one installer", BackingName(backing));
    return choice;
  }
  const auto start = Clock::now();
  for (InstallerKind kind : candidates) choice.trials.push_back({kind, 0, 0});
  std::vector<bool> failed(candidates.size(), false);
  std::string failures;
  // Rounds of every candidate in turn, so that a noisy moment hits all of
  // them alike; at least one round, more while the budget lasts.
  for (int round = 0; round == 0 || Clock::now() - start < budget / 2; ++round) {
    for (size_t i = 0; i < candidates.size(); ++i) {
      if (failed[i]) continue;
      PagingBenchConfig config;
      config.installer = candidates[i];
      config.backing = backing;
      config.threads = 2;
      config.mem = kCalibrationBytes;
      Result<PagingBenchRun> run = RunHostPagingBench(config);
      if (!run.has_value() || run->wrong_pages != 0) {
        failed[i] = true;
        failures += fmt::format("; {} did not run: {}", InstallerName(candidates[i]),
                                run.has_value() ? "wrong pages" : run.error().ToString());
        continue;
      }
      InstallerTrial& t = choice.trials[i];
      t.pages_per_sec = std::max(t.pages_per_sec, run->pages_per_sec);
      ++t.runs;
    }
    if (round >= 20) break;
  }
  choice.milliseconds =
      std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  const InstallerTrial* best = nullptr;
  for (const InstallerTrial& t : choice.trials) {
    if (t.runs > 0 && (best == nullptr || t.pages_per_sec > best->pages_per_sec)) best = &t;
  }
  if (best == nullptr) {
    choice.why = fmt::format("no candidate ran, so the fewest-copies default{}", failures);
    return choice;
  }
  choice.installer = best->installer;
  choice.why = fmt::format("fastest of {} measured on this host in {:.0f} ms{}",
                           choice.trials.size(), choice.milliseconds, failures);
  return choice;
}

}  // namespace faultline::paging
