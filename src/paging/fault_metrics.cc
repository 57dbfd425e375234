#include "src/paging/fault_metrics.h"

#include <algorithm>
#include <bit>

#include <fmt/format.h>

namespace faultline::paging {

size_t LatencyHistogram::BucketOf(uint64_t ns) {
  // Values below 2^kSubBits get one bucket each; above, the octave of the
  // leading bit and the kSubBits bits after it pick the bucket.
  if (ns < (1u << kSubBits)) return static_cast<size_t>(ns);
  const int octave = std::bit_width(ns) - 1 - kSubBits;  // >= 0
  if (octave >= kOctaves) return kBuckets - 1;
  const uint64_t sub = (ns >> octave) & ((1u << kSubBits) - 1);
  return (static_cast<size_t>(octave + 1) << kSubBits) + sub;
}

uint64_t LatencyHistogram::BucketMid(size_t bucket) {
  if (bucket < (1u << kSubBits)) return bucket;
  const int octave = static_cast<int>(bucket >> kSubBits) - 1;
  const uint64_t sub = bucket & ((1u << kSubBits) - 1);
  const uint64_t low = ((uint64_t{1} << kSubBits) | sub) << octave;
  return low + ((uint64_t{1} << octave) >> 1);
}

void LatencyHistogram::Record(uint64_t ns) {
  buckets_[BucketOf(ns)].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(ns, std::memory_order_relaxed);
  uint64_t max = max_.load(std::memory_order_relaxed);
  while (ns > max && !max_.compare_exchange_weak(max, ns, std::memory_order_relaxed)) {
  }
}

void LatencyHistogram::Merge(const LatencyHistogram& other) {
  for (size_t i = 0; i < kBuckets; ++i) {
    buckets_[i].fetch_add(other.buckets_[i].load(std::memory_order_relaxed),
                          std::memory_order_relaxed);
  }
  sum_.fetch_add(other.sum_.load(std::memory_order_relaxed), std::memory_order_relaxed);
  const uint64_t other_max = other.max_.load(std::memory_order_relaxed);
  uint64_t max = max_.load(std::memory_order_relaxed);
  while (other_max > max &&
         !max_.compare_exchange_weak(max, other_max, std::memory_order_relaxed)) {
  }
}

uint64_t LatencyHistogram::count() const {
  uint64_t n = 0;
  for (const auto& b : buckets_) n += b.load(std::memory_order_relaxed);
  return n;
}

uint64_t LatencyHistogram::Percentile(double fraction) const {
  const uint64_t total = count();
  if (total == 0) return 0;
  const auto rank = static_cast<uint64_t>(fraction * static_cast<double>(total - 1)) + 1;
  uint64_t seen = 0;
  for (size_t i = 0; i < kBuckets; ++i) {
    seen += buckets_[i].load(std::memory_order_relaxed);
    if (seen >= rank) {
      return std::min(BucketMid(i), max_.load(std::memory_order_relaxed));
    }
  }
  return max_.load(std::memory_order_relaxed);
}

LatencySummary LatencyHistogram::Summarize() const {
  LatencySummary s;
  s.count = count();
  s.p50_us = static_cast<double>(Percentile(0.50)) / 1e3;
  s.p90_us = static_cast<double>(Percentile(0.90)) / 1e3;
  s.p99_us = static_cast<double>(Percentile(0.99)) / 1e3;
  s.max_us = static_cast<double>(max_.load(std::memory_order_relaxed)) / 1e3;
  s.total_us = static_cast<double>(sum_.load(std::memory_order_relaxed)) / 1e3;
  return s;
}

void ThreadRegistry::Add(pid_t tid, uint32_t vcpu) {
  const uint32_t slot = used_.fetch_add(1, std::memory_order_relaxed);
  if (slot >= kMaxThreads) return;  // attributed to "other"
  vcpus_[slot].store(static_cast<int>(vcpu), std::memory_order_release);
  tids_[slot].store(tid, std::memory_order_release);
}

int ThreadRegistry::Find(pid_t tid) const {
  const uint32_t used = std::min(used_.load(std::memory_order_acquire), kMaxThreads);
  for (uint32_t i = 0; i < used; ++i) {
    if (tids_[i].load(std::memory_order_acquire) == tid) {
      return vcpus_[i].load(std::memory_order_acquire);
    }
  }
  return kUnknown;
}

FaultMetrics::FaultMetrics(const ThreadRegistry* threads)
    : threads_(threads),
      latency_(std::make_unique<LatencyHistogram[]>(kOtherSlot + 1)),
      waiters_(std::make_unique<Waiter[]>(kJoinSlots)) {}

uint64_t FaultMetrics::Ns(std::chrono::steady_clock::time_point t) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count());
}

uint64_t FaultMetrics::NowNs() { return Ns(std::chrono::steady_clock::now()); }

void FaultMetrics::Latency(uint32_t slot, uint64_t ns) {
  latency_[std::min(slot, kOtherSlot)].Record(ns);
}

uint32_t FaultMetrics::Join(uint64_t key, uint32_t slot, uint64_t read_ns) {
  waiting_.fetch_add(1, std::memory_order_seq_cst);
  for (uint32_t i = 0; i < kJoinSlots; ++i) {
    // Start where this slot's last entry probably went: a free entry at once.
    const uint32_t t = (slot * 2 + i) % kJoinSlots;
    Waiter& w = waiters_[t];
    uint64_t expected = kFree;
    if (!w.key.compare_exchange_strong(expected, kHeld, std::memory_order_acquire)) continue;
    w.read_ns = read_ns;
    w.slot = slot;
    w.key.store(key, std::memory_order_release);
    // Published before the caller looks at the unit's state again: pairs
    // with the fence in Settled (the settler then sees this entry, or the
    // caller sees the settled state, or both).
    std::atomic_thread_fence(std::memory_order_seq_cst);
    return t;
  }
  waiting_.fetch_sub(1, std::memory_order_relaxed);
  faults_unmeasured.Add();
  return kNoTicket;
}

void FaultMetrics::Take(Waiter& w, uint64_t key, uint64_t now_ns) {
  uint64_t expected = key;
  if (!w.key.compare_exchange_strong(expected, kHeld, std::memory_order_acquire)) return;
  Latency(w.slot, now_ns > w.read_ns ? now_ns - w.read_ns : 0);
  w.key.store(kFree, std::memory_order_release);
  waiting_.fetch_sub(1, std::memory_order_relaxed);
}

void FaultMetrics::JoinSettled(uint32_t ticket, uint64_t key) {
  if (ticket < kJoinSlots) Take(waiters_[ticket], key, NowNs());
}

void FaultMetrics::Settled(uint64_t key) {
  // After the unit's state was stored: see Join.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (waiting_.load(std::memory_order_relaxed) == 0) return;
  const uint64_t now = NowNs();
  for (uint32_t i = 0; i < kJoinSlots; ++i) {
    if (waiters_[i].key.load(std::memory_order_relaxed) == key) Take(waiters_[i], key, now);
  }
}

uint32_t FaultMetrics::AddQueue() { return queues_.fetch_add(1, std::memory_order_relaxed); }

void FaultMetrics::Activity() {
  uint64_t expected = 0;
  if (first_ns_.load(std::memory_order_relaxed) == 0) {
    first_ns_.compare_exchange_strong(expected, NowNs(), std::memory_order_relaxed);
  }
}

uint32_t FaultMetrics::Fault(uint32_t queue, pid_t tid) {
  Activity();
  const int vcpu = threads_ != nullptr ? threads_->Find(tid) : ThreadRegistry::kUnknown;
  const uint32_t slot = vcpu >= 0 && vcpu < static_cast<int>(ThreadRegistry::kMaxThreads)
                            ? static_cast<uint32_t>(vcpu)
                            : kOtherSlot;
  vcpu_faults_[slot].Add();
  queue_faults_[queue % queue_faults_.size()].Add();
  return slot;
}

void FaultMetrics::Installed(uint64_t bytes, uint64_t bytes_copied, bool zero) {
  units_.Add();
  bytes_.Add(bytes);
  copied_.Add(bytes_copied);
  if (zero) zeros_.Add();
  last_ns_.store(NowNs(), std::memory_order_relaxed);
}

PagingStats FaultMetrics::Snapshot() const {
  PagingStats s;
  s.faults_joined = faults_joined.Get();
  s.faults_spurious = faults_spurious.Get();
  s.faults_on_present = faults_on_present.Get();
  s.fetches = fetches.Get();
  s.fetch_retries = fetch_retries.Get();
  s.pushes = pushes.Get();
  s.vmm_fetches = vmm_fetches.Get();
  s.bytes_fetched = bytes_fetched.Get();
  s.already_present = already_present.Get();
  s.install_retries = install_retries.Get();
  s.poisoned = poisoned.Get();
  s.realtime_threads = realtime_threads.Get();
  s.remove_events = remove_events.Get();
  s.errors = errors.Get();
  s.faults_unmeasured = faults_unmeasured.Get();
  s.units_installed = units_.Get();
  s.bytes_installed = bytes_.Get();
  s.bytes_copied = copied_.Get();
  s.zero_installs = zeros_.Get();
  size_t last_vcpu = 0;
  for (size_t i = 0; i < ThreadRegistry::kMaxThreads; ++i) {
    if (vcpu_faults_[i].Get() != 0) last_vcpu = i + 1;
  }
  LatencyHistogram all;  // ~5.8 KB, for the percentiles over every fault
  for (size_t i = 0; i < last_vcpu; ++i) {
    s.vcpu_faults.push_back(vcpu_faults_[i].Get());
    s.vcpu_latency.push_back(latency_[i].Summarize());
    all.Merge(latency_[i]);
  }
  s.other_faults = vcpu_faults_[kOtherSlot].Get();
  s.other_latency = latency_[kOtherSlot].Summarize();
  all.Merge(latency_[kOtherSlot]);
  s.latency = all.Summarize();
  s.faults = s.other_faults;
  for (uint64_t f : s.vcpu_faults) s.faults += f;
  const uint32_t queues = std::min<uint32_t>(queues_.load(std::memory_order_relaxed),
                                             static_cast<uint32_t>(queue_faults_.size()));
  for (uint32_t q = 0; q < queues; ++q) s.queue_faults.push_back(queue_faults_[q].Get());
  const uint64_t first = first_ns_.load(std::memory_order_relaxed);
  const uint64_t last = last_ns_.load(std::memory_order_relaxed);
  s.active_seconds = first != 0 && last > first ? static_cast<double>(last - first) / 1e9 : 0;
  return s;
}

double PagingStats::pages_per_sec(uint64_t page_size) const {
  if (active_seconds <= 0 || page_size == 0) return 0;
  return static_cast<double>(bytes_installed / page_size) / active_seconds;
}

double PagingStats::bytes_copied_per_page() const {
  const uint64_t pages = bytes_installed / 4096;
  return pages == 0 ? 0 : static_cast<double>(bytes_copied) / static_cast<double>(pages);
}

std::string PagingStats::ToString() const {
  std::string vcpus;
  for (size_t i = 0; i < vcpu_faults.size(); ++i) {
    vcpus += fmt::format("{}vcpu{}={}", i == 0 ? "" : " ", i, vcpu_faults[i]);
  }
  std::string per_vcpu;
  auto add_latency = [&](std::string_view who, const LatencySummary& l) {
    if (l.count == 0) return;
    per_vcpu += fmt::format("; {} p50 {:.1f} us p99 {:.1f} max {:.1f} ({} samples, {:.1f} ms)", who,
                            l.p50_us, l.p99_us, l.max_us, l.count, l.total_us / 1e3);
  };
  for (size_t i = 0; i < vcpu_latency.size(); ++i) {
    add_latency(fmt::format("vcpu{}", i), vcpu_latency[i]);
  }
  add_latency("other", other_latency);
  std::string queues;
  for (size_t i = 0; i < queue_faults.size(); ++i) {
    queues += fmt::format("{}{}", i == 0 ? "" : "/", queue_faults[i]);
  }
  return fmt::format(
      "faults {} ({}; other {}; per queue {}), joined {}, spurious {}, on present {}; fetches {} "
      "(retries {}, "
      "pushes {}, vmm {}); installed {} units, {} MiB, {} zero, {} already present, {} EAGAIN; "
      "poisoned {}; remove events {}; errors {}; latency p50 {:.1f} us p90 {:.1f} p99 {:.1f} "
      "max {:.1f} ({} samples, {} unmeasured, blocked {:.1f} ms{}); {:.0f} 4K-pages/s; {:.0f} "
      "bytes copied per page",
      faults, vcpus.empty() ? "no vCPU" : vcpus, other_faults, queues.empty() ? "-" : queues,
      faults_joined, faults_spurious, faults_on_present, fetches, fetch_retries, pushes,
      vmm_fetches, units_installed, bytes_installed >> 20, zero_installs, already_present,
      install_retries, poisoned, remove_events, errors, latency.p50_us, latency.p90_us,
      latency.p99_us, latency.max_us, latency.count, faults_unmeasured, latency.total_us / 1e3,
      per_vcpu, pages_per_sec(4096), bytes_copied_per_page());
}

}  // namespace faultline::paging
