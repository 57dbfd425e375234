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
        m.Fault(q, 1);
        m.Latency(1000);
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
