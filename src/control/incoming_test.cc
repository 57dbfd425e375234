// IncomingControl over the real engines and loopback TCP, with in-memory VMs
// on both sides (a GuestMemory each, no /dev/kvm): pre-copy, post-copy with
// a broken link that the source resumes, and the refusals, as `faultline run
// --incoming` and `faultline demo` rely on them.
#include "src/control/incoming.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/memory/guest_memory.h"
#include "src/memory/memslot_backend.h"
#include "src/migration/fault_transport.h"
#include "src/migration/memory_vm.h"
#include "src/migration/postcopy_source.h"
#include "src/migration/socket_transport.h"
#include "src/migration/source.h"
#include "src/sys/mutex.h"

namespace faultline::control {
namespace {

using ::testing::AllOf;
using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr uint64_t kSize = 8 << 20;

// One side's RAM: an anonymous block at GPA 0 of a GuestMemory that tracks
// dirty pages with userfaultfd write-protect (there is no KVM here).
class Ram {
 public:
  explicit Ram(uint64_t bytes = kSize) {
    Result<std::shared_ptr<RamBlock>> block = RamBlock::Create({.name = "ram0", .size = bytes});
    Result<std::unique_ptr<GuestMemory>> memory =
        GuestMemory::Create(&memslots_, {.dirty_mode = DirtyLogMode::kUffdWp});
    if (!block.has_value() || !memory.has_value()) {
      ADD_FAILURE() << "no RAM: " << block.status().ToString() << memory.status().ToString();
      return;
    }
    block_ = std::move(*block);
    memory_ = std::move(*memory);
    EXPECT_TRUE(memory_->Place(block_, Gpa(0)).ok());
  }
  GuestMemory& memory() { return *memory_; }
  void Fill() {
    for (uint64_t i = 0; i < block_->size(); i += 64) {
      const uint64_t v = i * 0x9e3779b97f4a7c15ull + 1;
      std::memcpy(block_->host() + i, &v, sizeof(v));
    }
  }
  bool Same(const Ram& other) const {
    return std::memcmp(block_->host(), other.block_->host(), block_->size()) == 0;
  }

 private:
  VmmOwnedMemslots memslots_;
  std::shared_ptr<RamBlock> block_;
  std::unique_ptr<GuestMemory> memory_;
};

// A VMM's vCPUs and devices that do nothing: a still guest on the source,
// and on the destination a note that the post-copy engine started it.
class FakeControl final : public migration::VmControl {
 public:
  explicit FakeControl(std::atomic<bool>* started = nullptr) : started_(started) {}
  uint32_t vcpu_count() const override { return 1; }
  void Pause() override {}
  void Resume() override {}
  Result<std::vector<std::vector<uint8_t>>> SaveVcpus() override {
    return std::vector<std::vector<uint8_t>>{{0xc0, 0xde}};
  }
  Status LoadVcpus(std::span<const std::vector<uint8_t>>) override { return Status::Ok(); }
  Result<std::vector<migration::DeviceBlob>> SaveDevices() override {
    return std::vector<migration::DeviceBlob>{};
  }
  Status LoadDevices(std::span<const migration::DeviceBlob>) override { return Status::Ok(); }
  bool memory_is_zero() const override { return true; }
  void AttachPager(paging::GuestPager*) override {}
  Status PrepareVcpus(paging::GuestPager&) override { return Status::Ok(); }
  Status Start() override {
    if (started_ != nullptr) *started_ = true;
    return Status::Ok();
  }

 private:
  std::atomic<bool>* const started_;
};

// The destination VMM, as tools/faultline/incoming_vm.h is for the
// reference VMM.
class FakeIncomingVm final : public IncomingVm {
 public:
  explicit FakeIncomingVm(Ram& ram) : ram_(ram) {}
  Backing backing() const override { return Backing::kAnonymous; }
  std::unique_ptr<migration::DestinationVm> MakeDestination() override {
    return migration::MakeMemoryDestination(ram_.memory(), std::make_unique<FakeControl>());
  }
  std::unique_ptr<migration::PostcopyDestinationVm> MakePostcopyDestination(
      migration::PostcopyVmOptions options) override {
    return migration::MakeMemoryPostcopyDestination(
        ram_.memory(), std::make_unique<FakeControl>(&engine_started), std::move(options));
  }
  Status PrepareVcpus() override { return Status::Ok(); }
  Status Start() override {
    ++starts;
    return Status::Ok();
  }

  std::atomic<int> starts{0};               // through Start: pre-copy, local update
  std::atomic<bool> engine_started{false};  // by the post-copy engine

 private:
  Ram& ram_;
};

// A source's RAM `from` and a destination's `to` of the same size (unless a
// test says otherwise), and the destination's IncomingControl listening on
// loopback.
class IncomingControlTest : public ::testing::Test {
 protected:
  // A test that failed half-way leaves no destination waiting.
  ~IncomingControlTest() override {
    if (control_) control_->Cancel();
    if (receiver_.joinable()) receiver_.join();
  }

  // The destination as `options` say, with what it says recorded.
  Status Listen(IncomingOptions options) {
    ASSIGN_OR_RETURN(listener_, migration::SocketListener::Listen({"tcp", "127.0.0.1", 0}, {}));
    options.bytes_total = kSize;
    options.accept_timeout =
        std::min<std::chrono::milliseconds>(options.accept_timeout, std::chrono::seconds(10));
    // Not measured: nothing on stderr, no time spent.
    if (options.installer.empty()) options.installer = "copy";
    options.say = [this](const std::string& line) {
      sys::MutexLock lock(mu_);
      said_.push_back(line);
    };
    control_ = std::make_unique<IncomingControl>(*listener_, std::move(options));
    return control_->Prepare(vm_);
  }
  // Listens, and runs the destination on a thread of its own until
  // Received().
  void StartReceiving(MigrationMode mode) {
    IncomingOptions options;
    options.mode = mode;
    ASSERT_TRUE(Listen(options).ok());
    receiver_ = std::thread([this] { received_ = control_->Run(); });
  }
  Result<IncomingResult> Received() {
    if (receiver_.joinable()) receiver_.join();
    return std::move(received_);
  }
  migration::Address address() const { return {"tcp", "127.0.0.1", listener_->port()}; }
  std::vector<std::string> Said() {
    sys::MutexLock lock(mu_);
    return said_;
  }
  nlohmann::json StatusNow() const { return control_->status()->Status(); }

  Ram from_;
  Ram to_;
  FakeIncomingVm vm_{to_};
  std::unique_ptr<migration::SourceVm> source_vm_ =
      migration::MakeMemorySource(from_.memory(), std::make_unique<FakeControl>());
  std::unique_ptr<migration::SocketListener> listener_;
  std::unique_ptr<IncomingControl> control_;

 private:
  std::thread receiver_;
  Result<IncomingResult> received_ = Error("not run");
  sys::Mutex mu_;
  std::vector<std::string> said_ GUARDED_BY(mu_);
};

TEST_F(IncomingControlTest, PrecopyReceivesAndStartsTheGuest) {
  from_.Fill();
  StartReceiving(MigrationMode::kPrecopy);
  migration::MigrationSource source(*source_vm_, {});
  migration::SocketConnector connector(address(), {});
  Result<migration::SourceStats> sent = source.Run(connector);
  Result<IncomingResult> received = Received();

  ASSERT_TRUE(sent.has_value()) << sent.error().ToString();
  ASSERT_TRUE(received.has_value()) << received.error().ToString();
  EXPECT_TRUE(from_.Same(to_));
  EXPECT_EQ(vm_.starts.load(), 1);
  EXPECT_NE(received->started_at, std::chrono::steady_clock::time_point{});
  ASSERT_TRUE(received->precopy.has_value());
  EXPECT_FALSE(received->postcopy.has_value());
  EXPECT_EQ(received->figures["passes"], received->precopy->passes);
  EXPECT_EQ(received->figures["bytes_received"], received->precopy->bytes_received);
  EXPECT_THAT(Said(), Contains(HasSubstr("waiting for a migration on tcp:127.0.0.1:")));
  EXPECT_THAT(Said(), Contains(HasSubstr("received the guest: 8 MiB")));
  EXPECT_EQ(StatusNow()["phase"], "completed") << StatusNow().dump();
  EXPECT_EQ(StatusNow()["direction"], "incoming") << StatusNow().dump();
}

TEST_F(IncomingControlTest, PostcopyWaitsForTheResumeOfABrokenLinkAndCompletes) {
  from_.Fill();
  StartReceiving(MigrationMode::kPostcopy);
  migration::PostcopySourceOptions options;
  options.precopy_passes = 0;  // every page comes after the switchover
  migration::PostcopySource source(*source_vm_, options);
  // The first session breaks in post-copy, a quarter of the pages pushed.
  migration::FaultyConnector first(
      std::make_unique<migration::SocketConnector>(address(), migration::TransportOptions{}),
      migration::FaultController::Create({.cut_after_bytes_sent = kSize / 4}));
  Result<migration::PostcopySourceStats> sent = source.Run(first);
  ASSERT_FALSE(sent.has_value());
  ASSERT_EQ(source.phase(), migration::PostcopyPhase::kPaused) << sent.error().ToString();
  migration::SocketConnector again(address(), {});
  sent = source.Resume(again);
  Result<IncomingResult> received = Received();

  ASSERT_TRUE(sent.has_value()) << sent.error().ToString();
  ASSERT_TRUE(received.has_value()) << received.error().ToString();
  EXPECT_TRUE(from_.Same(to_));
  EXPECT_EQ(vm_.starts.load(), 0);  // the engine started it, at the switchover
  EXPECT_TRUE(vm_.engine_started.load());
  ASSERT_TRUE(received->postcopy.has_value());
  EXPECT_EQ(received->postcopy->sessions, 2u);
  EXPECT_EQ(received->started_at, received->postcopy->vm_started_at);
  EXPECT_EQ(received->installer, "copy");
  EXPECT_EQ(received->figures["mode"], "postcopy");
  EXPECT_EQ(received->figures["sessions"], 2);
  EXPECT_TRUE(received->figures.contains("fault_p50_us")) << received->figures.dump();
  const std::vector<std::string> said = Said();
  EXPECT_THAT(said, Contains(HasSubstr("waiting for a post-copy migration on tcp:127.0.0.1:")));
  EXPECT_THAT(said, Contains(AllOf(HasSubstr("post-copy link broken"),
                                   HasSubstr("for the source to resume"))));
  EXPECT_THAT(said, Contains(HasSubstr("post-copy complete: 8 MiB")));
  EXPECT_EQ(StatusNow()["phase"], "completed") << StatusNow().dump();
  EXPECT_EQ(StatusNow()["sessions"], 2) << StatusNow().dump();
}

TEST_F(IncomingControlTest, ARefusedMigrationLeavesTheGuestUnstarted) {
  Ram bigger(2 * kSize);  // the block lists differ
  StartReceiving(MigrationMode::kPrecopy);
  auto source_vm = migration::MakeMemorySource(bigger.memory(), std::make_unique<FakeControl>());
  migration::MigrationSource source(*source_vm, {});
  migration::SocketConnector connector(address(), {});
  EXPECT_FALSE(source.Run(connector).has_value());
  Result<IncomingResult> received = Received();

  ASSERT_FALSE(received.has_value());
  EXPECT_THAT(received.error().ToString(),
              AllOf(HasSubstr("incoming migration on tcp:127.0.0.1:"), HasSubstr("refused"),
                    HasSubstr("The guest was not started here; the source keeps running it")));
  EXPECT_EQ(vm_.starts.load(), 0);
  EXPECT_EQ(StatusNow()["phase"], "failed");
}

TEST_F(IncomingControlTest, AfterCancelTheErrorIsTheEnginesOwn) {
  IncomingOptions options;
  options.accept_timeout = std::chrono::milliseconds(100);  // no source comes
  ASSERT_TRUE(Listen(options).ok());
  control_->Cancel();
  Result<IncomingResult> received = control_->Run();
  ASSERT_FALSE(received.has_value());
  // The caller asked for the end: no word of a refusal.
  EXPECT_THAT(received.error().ToString(), Not(HasSubstr("refused")));
  EXPECT_EQ(vm_.starts.load(), 0);
}

TEST_F(IncomingControlTest, AnInstallerThatCannotPageIsRefusedBeforeWaiting) {
  IncomingOptions options;
  options.mode = MigrationMode::kPostcopy;
  // The zero installer answers faults with zeros and never asks the source.
  options.installer = "zero";
  EXPECT_THAT(Listen(options).ToString(), AllOf(HasSubstr("--installer"), HasSubstr("zero")));
  EXPECT_TRUE(Said().empty());
}

}  // namespace
}  // namespace faultline::control
