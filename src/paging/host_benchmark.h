// The demand-paging benchmark with host threads standing in for vCPUs, in
// the manner of the kernel's demand_paging_test: a block with nothing
// present, N threads, each touching every page of its 1/N of the block
// once. `faultline bench paging --driver host` runs it; the guest driver
// (real vCPUs) lives with the CLI, which may depend on the VMM.
#pragma once

#include <chrono>
#include <cstdint>
#include <vector>

#include "faultline/ram_block.h"
#include "faultline/status.h"
#include "src/paging/fault_metrics.h"
#include "src/paging/installer.h"

namespace faultline::paging {

struct PagingBenchConfig {
  InstallerKind installer = InstallerKind::kMove;
  Backing backing = Backing::kAnonymous;
  uint32_t threads = 2;  // "vCPUs"
  uint64_t mem = 1ull << 30;
  uint32_t queues_per_block = 0;  // 0: one per thread
  uint32_t threads_per_queue = 1;
  std::chrono::nanoseconds source_delay{0};  // per fetch
  uint32_t source_threads = 1;               // completing delayed fetches
};

struct PagingBenchRun {
  std::vector<double> thread_pages_per_sec;  // each thread's pages over its own time
  double pages_per_sec = 0;                  // all pages over the wall time
  double seconds = 0;
  uint64_t pages = 0;        // 4 KiB pages touched
  uint64_t wrong_pages = 0;  // pages whose content was not the source's
  PagingStats stats;         // stats.latency: the pager's service time per fault
  LatencySummary observed;   // each access as the touching thread saw it
};

// One run. The zero installer gives the floor (no source work).
Result<PagingBenchRun> RunHostPagingBench(const PagingBenchConfig& config);

}  // namespace faultline::paging
