// The source and destination engines end to end over loopback TCP, with
// fake VMs: anonymous RAM blocks, a "guest" thread that keeps writing pages
// and marking them dirty, and vCPU state as opaque bytes. Covers the pass
// logic, convergence, the switchover and who runs the guest on failure;
// tests/integration/migration_transport_test.cc does the same with real VMs.
#include <atomic>
#include <cerrno>
#include <cstring>
#include <functional>
#include <optional>
#include <random>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/migration/destination.h"
#include "src/migration/fault_transport.h"
#include "src/migration/handshake.h"
#include "src/migration/source.h"
#include "src/migration/test_util.h"
#include "src/sys/mutex.h"

namespace faultline::migration {
namespace {

using ::testing::HasSubstr;

class FakeVm final : public SourceVm, public DestinationVm {
 public:
  FakeVm(uint64_t bytes, uint32_t vcpus) : vcpus_(vcpus) {
    auto block = RamBlock::Create({"ram0", bytes, Backing::kAnonymous});
    EXPECT_TRUE(block.has_value()) << block.error().ToString();
    block_ = *block;
    dirty_ = DirtyBitmap(bytes / kWirePageSize);
  }
  ~FakeVm() override { StopGuest(); }

  // Source side: a guest that writes `pages_per_ms` random pages per ms.
  void StartGuest(uint64_t pages_per_ms, uint64_t seed) {
    guest_ = std::thread([this, pages_per_ms, seed] {
      std::mt19937_64 rng(seed);
      const uint64_t pages = block_->size() / kWirePageSize;
      while (!stop_.load()) {
        {
          sys::MutexLock lock(mu_);
          if (!paused_) {
            for (uint64_t i = 0; i < pages_per_ms; ++i) {
              const uint64_t p = rng() % pages;
              const uint64_t value = rng() | 1;  // never a zero page
              std::memcpy(block_->host() + p * kWirePageSize + (rng() % 512) * 8, &value, 8);
              if (tracking_) dirty_.Set(p);
            }
            ++writes_;
          }
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    });
  }
  void StopGuest() {
    stop_ = true;
    if (guest_.joinable()) guest_.join();
  }
  void Fill(uint64_t seed) {  // every third page zero, the rest patterned
    std::mt19937_64 rng(seed);
    for (uint64_t p = 0; p < block_->size() / kWirePageSize; ++p) {
      if (p % 3 == 0) continue;
      for (uint64_t w = 0; w < kWirePageSize / 8; w += 7) {
        const uint64_t v = rng();
        std::memcpy(block_->host() + p * kWirePageSize + w * 8, &v, 8);
      }
    }
  }
  bool SameMemory(const FakeVm& other) const {
    return std::memcmp(block_->host(), other.block_->host(), block_->size()) == 0;
  }

  // SourceVm
  std::vector<std::shared_ptr<RamBlock>> blocks() override { return {block_}; }
  Status StartDirtyTracking() override {
    sys::MutexLock lock(mu_);
    tracking_ = true;
    dirty_.ClearAll();
    return Status::Ok();
  }
  Status StopDirtyTracking() override {
    sys::MutexLock lock(mu_);
    tracking_ = false;
    return Status::Ok();
  }
  Status TakeDirty(const RamBlock&, DirtyBitmap& out) override {
    sys::MutexLock lock(mu_);
    dirty_.TakeInto(out);
    if (no_dirty_log_) out.SetAll();  // as a guest_memfd block reports itself
    return Status::Ok();
  }
  void Pause() override {
    sys::MutexLock lock(mu_);
    paused_ = true;
    ++pauses_;
  }
  void Resume() override {
    sys::MutexLock lock(mu_);
    paused_ = false;
    ++resumes_;
  }
  Result<std::vector<std::vector<uint8_t>>> SaveVcpus() override {
    std::vector<std::vector<uint8_t>> out;
    for (uint32_t i = 0; i < vcpus_; ++i) out.push_back({0xc0, static_cast<uint8_t>(i), 0xde});
    return out;
  }
  uint32_t vcpu_count() const override { return vcpus_; }
  Result<std::vector<DeviceBlob>> SaveDevices() override {
    return std::vector<DeviceBlob>{{"serial", {1, 2}}};
  }

  // DestinationVm
  bool memory_is_zero() const override { return true; }
  Status LoadVcpus(std::span<const std::vector<uint8_t>> states) override {
    if (refuse_state_) return Error("vCPU 0: KVM_SET_SREGS: Invalid argument");
    loaded_.assign(states.begin(), states.end());
    return Status::Ok();
  }
  Status LoadDevices(std::span<const DeviceBlob> devices) override {
    devices_loaded_ = devices.size();
    return Status::Ok();
  }

  bool paused() {
    sys::MutexLock lock(mu_);
    return paused_;
  }
  bool tracking() {
    sys::MutexLock lock(mu_);
    return tracking_;
  }
  int pauses() {
    sys::MutexLock lock(mu_);
    return pauses_;
  }
  uint64_t writes() {
    sys::MutexLock lock(mu_);
    return writes_;
  }

  bool refuse_state_ = false;
  bool no_dirty_log_ = false;
  std::vector<std::vector<uint8_t>> loaded_;
  size_t devices_loaded_ = 0;

 private:
  const uint32_t vcpus_;
  std::shared_ptr<RamBlock> block_;
  std::thread guest_;
  std::atomic<bool> stop_{false};
  sys::Mutex mu_;  // the guest writes under it
  DirtyBitmap dirty_ GUARDED_BY(mu_);
  bool tracking_ GUARDED_BY(mu_) = false;
  bool paused_ GUARDED_BY(mu_) = false;
  int pauses_ GUARDED_BY(mu_) = 0;
  int resumes_ GUARDED_BY(mu_) = 0;
  uint64_t writes_ GUARDED_BY(mu_) = 0;
};

struct Outcome {
  Result<SourceStats> source = Error("not run");
  Result<DestinationStats> destination = Error("not run");
};

SourceOptions Channels(uint16_t n) {
  SourceOptions o;
  o.page_channels = n;
  return o;
}

struct Knobs {
  std::shared_ptr<FaultController> source_link;           // wraps the source's channels
  std::shared_ptr<FaultController> destination_link;      // wraps the destination's
  std::optional<std::chrono::milliseconds> cancel_after;  // MigrationSource::Cancel()
};

Outcome Migrate(FakeVm& from, FakeVm& to, SourceOptions source_options,
                DestinationOptions destination_options = {}, Knobs knobs = {}) {
  auto listener = SocketListener::Listen(testing::Loopback(), {});
  EXPECT_TRUE(listener.has_value());
  std::unique_ptr<Connector> connector = std::make_unique<SocketConnector>(
      Address{"tcp", "127.0.0.1", (*listener)->port()}, TransportOptions{});
  if (knobs.source_link) {
    connector = std::make_unique<FaultyConnector>(std::move(connector), knobs.source_link);
  }
  std::unique_ptr<Acceptor> acceptor = std::move(*listener);
  if (knobs.destination_link) {
    acceptor = std::make_unique<FaultyAcceptor>(std::move(acceptor), knobs.destination_link);
  }
  destination_options.accept.timeout = std::chrono::seconds(10);
  MigrationDestination destination(to, destination_options);
  MigrationSource source(from, source_options);
  Outcome out;
  std::thread receiver([&] { out.destination = destination.Run(*acceptor); });
  std::thread canceller;
  if (knobs.cancel_after) {
    canceller = std::thread([&] {
      std::this_thread::sleep_for(*knobs.cancel_after);
      source.Cancel();
    });
  }
  out.source = source.Run(*connector);
  receiver.join();
  if (canceller.joinable()) canceller.join();
  return out;
}

TEST(EngineTest, IdleGuestMigratesInOnePassPlusFinal) {
  FakeVm from(64 << 20, 2), to(64 << 20, 2);
  from.Fill(1);
  Outcome r = Migrate(from, to, Channels(3));
  ASSERT_TRUE(r.source.has_value()) << r.source.error().ToString();
  ASSERT_TRUE(r.destination.has_value()) << r.destination.error().ToString();
  EXPECT_TRUE(from.SameMemory(to));
  EXPECT_TRUE(from.paused());  // the destination runs the guest now
  const SourceStats& s = *r.source;
  ASSERT_EQ(s.passes.size(), 2u);  // nothing was dirtied: pass 0, then an empty final pass
  EXPECT_EQ(s.passes[0].data_pages + s.passes[0].zero_pages, (64u << 20) / kWirePageSize);
  EXPECT_EQ(s.passes[0].zero_pages, ((64u << 20) / kWirePageSize + 2) / 3);
  EXPECT_EQ(s.passes[1].data_pages + s.passes[1].zero_pages, 0u);
  EXPECT_EQ(r.destination->data_pages, s.data_pages);
  EXPECT_EQ(r.destination->passes, 2u);
  ASSERT_EQ(to.loaded_.size(), 2u);
  EXPECT_EQ(to.loaded_[1], (std::vector<uint8_t>{0xc0, 1, 0xde}));
  EXPECT_EQ(to.devices_loaded_, 1u);
}

TEST(EngineTest, DirtyingGuestConvergesAndArrivesExactly) {
  FakeVm from(128 << 20, 1), to(128 << 20, 1);
  from.Fill(2);
  ASSERT_TRUE(from.StartDirtyTracking().ok());  // harmless; the source restarts it
  from.StartGuest(20, 3);                       // ~20 pages/ms while running
  SourceOptions options = Channels(4);
  options.downtime_target = std::chrono::milliseconds(1);  // forces dirty passes
  options.batch_pages = 64;
  Outcome r = Migrate(from, to, options);
  from.StopGuest();
  ASSERT_TRUE(r.source.has_value()) << r.source.error().ToString();
  ASSERT_TRUE(r.destination.has_value()) << r.destination.error().ToString();
  EXPECT_GT(from.writes(), 0u);
  EXPECT_GE(r.source->passes.size(), 3u);  // pass 0, at least one dirty pass, final
  EXPECT_TRUE(from.SameMemory(to));        // every write before the pause arrived
}

// Without a dirty log every pass is every page: pre-copy cannot converge,
// so the engine stops iterating after pass 0 and copies the rest stopped.
TEST(EngineTest, BlockWithoutDirtyLogSwitchesOverAfterOnePass) {
  FakeVm from(32 << 20, 1), to(32 << 20, 1);
  from.Fill(5);
  from.no_dirty_log_ = true;
  SourceOptions options = Channels(2);
  options.downtime_target = std::chrono::milliseconds(1);
  Outcome r = Migrate(from, to, options);
  ASSERT_TRUE(r.source.has_value()) << r.source.error().ToString();
  ASSERT_TRUE(r.destination.has_value()) << r.destination.error().ToString();
  ASSERT_EQ(r.source->passes.size(), 2u);  // pass 0, then the final pass
  EXPECT_EQ(r.source->passes[1].data_pages + r.source->passes[1].zero_pages,
            (32u << 20) / kWirePageSize);
  EXPECT_TRUE(from.SameMemory(to));
}

// A guest that dirties as fast as the link sends: the dirty set stops
// shrinking, and the engine switches over instead of running 30 passes.
TEST(EngineTest, DirtySetThatStopsShrinkingSwitchesOver) {
  FakeVm from(32 << 20, 1), to(32 << 20, 1);
  from.Fill(6);
  from.StartGuest(1000, 7);  // far more pages/ms than a 1 ms target allows
  SourceOptions options = Channels(1);
  options.downtime_target = std::chrono::milliseconds(1);
  options.bandwidth_limit = 64 << 20;
  Outcome r = Migrate(from, to, options);
  from.StopGuest();
  ASSERT_TRUE(r.source.has_value()) << r.source.error().ToString();
  ASSERT_TRUE(r.destination.has_value()) << r.destination.error().ToString();
  EXPECT_LT(r.source->passes.size(), 30u);
  EXPECT_TRUE(from.SameMemory(to));
}

TEST(EngineTest, AuthenticatedMigration) {
  FakeVm from(16 << 20, 1), to(16 << 20, 1);
  from.Fill(4);
  SourceOptions source = Channels(2);
  source.key = AuthKey(32, 0x11);
  DestinationOptions destination;
  destination.key = source.key;
  Outcome r = Migrate(from, to, source, destination);
  ASSERT_TRUE(r.source.has_value()) << r.source.error().ToString();
  ASSERT_TRUE(r.destination.has_value()) << r.destination.error().ToString();
  EXPECT_TRUE(from.SameMemory(to));
}

TEST(EngineTest, CutBeforeSwitchoverLeavesTheSourceRunning) {
  FakeVm from(64 << 20, 1), to(64 << 20, 1);
  from.Fill(5);
  FaultPlan plan;
  plan.cut_after_bytes_sent = 8 << 20;
  Knobs knobs;
  knobs.source_link = FaultController::Create(plan);
  Outcome r = Migrate(from, to, Channels(2), {}, knobs);
  ASSERT_FALSE(r.source.has_value());
  EXPECT_THAT(r.source.error().ToString(), HasSubstr("failed; the VM kept running here"));
  EXPECT_THAT(r.source.error().ToString(), HasSubstr("link cut by the test transport"));
  EXPECT_FALSE(r.destination.has_value());
  EXPECT_EQ(from.pauses(), 0);
  EXPECT_FALSE(from.tracking());
}

TEST(EngineTest, DestinationRefusingStateResumesTheSource) {
  FakeVm from(16 << 20, 2), to(16 << 20, 2);
  to.refuse_state_ = true;
  Outcome r = Migrate(from, to, Channels(2));
  ASSERT_FALSE(r.destination.has_value());
  EXPECT_THAT(r.destination.error().ToString(), HasSubstr("loading the migrated state"));
  ASSERT_FALSE(r.source.has_value());
  EXPECT_THAT(r.source.error().ToString(),
              HasSubstr("failed after the pause; the VM was resumed here"));
  EXPECT_THAT(r.source.error().ToString(), HasSubstr("KVM_SET_SREGS: Invalid argument"));
  EXPECT_EQ(from.pauses(), 1);
  EXPECT_FALSE(from.paused());
}

TEST(EngineTest, LinkLostAfterCompleteLeavesTheSourcePaused) {
  FakeVm from(16 << 20, 1), to(16 << 20, 1);
  // The destination sends HelloAck (16 + 96 bytes) and one ChannelAck
  // (16 + 16), then nothing until CompleteAck: break the link right there.
  FaultPlan plan;
  plan.cut_after_bytes_sent = 112 + 32;
  Knobs knobs;
  knobs.destination_link = FaultController::Create(plan);
  Outcome r = Migrate(from, to, Channels(1), {}, knobs);
  // The destination could not confirm, so it must not run the guest ...
  ASSERT_FALSE(r.destination.has_value());
  // ... and the source cannot know that: it stays paused.
  ASSERT_FALSE(r.source.has_value());
  EXPECT_THAT(r.source.error().ToString(), HasSubstr("unknown: the link broke after Complete"));
  EXPECT_TRUE(from.paused());  // never two running copies
}

TEST(EngineTest, CancelDuringPrecopy) {
  FakeVm from(64 << 20, 1), to(64 << 20, 1);
  from.Fill(6);
  SourceOptions options = Channels(2);
  options.bandwidth_limit = 16 << 20;  // ~3 s for pass 0
  Knobs knobs;
  knobs.cancel_after = std::chrono::milliseconds(300);
  Outcome r = Migrate(from, to, options, {}, knobs);
  ASSERT_FALSE(r.source.has_value());
  EXPECT_THAT(r.source.error().ToString(), HasSubstr("the VM kept running here"));
  EXPECT_FALSE(r.destination.has_value());
  EXPECT_EQ(from.pauses(), 0);
}

// A source that breaks the protocol after a valid handshake: the destination
// stops with an error naming the violation and tells the source why.
TEST(EngineTest, HostileSourceIsRefused) {
  const std::vector<uint8_t> page(kWirePageSize, 0x42);
  const ConstBuffer data[] = {page};
  struct Case {
    std::function<Status(Session&)> send;
    std::string error;
  };
  const std::vector<Case> cases = {
      {[&](Session& s) {
         return s.pages[0]->writer().SendPages(PagesHeader{0, 1, 0, {0}}, data);
       },
       "page channel 0: Pages for pass 1 while in pass 0"},
      {[&](Session& s) {
         return s.pages[0]->writer().SendPages(PagesHeader{0, 0, 0, {4096}}, data);
       },
       "Pages: page index 4096 out of range for block 'ram0' (4096 pages)"},
      {[](Session& s) {
         return s.pages[0]->writer().Send(PassEnd{0, 5, 0, 0});
       },
       "PassEnd of pass 0 counts 5 data and 0 zero pages; 0 and 0 arrived"},
      {[](Session& s) {
         return s.main->writer().Send(Switchover{SwitchoverMode::kStopAndCopy, 3, 0, 1, 0});
       },
       "Switchover: final pass 3, but 0 pre-copy passes ended"},
      {[](Session& s) {
         return s.main->writer().Send(VcpuStateMessage{0, {1}});
       },
       "VcpuState not expected on the main channel in phase Precopy"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.error);
    FakeVm to(16 << 20, 1);
    auto listener = SocketListener::Listen(testing::Loopback(), {});
    ASSERT_TRUE(listener.has_value());
    SocketConnector connector(Address{"tcp", "127.0.0.1", (*listener)->port()}, {});
    MigrationDestination destination(to, {});
    Result<DestinationStats> received = Error("not run");
    std::thread receiver([&] { received = destination.Run(**listener); });
    auto session = ConnectSession(connector, {{BlockInfo{"ram0", 16 << 20}}, 1, {}, 0});
    ASSERT_TRUE(session.has_value()) << session.error().ToString();
    ASSERT_TRUE(c.send(*session).ok());
    auto answer = Expect<CompleteAck>(session->main->reader(), "hostile source");
    receiver.join();
    ASSERT_FALSE(received.has_value());
    EXPECT_THAT(received.error().ToString(), HasSubstr(c.error));
    ASSERT_FALSE(answer.has_value());
    EXPECT_THAT(answer.error().ToString(), HasSubstr("peer reported error (code 1)"));
    EXPECT_THAT(answer.error().ToString(), HasSubstr(c.error));
  }
}

}  // namespace
}  // namespace faultline::migration
