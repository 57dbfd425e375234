#include "src/paging/fault_metrics.h"

#include <cmath>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

namespace faultline::paging {
namespace {

TEST(LatencyHistogramTest, EmptyIsZero) {
  LatencyHistogram h;
  LatencySummary s = h.Summarize();
  EXPECT_EQ(s.count, 0u);
  EXPECT_EQ(s.p50_us, 0);
  EXPECT_EQ(s.max_us, 0);
}

TEST(LatencyHistogramTest, PercentilesWithinBucketError) {
  LatencyHistogram h;
  // 1..100,000 ns uniformly: p50 = 50 us, p90 = 90 us, p99 = 99 us.
  for (uint64_t ns = 1; ns <= 100'000; ++ns) h.Record(ns);
  LatencySummary s = h.Summarize();
  EXPECT_EQ(s.count, 100'000u);
  EXPECT_NEAR(s.p50_us, 50.0, 50.0 * 0.07);
  EXPECT_NEAR(s.p90_us, 90.0, 90.0 * 0.07);
  EXPECT_NEAR(s.p99_us, 99.0, 99.0 * 0.07);
  EXPECT_DOUBLE_EQ(s.max_us, 100.0);
}

TEST(LatencyHistogramTest, SmallAndHugeValues) {
  LatencyHistogram h;
  h.Record(0);
  h.Record(3);
  h.Record(uint64_t{1} << 60);  // beyond the last octave: clamped, max exact
  EXPECT_EQ(h.count(), 3u);
  EXPECT_EQ(h.Percentile(0.0), 0u);
  EXPECT_DOUBLE_EQ(h.Summarize().max_us, static_cast<double>(uint64_t{1} << 60) / 1e3);
}

TEST(LatencyHistogramTest, TailIsSeparateFromBulk) {
  LatencyHistogram h;
  for (int i = 0; i < 990; ++i) h.Record(20'000);
  for (int i = 0; i < 10; ++i) h.Record(5'000'000);
  EXPECT_NEAR(h.Summarize().p50_us, 20, 20 * 0.07);
  EXPECT_NEAR(h.Summarize().p90_us, 20, 20 * 0.07);
  EXPECT_NEAR(static_cast<double>(h.Percentile(0.995)) / 1e3, 5000, 5000 * 0.07);
}

TEST(LatencyHistogramTest, MergeAddsCountsAndKeepsMax) {
  LatencyHistogram a, b;
  a.Record(1000);
  b.Record(2000);
  b.Record(7000);
  a.Merge(b);
  EXPECT_EQ(a.count(), 3u);
  EXPECT_DOUBLE_EQ(a.Summarize().max_us, 7.0);
}

TEST(ThreadRegistryTest, FindsRegisteredThreads) {
  ThreadRegistry r;
  EXPECT_EQ(r.Find(123), ThreadRegistry::kUnknown);
  r.Add(123, 0);
  r.Add(456, 1);
  EXPECT_EQ(r.Find(123), 0);
  EXPECT_EQ(r.Find(456), 1);
  EXPECT_EQ(r.Find(789), ThreadRegistry::kUnknown);
}

TEST(FaultMetricsTest, AttributesFaultsToVcpusAndQueues) {
  ThreadRegistry r;
  r.Add(1000, 0);
  r.Add(1001, 1);
  FaultMetrics m(&r);
  const uint32_t q0 = m.AddQueue();
  const uint32_t q1 = m.AddQueue();
  for (int i = 0; i < 3; ++i) m.Fault(q0, 1000);
  for (int i = 0; i < 5; ++i) m.Fault(q1, 1001);
  m.Fault(q1, 4242);
  PagingStats s = m.Snapshot();
  EXPECT_EQ(s.faults, 9u);
  ASSERT_EQ(s.vcpu_faults.size(), 2u);
  EXPECT_EQ(s.vcpu_faults[0], 3u);
  EXPECT_EQ(s.vcpu_faults[1], 5u);
  EXPECT_EQ(s.other_faults, 1u);
  ASSERT_EQ(s.queue_faults.size(), 2u);
  EXPECT_EQ(s.queue_faults[0], 3u);
  EXPECT_EQ(s.queue_faults[1], 6u);
}

TEST(FaultMetricsTest, LatencyIsKeptPerVcpu) {
  ThreadRegistry r;
  r.Add(1000, 0);
  r.Add(1001, 1);
  FaultMetrics m(&r);
  const uint32_t q = m.AddQueue();
  for (int i = 0; i < 3; ++i) m.Latency(m.Fault(q, 1000), 10'000);
  for (int i = 0; i < 5; ++i) m.Latency(m.Fault(q, 1001), 40'000);
  m.Latency(m.Fault(q, 4242), 1'000'000);
  PagingStats s = m.Snapshot();
  ASSERT_EQ(s.vcpu_latency.size(), 2u);
  EXPECT_EQ(s.vcpu_latency[0].count, 3u);
  EXPECT_NEAR(s.vcpu_latency[0].p50_us, 10, 10 * 0.07);
  EXPECT_EQ(s.vcpu_latency[1].count, 5u);
  EXPECT_NEAR(s.vcpu_latency[1].p99_us, 40, 40 * 0.07);
  EXPECT_EQ(s.other_latency.count, 1u);
  EXPECT_DOUBLE_EQ(s.other_latency.max_us, 1000);
  // The total merges them all; its sum is the blocked time.
  EXPECT_EQ(s.latency.count, 9u);
  EXPECT_DOUBLE_EQ(s.latency.max_us, 1000);
  EXPECT_DOUBLE_EQ(s.latency.total_us, 3 * 10 + 5 * 40 + 1000);
  EXPECT_DOUBLE_EQ(s.blocked_seconds(), 1230e-6);
  EXPECT_NE(s.ToString().find("vcpu1 p50"), std::string::npos) << s.ToString();
}

TEST(FaultMetricsTest, JoinedFaultIsTimedByWhoeverSettles) {
  ThreadRegistry r;
  r.Add(1000, 0);
  r.Add(1001, 1);
  FaultMetrics m(&r);
  const uint32_t q = m.AddQueue();
  const uint64_t now = FaultMetrics::NowNs();
  // vCPU 1 joins a fetch of unit 0x5000 still under way: the settling
  // thread records it.
  const uint32_t slot = m.Fault(q, 1001);
  const uint32_t ticket = m.Join(0x5000, slot, now);
  ASSERT_NE(ticket, FaultMetrics::kNoTicket);
  m.Settled(0x6000);  // another unit: not this one's
  EXPECT_EQ(m.Snapshot().latency.count, 0u);
  m.Settled(0x5000);
  PagingStats s = m.Snapshot();
  ASSERT_EQ(s.vcpu_latency.size(), 2u);
  EXPECT_EQ(s.vcpu_latency[1].count, 1u);
  EXPECT_EQ(s.vcpu_latency[0].count, 0u);
  // The joiner, looking again, finds it taken: nothing more.
  m.JoinSettled(ticket, 0x5000);
  m.Settled(0x5000);
  EXPECT_EQ(m.Snapshot().latency.count, 1u);

  // Settled before the joiner's entry was seen: the joiner records it.
  const uint32_t late = m.Join(0x7000, m.Fault(q, 1000), now);
  m.JoinSettled(late, 0x7000);
  m.Settled(0x7000);
  s = m.Snapshot();
  EXPECT_EQ(s.vcpu_latency[0].count, 1u);
  EXPECT_EQ(s.latency.count, 2u);
  EXPECT_EQ(s.faults_unmeasured, 0u);
}

TEST(FaultMetricsTest, FullJoinTableCountsUnmeasuredFaults) {
  FaultMetrics m(nullptr);
  const uint32_t q = m.AddQueue();
  for (uint32_t i = 0; i < FaultMetrics::kJoinSlots; ++i) {
    ASSERT_NE(m.Join(0x1000 * (i + 2), m.Fault(q, 1), 0), FaultMetrics::kNoTicket);
  }
  EXPECT_EQ(m.Join(0x99000, m.Fault(q, 1), 0), FaultMetrics::kNoTicket);
  for (uint32_t i = 0; i < FaultMetrics::kJoinSlots; ++i) m.Settled(0x1000 * (i + 2));
  PagingStats s = m.Snapshot();
  EXPECT_EQ(s.faults_unmeasured, 1u);
  EXPECT_EQ(s.other_latency.count, FaultMetrics::kJoinSlots);
  // Every entry was freed: there is room again.
  EXPECT_NE(m.Join(0x99000, m.Fault(q, 1), 0), FaultMetrics::kNoTicket);
}

TEST(FaultMetricsTest, ConcurrentJoinsAndSettlesRecordEachFaultOnce) {
  // Joiners and settlers race on a few units; each join is recorded
  // exactly once, by one side or the other.
  FaultMetrics m(nullptr);
  const uint32_t q = m.AddQueue();
  constexpr int kRounds = 20'000;
  std::vector<std::atomic<uint8_t>> settled(8);
  std::atomic<bool> stop{false};
  std::jthread settler([&] {
    while (!stop.load()) {
      for (uint64_t u = 0; u < settled.size(); ++u) {
        settled[u].store(1, std::memory_order_release);
        m.Settled(0x1000 * (u + 1));
      }
    }
  });
  std::vector<std::jthread> joiners;
  for (int t = 0; t < 2; ++t) {
    joiners.emplace_back([&, t] {
      for (int i = 0; i < kRounds; ++i) {
        const uint64_t u = static_cast<uint64_t>(i + t) % settled.size();
        const uint32_t ticket = m.Join(0x1000 * (u + 1), m.Fault(q, 1), FaultMetrics::NowNs());
        if (settled[u].load(std::memory_order_acquire) != 0)
          m.JoinSettled(ticket, 0x1000 * (u + 1));
      }
    });
  }
  joiners.clear();
  stop.store(true);
  settler.join();
  for (uint64_t u = 0; u < settled.size(); ++u) m.Settled(0x1000 * (u + 1));
  PagingStats s = m.Snapshot();
  EXPECT_EQ(s.faults, 2u * kRounds);
  EXPECT_EQ(s.latency.count + s.faults_unmeasured, 2u * kRounds);
}

TEST(FaultMetricsTest, BytesCopiedPerPage) {
  FaultMetrics m(nullptr);
  m.Activity();
  for (int i = 0; i < 10; ++i) m.Installed(4096, 4096, false);  // copy
  for (int i = 0; i < 10; ++i) m.Installed(4096, 0, false);     // move
  PagingStats s = m.Snapshot();
  EXPECT_EQ(s.units_installed, 20u);
  EXPECT_DOUBLE_EQ(s.bytes_copied_per_page(), 2048.0);
  EXPECT_GT(s.pages_per_sec(4096), 0.0);
  EXPECT_NE(s.ToString().find("2048 bytes copied per page"), std::string::npos);
}

TEST(FaultMetricsTest, ConcurrentRecording) {
  FaultMetrics m(nullptr);
  const uint32_t q = m.AddQueue();
  std::vector<std::jthread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10'000; ++i) {
        m.Latency(m.Fault(q, 1), 1000);
        m.Installed(4096, 0, false);
      }
    });
  }
  threads.clear();
  PagingStats s = m.Snapshot();
  EXPECT_EQ(s.faults, 40'000u);
  EXPECT_EQ(s.latency.count, 40'000u);
  EXPECT_EQ(s.units_installed, 40'000u);
}

}  // namespace
}  // namespace faultline::paging
