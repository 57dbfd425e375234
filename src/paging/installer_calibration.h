// `--installer auto`: which userfaultfd installer pages a backing fastest on
// this host, measured when the destination starts, not assumed. Costs here
// differ from the textbook: on a host whose TLB shootdowns are hypercalls,
// UFFDIO_MOVE reached 0.15x of the zero-page floor on anonymous memory while
// UFFDIO_COPY reached 0.92x; elsewhere MOVE wins. A short run of each
// candidate (host threads, RunHostPagingBench) decides.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "faultline/ram_block.h"
#include "src/paging/installer.h"

namespace faultline::paging {

struct InstallerTrial {
  InstallerKind installer;
  double pages_per_sec = 0;  // best of its runs
  uint32_t runs = 0;
};

struct InstallerChoice {
  InstallerKind installer = InstallerKind::kCopy;
  std::vector<InstallerTrial> trials;  // empty: nothing to choose between
  double milliseconds = 0;             // the calibration's own time
  std::string why;                     // how the choice was made
};

// Candidates for `backing`: copy and move on anon, copy and continue on
// memfd and hugetlb; gmem has only the hole installer. Each candidate runs
// on a small block (8 MiB, 2 threads) in turn, rounds repeated while the
// budget lasts; the fastest wins. A candidate that cannot run (no huge
// pages reserved, say) drops out; if none runs, the fewest-copies default
// (BestInstaller) is chosen and `why` says so.
InstallerChoice CalibrateInstaller(Backing backing,
                                   std::chrono::milliseconds budget = std::chrono::milliseconds(50));

}  // namespace faultline::paging
