#include "src/paging/host_benchmark.h"

#include <unistd.h>

#include <atomic>
#include <barrier>
#include <cstring>
#include <thread>

#include "src/paging/demand_pager.h"
#include "src/paging/snapshot_page_source.h"
#include "src/sys/mapping.h"

namespace faultline::paging {
namespace {

// The first word of every 4 KiB page names the page; the rest is left as
// it is (zeros), which costs the source the same copy.
uint64_t Tag(uint64_t page) { return page * 0x9e3779b97f4a7c15ull | 1; }

}  // namespace

Result<PagingBenchRun> RunHostPagingBench(const PagingBenchConfig& c) {
  if (c.threads == 0) return Error("bench: at least one thread");
  if (!IsAligned(c.mem, kHugePageSize) || c.mem == 0) {
    return Error("bench: memory size {} is not a non-zero multiple of 2 MiB", c.mem);
  }
  RETURN_IF_ERROR(CheckInstaller(c.installer, c.backing));
  if (c.installer == InstallerKind::kHole) {
    return Error("bench: the hole installer needs vCPUs (--driver guest)");
  }
  const uint64_t pages = c.mem / kPageSize;
  ASSIGN_OR_RETURN(sys::Mapping snapshot, sys::Mapping::Anonymous(c.mem, "bench snapshot"));
  for (uint64_t p = 0; p < pages; ++p) {
    const uint64_t tag = Tag(p);
    std::memcpy(snapshot.data() + p * kPageSize, &tag, sizeof(tag));
  }
  auto source = std::make_shared<SnapshotPageSource>(
      SnapshotPageSource::Options{.delay = c.source_delay, .delay_threads = c.source_threads});
  const uint32_t id = source->AddMemory("bench", {snapshot.data(), c.mem}, nullptr);
  ASSIGN_OR_RETURN(std::shared_ptr<RamBlock> block,
                   RamBlock::Create({.name = "bench", .size = c.mem, .backing = c.backing}));

  PagerOptions options;
  options.queues_per_block = c.queues_per_block != 0 ? c.queues_per_block : c.threads;
  options.threads_per_queue = c.threads_per_queue;
  ASSIGN_OR_RETURN(auto pager, DemandPager::Create(source, options));
  RETURN_IF_ERROR(pager->AddBlock(block, c.installer, id));
  RETURN_IF_ERROR(pager->Start());

  PagingBenchRun run;
  run.pages = pages;
  run.thread_pages_per_sec.resize(c.threads);
  std::atomic<uint64_t> wrong{0};
  LatencyHistogram observed;
  std::barrier start(c.threads + 1);
  std::vector<std::jthread> workers;
  const bool zero = c.installer == InstallerKind::kZero;
  for (uint32_t t = 0; t < c.threads; ++t) {
    workers.emplace_back([&, t] {
      pager->threads().Add(::gettid(), t);
      const uint64_t first = pages * t / c.threads;
      const uint64_t last = pages * (t + 1) / c.threads;
      start.arrive_and_wait();
      const auto begin = std::chrono::steady_clock::now();
      uint64_t bad = 0;
      for (uint64_t p = first; p < last; ++p) {
        const uint64_t word =
            *reinterpret_cast<const volatile uint64_t*>(block->host() + p * kPageSize);
        bad += word != (zero ? 0 : Tag(p));
      }
      const double s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
      run.thread_pages_per_sec[t] = static_cast<double>(last - first) / s;
      wrong += bad;
    });
  }
  start.arrive_and_wait();
  const auto begin = std::chrono::steady_clock::now();
  workers.clear();
  run.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  run.pages_per_sec = static_cast<double>(pages) / run.seconds;
  run.wrong_pages = wrong.load();
  run.stats = pager->stats();
  run.observed = observed.Summarize();
  pager->Stop();
  RETURN_IF_ERROR(pager->first_error());
  return run;
}

}  // namespace faultline::paging
