// Fault metrics: how many faults each vCPU took, how long the pager took to
// serve them (one latency histogram per vCPU), how fast pages went in and
// how many bytes were copied to get them there.
//
// Fault latency is what the faulting thread sees of the pager: from the
// moment a handler read its fault message to the moment the unit was
// installed (or found installed, poisoned or discarded) and the thread
// woken. Every fault counts once, by the vCPU of the thread that faulted
// (ThreadRegistry; "other" for threads not in it):
//   - the fault that started a fetch: until its install;
//   - a joined fault (a second thread faulting on a unit whose fetch a
//     fault, a push or the VMM already started): until that fetch's
//     install, which wakes it too. Its handler leaves an entry in a small
//     lock-free table (Join) and the thread that settles the unit takes it
//     (Settled); if the unit settled before the entry was visible, the
//     joiner takes its own entry back (JoinSettled). Either way exactly one
//     of them records it: both sides publish, then fence (seq_cst), then
//     look at the other's side. If the table is full the fault is counted
//     in faults_unmeasured and has no latency sample;
//   - a fault on a unit already installed or poisoned: until it is woken.
// For the hole installer (memslot holes) the vCPU's own exit is timed, from
// the exit to the completed access, joins included (GuestPager::OnMmio).
// The time a fault waits in the kernel before a handler reads it is not
// seen from here. A latency sample's sum over all faults is the time
// threads were blocked on paging (PagingStats::blocked_seconds).
//
// Memory: a LatencyHistogram is ~5.8 KB of atomics; FaultMetrics keeps
// kMaxThreads + 1 of them (~380 KB) on the heap, once per pager. Snapshots
// hold only their summaries.
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
#include <memory>
#include <string>
#include <vector>

namespace faultline::paging {

struct LatencySummary {
  uint64_t count = 0;
  double p50_us = 0;
  double p90_us = 0;
  double p99_us = 0;
  double max_us = 0;
  double total_us = 0;  // the sum of every value
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
  std::atomic<uint64_t> sum_{0};
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
  uint64_t realtime_threads = 0;       // handler threads running SCHED_FIFO
  std::vector<uint64_t> vcpu_faults;   // by vCPU index
  uint64_t other_faults = 0;           // threads not in the registry
  std::vector<uint64_t> queue_faults;  // by fault queue (userfaultfd)
  // Fault latency (see the top of this file): over every fault, by vCPU
  // index (as vcpu_faults, same length), and of the other threads.
  LatencySummary latency;
  std::vector<LatencySummary> vcpu_latency;
  LatencySummary other_latency;
  uint64_t faults_unmeasured = 0;  // joined faults the join table had no room for
  double active_seconds = 0;       // first fault or fetch -> last install

  // Time threads spent blocked on faults, summed over the faults.
  double blocked_seconds() const { return latency.total_us / 1e6; }

  double pages_per_sec(uint64_t page_size) const;
  // Extra bytes the installer copied per 4 KiB page it installed: 4096 for
  // UFFDIO_COPY, 0 when the data was received in place.
  double bytes_copied_per_page() const;
  std::string ToString() const;
};

class FaultMetrics {
 public:
  // A faulting thread's slot: its vCPU index, or kOtherSlot.
  static constexpr uint32_t kOtherSlot = ThreadRegistry::kMaxThreads;
  // Joined faults waiting at once, at most (a thread waits on one fault at
  // a time, so this is a bound on faulting threads, with room to spare).
  static constexpr uint32_t kJoinSlots = 128;
  static constexpr uint32_t kNoTicket = ~uint32_t{0};

  explicit FaultMetrics(const ThreadRegistry* threads);
  FaultMetrics(const FaultMetrics&) = delete;
  FaultMetrics& operator=(const FaultMetrics&) = delete;

  // Returns the new queue's index.
  uint32_t AddQueue();

  // Counts a fault by thread `tid` read from queue `queue`; returns the
  // thread's slot, for Latency and Join.
  uint32_t Fault(uint32_t queue, pid_t tid);
  void Installed(uint64_t bytes, uint64_t bytes_copied, bool zero);
  // A fault of `slot` was served after `ns`.
  void Latency(uint32_t slot, uint64_t ns);
  void Activity();  // a fault or fetch began: starts the active clock

  // Joined faults (see the top of this file). `key` names the unit (its
  // host address: unique within a pager, never 0 or 1). Join publishes the
  // fault and returns a ticket (kNoTicket: no room, not measured); the
  // caller then looks at the unit's state once more and, if it is settled
  // already, calls JoinSettled. Settled is called by whoever settles a
  // unit, after the state change is stored; it records every fault joined
  // on it.
  uint32_t Join(uint64_t key, uint32_t slot, uint64_t read_ns);
  void JoinSettled(uint32_t ticket, uint64_t key);
  void Settled(uint64_t key);

  static uint64_t NowNs();
  static uint64_t Ns(std::chrono::steady_clock::time_point t);

  struct Counter {
    alignas(64) std::atomic<uint64_t> value{0};
    void Add(uint64_t n = 1) { value.fetch_add(n, std::memory_order_relaxed); }
    uint64_t Get() const { return value.load(std::memory_order_relaxed); }
  };
  Counter faults_joined, faults_spurious, faults_on_present, fetches, fetch_retries, pushes,
      vmm_fetches, bytes_fetched, already_present, install_retries, poisoned, remove_events, errors,
      faults_unmeasured, realtime_threads;

  PagingStats Snapshot() const;

 private:
  // A joined fault. `key`: 0 free; 1 held by the thread filling or taking
  // it; otherwise published for that unit. read_ns and slot are written
  // and read only by the holder (ordered by the key's release/acquire).
  struct Waiter {
    std::atomic<uint64_t> key{0};
    uint64_t read_ns = 0;
    uint32_t slot = 0;
  };
  static constexpr uint64_t kFree = 0, kHeld = 1;
  // Takes waiter `w` if it is still published for `key`, records it.
  void Take(Waiter& w, uint64_t key, uint64_t now_ns);

  const ThreadRegistry* threads_;
  std::array<Counter, ThreadRegistry::kMaxThreads + 1> vcpu_faults_{};  // last: other
  std::array<Counter, 64> queue_faults_{};
  std::atomic<uint32_t> queues_{0};
  Counter units_, bytes_, copied_, zeros_;
  // kMaxThreads + 1 histograms, by slot (last: other); on the heap.
  std::unique_ptr<LatencyHistogram[]> latency_;
  std::unique_ptr<Waiter[]> waiters_;  // kJoinSlots
  std::atomic<uint32_t> waiting_{0};   // waiters published or being filled
  std::atomic<uint64_t> first_ns_{0};
  std::atomic<uint64_t> last_ns_{0};
};

}  // namespace faultline::paging
