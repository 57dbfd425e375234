// PagerContext: what every paged block of a DemandPager shares: the page
// source, options, metrics, the errors and poisoned pages seen so far, and
// the count of fetches in flight (which must reach zero before anything a
// completion touches goes away).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "faultline/status.h"
#include "faultline/types.h"
#include "src/paging/fault_metrics.h"
#include "src/paging/page_source.h"
#include "src/sys/mutex.h"

namespace faultline::paging {

// A unit the source could not supply, installed as poison.
struct PoisonedUnit {
  std::string block;    // RAM block name
  uint64_t offset = 0;  // in the block
  uint64_t length = 0;  // the install unit
  Hva hva;              // where a SIGBUS for it will point
  std::string reason;
};

struct PagerOptions {
  // K: userfaultfds per block, each registered over 1/K of it, so that
  // faults on different parts are read and served independently.
  uint32_t queues_per_block = 2;
  uint32_t threads_per_queue = 1;
  // Staging slots per block (copy, move); 0: the installer's default.
  uint32_t staging_slots = 0;
  // Non-zero: the fault handler threads run SCHED_FIFO at this priority
  // (src/sys/sched.h), so that a fault is read at once however busy the
  // CPUs are. Without permission they run as before (see
  // PagingStats::realtime_threads).
  int realtime_priority = 0;
  // A unit whose fetch fails (kFailed) this many times is poisoned.
  uint32_t fetch_attempts = 3;
  // Called (on the installing thread) for each poisoned unit.
  std::function<void(const PoisonedUnit&)> on_poison = nullptr;
  // Called (on the handler thread, before the fetch starts) when a fault on
  // a missing unit starts its fetch: the order in which the guest first
  // touched pages it did not have (a working set). `source_block` is the
  // source's name for the block; offset and length are the unit's bytes.
  std::function<void(uint32_t source_block, uint64_t offset, uint64_t length)> on_demand_fetch =
      nullptr;
  // Called (on the thread that ran into it, no pager lock held) for each
  // error a handler, fetch or install records: ESRCH from an install says
  // that the memory's process has gone (an adopted userfaultfd).
  std::function<void(const Status&)> on_error = nullptr;
};

class PagerContext {
 public:
  PagerContext(std::shared_ptr<PageSource> source, PagerOptions options)
      : source_(std::move(source)), options_(std::move(options)), metrics_(&threads_) {}

  PageSource& source() const { return *source_; }
  const PagerOptions& options() const { return options_; }
  FaultMetrics& metrics() { return metrics_; }
  const FaultMetrics& metrics() const { return metrics_; }
  ThreadRegistry& threads() { return threads_; }

  void RecordError(Status status) {
    metrics_.errors.Add();
    if (options_.on_error) options_.on_error(status);
    sys::MutexLock lock(mu_);
    if (first_error_.ok()) first_error_ = std::move(status);
  }
  Status first_error() const {
    sys::MutexLock lock(mu_);
    return first_error_;
  }
  void RecordPoison(PoisonedUnit unit) {
    metrics_.poisoned.Add();
    if (options_.on_poison) options_.on_poison(unit);
    sys::MutexLock lock(mu_);
    poisoned_.push_back(std::move(unit));
  }
  std::vector<PoisonedUnit> poisoned() const {
    sys::MutexLock lock(mu_);
    return poisoned_;
  }

  void FetchStarted() { inflight_.fetch_add(1, std::memory_order_relaxed); }
  void FetchDone() {
    if (inflight_.fetch_sub(1, std::memory_order_acq_rel) == 1) inflight_.notify_all();
  }
  // Waits until no fetch is in flight.
  void WaitIdle() const {
    for (uint64_t n = inflight_.load(std::memory_order_acquire); n != 0;
         n = inflight_.load(std::memory_order_acquire)) {
      inflight_.wait(n, std::memory_order_acquire);
    }
  }

 private:
  std::shared_ptr<PageSource> source_;
  const PagerOptions options_;
  ThreadRegistry threads_;
  FaultMetrics metrics_;
  std::atomic<uint64_t> inflight_{0};
  mutable sys::Mutex mu_;  // a leaf
  Status first_error_ GUARDED_BY(mu_);
  std::vector<PoisonedUnit> poisoned_ GUARDED_BY(mu_);
};

}  // namespace faultline::paging
