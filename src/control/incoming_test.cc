// IncomingControl over the real engines and loopback TCP, with in-memory VMs
// on both sides (a GuestMemory each, no /dev/kvm): pre-copy, post-copy with
// a broken link that the source resumes, and the refusals, as `faultline run
// --incoming` and `faultline demo` rely on them.
#include "src/control/incoming.h"

#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
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

namespace faultline::control {
namespace {

using ::testing::AllOf;
using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr uint64_t kSize = 8 << 20;

// One side's RAM: one anonymous block at GPA 0.
struct Memory {
  VmmOwnedMemslots memslots;
  std::unique_ptr<GuestMemory> memory;
  std::shared_ptr<RamBlock> block;

  explicit Memory(uint64_t bytes = kSize) {
    auto created = RamBlock::Create({.name = "ram0", .size = bytes});
    EXPECT_TRUE(created.has_value()) << created.error().ToString();
    block = *created;
    auto m = GuestMemory::Create(&memslots, {.dirty_mode = DirtyLogMode::kUffdWp});
    EXPECT_TRUE(m.has_value()) << m.error().ToString();
    memory = std::move(*m);
    EXPECT_TRUE(memory->Place(block, Gpa(0)).ok());
  }
  void Fill() {
    for (uint64_t i = 0; i < block->size(); i += 64) {
      const uint64_t v = i * 0x9e3779b97f4a7c15ull + 1;
      std::memcpy(block->host() + i, &v, sizeof(v));
    }
  }
  bool Same(const Memory& other) const {
    return std::memcmp(block->host(), other.block->host(), block->size()) == 0;
  }
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
  explicit FakeIncomingVm(Memory& memory) : memory_(memory) {}
  Backing backing() const override { return Backing::kAnonymous; }
  std::unique_ptr<migration::DestinationVm> MakeDestination() override {
    return migration::MakeMemoryDestination(*memory_.memory, std::make_unique<FakeControl>());
  }
  std::unique_ptr<migration::PostcopyDestinationVm> MakePostcopyDestination(
      migration::PostcopyVmOptions options) override {
    return migration::MakeMemoryPostcopyDestination(
        *memory_.memory, std::make_unique<FakeControl>(&engine_started), std::move(options));
  }
  Status PrepareVcpus() override { return Status::Ok(); }
  Status Start() override {
    ++starts;
    return Status::Ok();
  }

  std::atomic<int> starts{0};               // through Start: pre-copy, local update
  std::atomic<bool> engine_started{false};  // by the post-copy engine

 private:
  Memory& memory_;
};

// A destination listening on loopback, with what it said.
struct Destination {
  std::unique_ptr<migration::SocketListener> listener;
  std::mutex mu;
  std::vector<std::string> said;  // guarded by mu
  std::unique_ptr<IncomingControl> control;

  explicit Destination(IncomingOptions options) {
    auto l = migration::SocketListener::Listen({"tcp", "127.0.0.1", 0}, {});
    EXPECT_TRUE(l.has_value()) << l.error().ToString();
    listener = std::move(*l);
    options.bytes_total = kSize;
    // Not measured: nothing on stderr, no time spent.
    if (options.installer.empty()) options.installer = "copy";
    options.say = [this](const std::string& line) {
      std::lock_guard lock(mu);
      said.push_back(line);
    };
    control = std::make_unique<IncomingControl>(*listener, std::move(options));
  }
  migration::Address address() const { return {"tcp", "127.0.0.1", listener->port()}; }
  std::vector<std::string> Said() {
    std::lock_guard lock(mu);
    return said;
  }
};

IncomingOptions Mode(MigrationMode mode) {
  IncomingOptions o;
  o.mode = mode;
  o.accept_timeout = std::chrono::seconds(10);
  return o;
}

TEST(IncomingControlTest, PrecopyReceivesAndStartsTheGuest) {
  Memory from, to;
  from.Fill();
  FakeIncomingVm vm(to);
  Destination dest(Mode(MigrationMode::kPrecopy));
  ASSERT_TRUE(dest.control->Prepare(vm).ok());
  Result<IncomingResult> received = Error("not run");
  std::thread receiver([&] { received = dest.control->Run(); });
  auto source_vm = migration::MakeMemorySource(*from.memory, std::make_unique<FakeControl>());
  migration::MigrationSource source(*source_vm, {});
  migration::SocketConnector connector(dest.address(), {});
  Result<migration::SourceStats> sent = source.Run(connector);
  receiver.join();

  ASSERT_TRUE(sent.has_value()) << sent.error().ToString();
  ASSERT_TRUE(received.has_value()) << received.error().ToString();
  EXPECT_TRUE(from.Same(to));
  EXPECT_EQ(vm.starts.load(), 1);
  EXPECT_NE(received->started_at, std::chrono::steady_clock::time_point{});
  ASSERT_TRUE(received->precopy.has_value());
  EXPECT_FALSE(received->postcopy.has_value());
  EXPECT_EQ(received->figures["passes"], received->precopy->passes);
  EXPECT_EQ(received->figures["bytes_received"], received->precopy->bytes_received);
  EXPECT_THAT(dest.Said(), Contains(HasSubstr("waiting for a migration on tcp:127.0.0.1:")));
  EXPECT_THAT(dest.Said(), Contains(HasSubstr("received the guest: 8 MiB")));
  nlohmann::json status = dest.control->status()->Status();
  EXPECT_EQ(status["phase"], "completed") << status.dump();
  EXPECT_EQ(status["direction"], "incoming") << status.dump();
}

TEST(IncomingControlTest, PostcopyWaitsForTheResumeOfABrokenLinkAndCompletes) {
  Memory from, to;
  from.Fill();
  FakeIncomingVm vm(to);
  Destination dest(Mode(MigrationMode::kPostcopy));
  ASSERT_TRUE(dest.control->Prepare(vm).ok());
  Result<IncomingResult> received = Error("not run");
  std::thread receiver([&] { received = dest.control->Run(); });
  auto source_vm = migration::MakeMemorySource(*from.memory, std::make_unique<FakeControl>());
  migration::PostcopySourceOptions options;
  options.precopy_passes = 0;  // every page comes after the switchover
  migration::PostcopySource source(*source_vm, options);
  // The first session breaks in post-copy, a quarter of the pages pushed.
  migration::FaultyConnector first(
      std::make_unique<migration::SocketConnector>(dest.address(), migration::TransportOptions{}),
      migration::FaultController::Create({.cut_after_bytes_sent = kSize / 4}));
  Result<migration::PostcopySourceStats> sent = source.Run(first);
  ASSERT_FALSE(sent.has_value());
  ASSERT_EQ(source.phase(), migration::PostcopyPhase::kPaused) << sent.error().ToString();
  migration::SocketConnector again(dest.address(), {});
  sent = source.Resume(again);
  receiver.join();

  ASSERT_TRUE(sent.has_value()) << sent.error().ToString();
  ASSERT_TRUE(received.has_value()) << received.error().ToString();
  EXPECT_TRUE(from.Same(to));
  EXPECT_EQ(vm.starts.load(), 0);  // the engine started it, at the switchover
  EXPECT_TRUE(vm.engine_started.load());
  ASSERT_TRUE(received->postcopy.has_value());
  EXPECT_EQ(received->postcopy->sessions, 2u);
  EXPECT_EQ(received->started_at, received->postcopy->vm_started_at);
  EXPECT_EQ(received->installer, "copy");
  EXPECT_EQ(received->figures["mode"], "postcopy");
  EXPECT_EQ(received->figures["sessions"], 2);
  EXPECT_TRUE(received->figures.contains("fault_p50_us")) << received->figures.dump();
  const std::vector<std::string> said = dest.Said();
  EXPECT_THAT(said, Contains(HasSubstr("waiting for a post-copy migration on tcp:127.0.0.1:")));
  EXPECT_THAT(said, Contains(AllOf(HasSubstr("post-copy link broken"),
                                   HasSubstr("for the source to resume"))));
  EXPECT_THAT(said, Contains(HasSubstr("post-copy complete: 8 MiB")));
  nlohmann::json status = dest.control->status()->Status();
  EXPECT_EQ(status["phase"], "completed") << status.dump();
  EXPECT_EQ(status["sessions"], 2) << status.dump();
}

TEST(IncomingControlTest, ARefusedMigrationLeavesTheGuestUnstarted) {
  Memory from(2 * kSize), to;  // the block lists differ
  FakeIncomingVm vm(to);
  Destination dest(Mode(MigrationMode::kPrecopy));
  ASSERT_TRUE(dest.control->Prepare(vm).ok());
  Result<IncomingResult> received = Error("not run");
  std::thread receiver([&] { received = dest.control->Run(); });
  auto source_vm = migration::MakeMemorySource(*from.memory, std::make_unique<FakeControl>());
  migration::MigrationSource source(*source_vm, {});
  migration::SocketConnector connector(dest.address(), {});
  EXPECT_FALSE(source.Run(connector).has_value());
  receiver.join();

  ASSERT_FALSE(received.has_value());
  EXPECT_THAT(received.error().ToString(),
              AllOf(HasSubstr("incoming migration on tcp:127.0.0.1:"), HasSubstr("refused"),
                    HasSubstr("The guest was not started here; the source keeps running it")));
  EXPECT_EQ(vm.starts.load(), 0);
  EXPECT_EQ(dest.control->status()->Status()["phase"], "failed");
}

TEST(IncomingControlTest, AfterCancelTheErrorIsTheEnginesOwn) {
  Memory to;
  FakeIncomingVm vm(to);
  IncomingOptions options = Mode(MigrationMode::kPrecopy);
  options.accept_timeout = std::chrono::milliseconds(100);  // no source comes
  Destination dest(options);
  ASSERT_TRUE(dest.control->Prepare(vm).ok());
  dest.control->Cancel();
  Result<IncomingResult> received = dest.control->Run();
  ASSERT_FALSE(received.has_value());
  // The caller asked for the end: no word of a refusal.
  EXPECT_THAT(received.error().ToString(), Not(HasSubstr("refused")));
  EXPECT_EQ(vm.starts.load(), 0);
}

TEST(IncomingControlTest, AnInstallerThatCannotPageIsRefusedBeforeWaiting) {
  Memory to;
  FakeIncomingVm vm(to);
  IncomingOptions options = Mode(MigrationMode::kPostcopy);
  // The zero installer answers faults with zeros and never asks the source.
  options.installer = "zero";
  Destination dest(options);
  Status prepared = dest.control->Prepare(vm);
  EXPECT_THAT(prepared.ToString(), AllOf(HasSubstr("--installer"), HasSubstr("zero")));
  EXPECT_TRUE(dest.Said().empty());
}

}  // namespace
}  // namespace faultline::control
