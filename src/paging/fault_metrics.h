// Fault metrics: how many faults each vCPU took, how long the pager took to
// serve them, how fast pages went in and how many bytes were copied to get
// them there.
//
// Everything here is recorded from several handler and source threads at
// once with relaxed atomics (counters need no ordering among themselves) and
// read by Snapshot() at any time; a snapshot taken while paging runs is
// approximate, one taken after is exact.
#pragma once

#include <sys/types.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace faultline::paging {

struct LatencySummary {
  uint64_t count = 0;
  double p50_us = 0;
  double p90_us = 0;
  double p99_us = 0;
  double max_us = 0;
};

// A log-linear histogram of nanosecond values: 16 buckets per power of two,
// so a percentile is within about 6% of the true value.
class LatencyHistogram {
 public:
  static constexpr int kSubBits = 4;
  static constexpr int kOctaves = 44;  // up to 2^44 ns, about 4.9 hours
  static constexpr size_t kBuckets = (kOctaves + 1) << kSubBits;

  void Record(uint64_t ns);
  void Merge(const LatencyHistogram& other);
  LatencySummary Summarize() const;
  uint64_t count() const;
  // The value below which `fraction` of the recorded values lie (ns).
  uint64_t Percentile(double fraction) const;

 private:
  static size_t BucketOf(uint64_t ns);
  static uint64_t BucketMid(size_t bucket);

  std::array<std::atomic<uint64_t>, kBuckets> buckets_{};
  std::atomic<uint64_t> max_{0};
};

// Maps thread ids (from UFFD_FEATURE_THREAD_ID) to vCPU indices. Lock-free:
// Add() may run while handler threads look threads up.
class ThreadRegistry {
 public:
  static constexpr uint32_t kMaxThreads = 64;
  static constexpr int kUnknown = -1;

  // Attributes faults by thread `tid` to vCPU `vcpu` (< kMaxThreads).
  void Add(pid_t tid, uint32_t vcpu);
  int Find(pid_t tid) const;  // the vCPU index, or kUnknown

 private:
  // Entries are written once each: tid after vcpu, both release.
  std::array<std::atomic<pid_t>, kMaxThreads> tids_{};
  std::array<std::atomic<int>, kMaxThreads> vcpus_{};
  std::atomic<uint32_t> used_{0};
};

// A copy of the counters at one moment.
struct PagingStats {
  uint64_t faults = 0;           // fault messages read (each blocked access)
  uint64_t faults_joined = 0;    // faults on a unit whose fetch was already under way
  uint64_t faults_spurious = 0;  // faults on a unit already installed (woken again)
  // Faults on units the present map marked present: always 0 unless the
  // marking failed (these are also counted in faults_spurious).
  uint64_t faults_on_present = 0;
  uint64_t fetches = 0;          // fetches started (fault, VMM access or push)
  uint64_t fetch_retries = 0;    // fetches repeated after kFailed
  uint64_t pushes = 0;           // fetches started by Push
  uint64_t vmm_fetches = 0;      // fetches started by EnsurePresent
  uint64_t units_installed = 0;  // install units (pages or huge pages) placed
  uint64_t bytes_installed = 0;
  uint64_t bytes_fetched = 0;    // written by the source into installer buffers
  uint64_t bytes_copied = 0;     // copied again by the installer (UFFDIO_COPY)
  uint64_t zero_installs = 0;    // units installed as zeros (discarded, floor)
  uint64_t already_present = 0;  // EEXIST: someone else installed the unit
  uint64_t install_retries = 0;  // EAGAIN: the address space was changing
  uint64_t poisoned = 0;
  uint64_t remove_events = 0;
  uint64_t errors = 0;
  uint64_t realtime_threads = 0;  // handler threads running SCHED_FIFO
  std::vector<uint64_t> vcpu_faults;   // by vCPU index
  uint64_t other_faults = 0;           // threads not in the registry
  std::vector<uint64_t> queue_faults;  // by fault queue (userfaultfd)
  LatencySummary latency;              // fault read -> installed and woken
  double active_seconds = 0;           // first fault or fetch -> last install

  double pages_per_sec(uint64_t page_size) const;
  // Extra bytes the installer copied per 4 KiB page it installed: 4096 for
  // UFFDIO_COPY, 0 when the data was received in place.
  double bytes_copied_per_page() const;
  std::string ToString() const;
};

class FaultMetrics {
 public:
  explicit FaultMetrics(const ThreadRegistry* threads) : threads_(threads) {}

  // Returns the new queue's index.
  uint32_t AddQueue();

  void Fault(uint32_t queue, pid_t tid);
  void Installed(uint64_t bytes, uint64_t bytes_copied, bool zero);
  void Latency(uint64_t ns) { latency_.Record(ns); }
  void Activity();  // a fault or fetch began: starts the active clock

  struct Counter {
    alignas(64) std::atomic<uint64_t> value{0};
    void Add(uint64_t n = 1) { value.fetch_add(n, std::memory_order_relaxed); }
    uint64_t Get() const { return value.load(std::memory_order_relaxed); }
  };
  Counter faults_joined, faults_spurious, faults_on_present, fetches, fetch_retries, pushes,
      vmm_fetches, bytes_fetched, already_present, install_retries, poisoned, remove_events, errors,
      realtime_threads;

  PagingStats Snapshot() const;

 private:
  static uint64_t NowNs();

  const ThreadRegistry* threads_;
  std::array<Counter, ThreadRegistry::kMaxThreads + 1> vcpu_faults_{};  // last: other
  std::array<Counter, 64> queue_faults_{};
  std::atomic<uint32_t> queues_{0};
  Counter units_, bytes_, copied_, zeros_;
  LatencyHistogram latency_;
  std::atomic<uint64_t> first_ns_{0};
  std::atomic<uint64_t> last_ns_{0};
};

}  // namespace faultline::paging
