// Live migration between two reference VMs in this process over loopback
// TCP: the test guest keeps writing random pages (with its ledger) while
// pre-copy runs, is paused for the final pass, continues on the destination
// and verifies every page there. And: a link cut before the switchover
// leaves the source running its guest to a correct end.
#include <algorithm>
#include <chrono>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "guest/abi.h"
#include "src/migration/destination.h"
#include "src/migration/fault_transport.h"
#include "src/migration/socket_transport.h"
#include "src/migration/source.h"
#include "src/vmm/vm.h"
#include "src/vmm/vm_adapter.h"
#include "tests/integration/test_accel.h"

namespace faultline::migration {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;

vmm::VmConfig GuestConfig(std::optional<DirtyLogMode> mode) {
  vmm::VmConfig c;
  c.accel = itest::TestAccelChoice();
  c.mem_size = 256ull << 20;
  c.vcpus = 2;
  c.guest_args = "workload=fill,random,verify until_command=1 rate=64 quiet=1";
  c.dirty_mode = mode;
  return c;
}

// Waits until every vCPU has reported the end of its fill phase: from then
// on pass 0 carries the guest's data, not zero pages. A fixed sleep is not
// enough on a software CPU under the sanitizers.
void WaitForFill(const vmm::Vm& vm) {
  const auto deadline = std::chrono::steady_clock::now() + 120s;
  for (;;) {
    const GuestReport report = vm.report();
    const bool filled =
        report.vcpus.size() == 2 &&
        std::all_of(report.vcpus.begin(), report.vcpus.end(), [](const GuestVcpuReport& v) {
          return std::any_of(v.phases.begin(), v.phases.end(), [](const GuestPhase& p) {
            return p.phase == static_cast<uint32_t>(GuestPhaseKind::kFill);
          });
        });
    if (filled) return;
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "the guest did not fill its memory";
    std::this_thread::sleep_for(20ms);
  }
}

struct Result2 {
  Result<SourceStats> source = Error("not run");
  Result<DestinationStats> destination = Error("not run");
};

Result2 Migrate(vmm::Vm& from, vmm::Vm& to, SourceOptions options,
                std::shared_ptr<FaultController> link = nullptr) {
  auto listener = SocketListener::Listen(Address{"tcp", "127.0.0.1", 0}, {});
  EXPECT_TRUE(listener.has_value());
  std::unique_ptr<Connector> connector = std::make_unique<SocketConnector>(
      Address{"tcp", "127.0.0.1", (*listener)->port()}, TransportOptions{});
  if (link) connector = std::make_unique<FaultyConnector>(std::move(connector), link);
  auto source_vm = vmm::MakeSourceVm(from);
  auto destination_vm = vmm::MakeDestinationVm(to);
  MigrationSource source(*source_vm, options);
  MigrationDestination destination(*destination_vm, {});
  Result2 r;
  std::thread receiver([&] { r.destination = destination.Run(**listener); });
  r.source = source.Run(*connector);
  receiver.join();
  return r;
}

class MigrationTest : public ::testing::TestWithParam<DirtyLogMode> {};

TEST_P(MigrationTest, RunningGuestContinuesOnTheDestination) {
  if (GetParam() != DirtyLogMode::kUffdWp) FAULTLINE_SKIP_UNLESS_KVM("KVM's dirty log");
  const vmm::VmConfig config = GuestConfig(GetParam());
  auto from = vmm::Vm::Create(config);
  ASSERT_TRUE(from.has_value()) << from.error().ToString();
  vmm::VmConfig incoming = config;
  incoming.boot = false;
  auto to = vmm::Vm::Create(incoming);
  ASSERT_TRUE(to.has_value()) << to.error().ToString();

  ASSERT_TRUE((*from)->Start().ok());
  ASSERT_NO_FATAL_FAILURE(WaitForFill(**from));
  std::this_thread::sleep_for(100ms);  // random writes under way
  const GuestReport before = (*from)->report();

  SourceOptions options;
  options.page_channels = 3;
  options.downtime_target = 50ms;
  Result2 r = Migrate(**from, **to, options);
  ASSERT_TRUE(r.source.has_value()) << r.source.error().ToString();
  ASSERT_TRUE(r.destination.has_value()) << r.destination.error().ToString();
  const SourceStats& s = *r.source;
  RecordProperty("passes", static_cast<int>(s.passes.size()));
  RecordProperty("downtime_us", static_cast<int>(s.downtime.count()));
  for (const PassStats& p : s.passes) {
    fmt::print("pass {}: {} data + {} zero pages in {:.3f} s, {} dirty after\n", p.pass,
               p.data_pages, p.zero_pages, p.seconds, p.dirty_after);
  }
  fmt::print("downtime {:.1f} ms, total {:.2f} s, {:.1f} MiB on the wire\n",
             s.downtime.count() / 1e3, s.total.count() / 1e6, s.bytes_sent / 1048576.0);
  EXPECT_GE(s.passes.size(), 2u);
  (*from)->Stop();
  from->reset();

  ASSERT_TRUE((*to)->Start().ok());
  std::this_thread::sleep_for(300ms);
  (*to)->SetGuestCommand(FL_CMD_STOP);
  Result<GuestReport> report = (*to)->Wait(180s);
  ASSERT_TRUE(report.has_value()) << report.error().ToString();
  EXPECT_TRUE(report->success());
  EXPECT_EQ(report->bad_page_count(), 0u);
  for (uint32_t i = 0; i < 2; ++i) {
    EXPECT_TRUE(before.vcpus[i].booted);
    EXPECT_TRUE(report->vcpus[i].done);
    EXPECT_EQ(report->vcpus[i].bad_pages, 0u);
    // Every workload page was verified on the destination.
    EXPECT_EQ(report->vcpus[i].pages_verified, before.vcpus[i].pages);
  }
}

INSTANTIATE_TEST_SUITE_P(DirtyLog, MigrationTest,
                         ::testing::Values(DirtyLogMode::kBitmap, DirtyLogMode::kRing,
                                           DirtyLogMode::kUffdWp),
                         [](const auto& info) {
                           std::string name = DirtyLogModeName(info.param);
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

TEST(MigrationFailureTest, CutBeforeSwitchoverSourceGuestFinishes) {
  const vmm::VmConfig config = GuestConfig(std::nullopt);
  auto from = vmm::Vm::Create(config);
  ASSERT_TRUE(from.has_value()) << from.error().ToString();
  vmm::VmConfig incoming = config;
  incoming.boot = false;
  auto to = vmm::Vm::Create(incoming);
  ASSERT_TRUE(to.has_value()) << to.error().ToString();
  ASSERT_TRUE((*from)->Start().ok());
  ASSERT_NO_FATAL_FAILURE(WaitForFill(**from));

  FaultPlan plan;
  plan.cut_after_bytes_sent = 8 << 20;  // well inside pass 0 (256 MiB of data)
  SourceOptions options;
  options.page_channels = 2;
  Result2 r = Migrate(**from, **to, options, FaultController::Create(plan));
  ASSERT_FALSE(r.source.has_value());
  EXPECT_THAT(r.source.error().ToString(), HasSubstr("the VM kept running here"));
  EXPECT_FALSE(r.destination.has_value());
  to->reset();

  // The source guest never stopped and still verifies all of its memory.
  (*from)->SetGuestCommand(FL_CMD_STOP);
  Result<GuestReport> report = (*from)->Wait(180s);
  ASSERT_TRUE(report.has_value()) << report.error().ToString();
  EXPECT_TRUE(report->success());
  EXPECT_EQ(report->bad_page_count(), 0u);
}

}  // namespace
}  // namespace faultline::migration
