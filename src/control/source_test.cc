// SourceMigrationControl over the real pre-copy engine and loopback TCP, with
// small in-memory VMs on both sides (no /dev/kvm).
#include "src/control/source.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/control/args.h"
#include "src/migration/destination.h"
#include "src/migration/socket_transport.h"

namespace faultline::control {
namespace {

using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kSize = 8 << 20;

std::shared_ptr<RamBlock> MakeBlock() {
  Result<std::shared_ptr<RamBlock>> block = RamBlock::Create({.name = "ram0", .size = kSize});
  EXPECT_TRUE(block.has_value()) << block.error().ToString();
  return *block;
}

// A guest that does not run: memory with a pattern, nothing ever dirty.
class StillVm final : public migration::SourceVm, public migration::DestinationVm {
 public:
  StillVm() : block_(MakeBlock()) {}
  void Fill() {
    for (uint64_t i = 0; i < kSize; i += 8) {
      uint64_t v = i * 0x9e3779b97f4a7c15ull + 1;
      std::memcpy(block_->host() + i, &v, sizeof(v));
    }
  }
  bool SameMemory(const StillVm& other) const {
    return std::memcmp(block_->host(), other.block_->host(), kSize) == 0;
  }
  std::vector<std::shared_ptr<RamBlock>> blocks() override { return {block_}; }
  Status StartDirtyTracking() override { return Status::Ok(); }
  Status StopDirtyTracking() override { return Status::Ok(); }
  Status TakeDirty(const RamBlock& block, DirtyBitmap& out) override {
    out = DirtyBitmap(block.size() / 4096);
    return Status::Ok();
  }
  void Pause() override { paused = true; }
  void Resume() override { paused = false; }
  Result<std::vector<std::vector<uint8_t>>> SaveVcpus() override {
    return std::vector<std::vector<uint8_t>>{{1, 2, 3}};
  }
  uint32_t vcpu_count() const override { return 1; }
  Result<std::vector<migration::DeviceBlob>> SaveDevices() override {
    return std::vector<migration::DeviceBlob>{};
  }
  bool memory_is_zero() const override { return false; }
  Status LoadVcpus(std::span<const std::vector<uint8_t>> states) override {
    loaded = states.size();
    return Status::Ok();
  }
  Status LoadDevices(std::span<const migration::DeviceBlob>) override { return Status::Ok(); }

  std::atomic<bool> paused{false};
  size_t loaded = 0;

 private:
  std::shared_ptr<RamBlock> block_;
};

// A destination listening on loopback, receiving on a thread of its own.
class Destination {
 public:
  explicit Destination(StillVm& vm) : destination_(vm, Options()) {
    auto listener = migration::SocketListener::Listen({"tcp", "127.0.0.1", 0}, {});
    EXPECT_TRUE(listener.has_value());
    port_ = (*listener)->port();
    listener_ = std::move(*listener);
    thread_ = std::thread([this] { result_ = destination_.Run(*listener_); });
  }
  ~Destination() {
    destination_.Cancel();
    thread_.join();
  }
  MigrateRequest Request() const {
    MigrateRequest r;
    r.to = {"127.0.0.1", port_};
    r.channels = 2;
    return r;
  }

 private:
  static migration::DestinationOptions Options() {
    migration::DestinationOptions o;
    o.accept.timeout = std::chrono::seconds(10);
    return o;
  }
  migration::MigrationDestination destination_;
  std::unique_ptr<migration::SocketListener> listener_;
  uint16_t port_ = 0;
  std::thread thread_;
  Result<migration::DestinationStats> result_ = Status(0, "not finished");
};

// Polls until a terminal phase; records every phase seen.
MigrationStatus WaitForEnd(SourceMigrationControl& control, std::vector<MigrationStatus>* seen) {
  auto deadline = Clock::now() + std::chrono::seconds(60);
  for (;;) {
    MigrationStatus s = control.Query();
    if (seen) seen->push_back(s);
    if (IsTerminal(s.phase) || Clock::now() > deadline) return s;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

TEST(SourceMigrationControlTest, MigratesAndReportsCompletion) {
  StillVm from, to;
  from.Fill();
  Destination destination(to);
  std::atomic<int> done{0};
  SourceMigrationControl::Options options;
  options.on_done = [&](migration::SourceOutcome o) {
    if (o == migration::SourceOutcome::kCompleted) done.fetch_add(1);
  };
  SourceMigrationControl control(from, options);
  EXPECT_EQ(control.Query().phase, MigrationPhase::kNone);
  ASSERT_TRUE(control.Start(destination.Request()).ok());
  MigrationStatus s = WaitForEnd(control, nullptr);
  ASSERT_EQ(s.phase, MigrationPhase::kCompleted) << s.error;
  EXPECT_TRUE(from.SameMemory(to));
  EXPECT_TRUE(from.paused);  // the destination runs the guest now
  EXPECT_EQ(s.bytes_total, kSize);
  EXPECT_EQ(s.bytes_sent, kSize);  // one full pass, an empty final pass
  EXPECT_EQ(s.pass, 2u);
  EXPECT_TRUE(s.downtime_ms.has_value());
  EXPECT_DOUBLE_EQ(s.Percent(), 100.0);
  EXPECT_EQ(done.load(), 1);
  EXPECT_EQ(control.Cancel().code(), EBUSY);  // nothing active
}

TEST(SourceMigrationControlTest, ThrottledMigrationShowsProgressAndCancels) {
  StillVm from, to;
  from.Fill();
  Destination destination(to);
  SourceMigrationControl control(from, {});
  MigrateRequest request = destination.Request();
  request.bandwidth_bytes_per_sec = 4 << 20;  // 8 MiB takes about 2 s
  ASSERT_TRUE(control.Start(request).ok());
  EXPECT_EQ(control.Start(request).code(), EBUSY);
  MigrationStatus s;
  auto deadline = Clock::now() + std::chrono::seconds(10);
  do {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    s = control.Query();
  } while (s.bytes_sent < kSize / 4 && Clock::now() < deadline);
  EXPECT_EQ(s.phase, MigrationPhase::kPrecopy);
  EXPECT_EQ(s.pass, 1u);
  EXPECT_GT(s.Percent(), 0.0);
  EXPECT_LT(s.Percent(), 100.0);
  EXPECT_GT(s.bandwidth_bytes_per_sec, 0u);
  EXPECT_TRUE(s.eta_ms.has_value());
  ASSERT_TRUE(control.Cancel().ok());
  s = WaitForEnd(control, nullptr);
  EXPECT_EQ(s.phase, MigrationPhase::kCancelled);
  EXPECT_FALSE(from.paused);  // cancelled before the pause: it kept running
}

TEST(SourceMigrationControlTest, UnreachableDestinationFails) {
  StillVm from;
  SourceMigrationControl control(from, {});
  MigrateRequest request;
  request.to = {"127.0.0.1", 1};  // nobody listens on port 1
  ASSERT_TRUE(control.Start(request).ok());
  MigrationStatus s = WaitForEnd(control, nullptr);
  EXPECT_EQ(s.phase, MigrationPhase::kFailed);
  EXPECT_THAT(s.error, HasSubstr("refused"));
}

TEST(SourceMigrationControlTest, RefusesWhatTheEngineCannotDo) {
  StillVm from;
  SourceMigrationControl control(from, {});
  MigrateRequest request;
  request.to = {"example.com", 4444};
  Status s = control.Start(request);
  EXPECT_EQ(ClassifyStatus(s), ControlErrorClass::kInvalidArgument) << s.ToString();
  EXPECT_EQ(control.Query().phase, MigrationPhase::kNone);
}

TEST(SourceMigrationControlTest, PostcopyCommandsNeedAPostcopyMigration) {
  StillVm from;
  SourceMigrationControl control(from, {});
  Status s = control.StartPostcopy();
  EXPECT_EQ(ClassifyStatus(s), ControlErrorClass::kWrongState) << s.ToString();
  EXPECT_THAT(s.message(), HasSubstr("no post-copy migration is active"));
  s = control.Resume(std::nullopt);
  EXPECT_EQ(ClassifyStatus(s), ControlErrorClass::kWrongState) << s.ToString();
  EXPECT_THAT(s.message(), HasSubstr("no paused post-copy migration to resume"));
}

}  // namespace
}  // namespace faultline::control
