// The embedding API between two "VMMs" in one process, over a real Unix
// socket: the source's memory is the VMM's own mapping, written by worker
// threads (its "vCPUs") until Pause(); the destination's is another mapping
// of the same kind. After the migration every byte must match, and each
// worker's state blob must have arrived.
#include "faultline/embed.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <thread>

#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/migration/tls_test_certs.h"
#include "src/sys/memfd.h"

namespace faultline {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kSize = 16ull << 20;
constexpr uint32_t kWorkers = 2;

// The VMM's own memory: an anonymous mapping, or a memfd mapped shared.
struct VmmMemory {
  int fd = -1;
  uint8_t* host = nullptr;

  explicit VmmMemory(Backing backing) {
    int flags = MAP_PRIVATE | MAP_ANONYMOUS;
    if (backing == Backing::kMemfd) {
      auto memfd = sys::CreateMemfd("embed-test", kSize, 0);
      if (!memfd.has_value()) ADD_FAILURE() << memfd.error().ToString();
      fd = memfd->Release();
      flags = MAP_SHARED;
    }
    void* p = mmap(nullptr, kSize, PROT_READ | PROT_WRITE, flags, fd, 0);
    if (p == MAP_FAILED) ADD_FAILURE() << "mmap: " << strerror(errno);
    host = static_cast<uint8_t*>(p);
  }
  ~VmmMemory() {
    munmap(host, kSize);
    if (fd >= 0) close(fd);
  }

  std::vector<GuestRegion> Regions(Backing backing) {
    RamBlockOptions o{.name = "ram0", .size = kSize, .backing = backing};
    o.adopt_fd = fd;
    o.host = host;
    auto block = RamBlock::Create(o);
    EXPECT_TRUE(block.has_value()) << block.error().ToString();
    return {GuestRegion{*block, 0}};
  }
};

// A VMM whose "vCPUs" are threads writing their own half of the memory.
class TestVm : public VmHandle {
 public:
  explicit TestVm(uint8_t* memory) : memory_(memory) {}
  ~TestVm() override { StopWorkers(); }

  void StartWorkers() {
    for (uint32_t i = 0; i < kWorkers; ++i) {
      workers_.emplace_back([this, i] {
        const uint64_t share = kSize / kWorkers;
        uint64_t offset = 0;
        while (!stop_.load()) {
          if (paused_.load()) {
            parked_.fetch_add(1);
            while (paused_.load() && !stop_.load()) std::this_thread::yield();
            parked_.fetch_sub(1);
            continue;
          }
          const uint64_t n = ++counters_[i];
          std::memcpy(memory_ + i * share + offset, &n, sizeof(n));
          offset = (offset + 4096 + 8) % (share - 8);
        }
      });
    }
  }
  void StopWorkers() {
    stop_.store(true);
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  uint32_t vcpu_count() const override { return kWorkers; }
  void Pause() override {
    paused_.store(true);
    while (parked_.load() < static_cast<int>(workers_.size())) std::this_thread::yield();
  }
  void Resume() override { paused_.store(false); }
  Result<std::vector<uint8_t>> SaveVcpu(uint32_t index) override {
    std::vector<uint8_t> blob(sizeof(uint64_t));
    const uint64_t n = counters_[index];
    std::memcpy(blob.data(), &n, sizeof(n));
    return blob;
  }
  Status LoadVcpu(uint32_t index, std::span<const uint8_t> state) override {
    if (state.size() != sizeof(uint64_t)) return Error("vCPU {}: {} bytes", index, state.size());
    uint64_t n = 0;
    std::memcpy(&n, state.data(), sizeof(n));
    counters_[index] = n;
    return Status::Ok();
  }
  Result<std::vector<uint8_t>> SaveDevices() override { return std::vector<uint8_t>{1, 2, 3}; }
  Status LoadDevices(std::span<const uint8_t> state) override {
    devices_.assign(state.begin(), state.end());
    return Status::Ok();
  }
  // The destination's guest runs: a "vCPU" reads every page, from the end
  // (post-copy: each read may fault and wait for the page).
  Status Start() override {
    started_.store(true);
    reader_ = std::thread([this] {
      uint64_t sum = 0;
      for (uint64_t off = kSize; off >= 4096; off -= 4096) sum += memory_[off - 4096];
      read_sum_.store(sum);
    });
    return Status::Ok();
  }
  void JoinReader() {
    if (reader_.joinable()) reader_.join();
  }

  uint64_t counter(uint32_t i) const { return counters_[i]; }
  bool started() const { return started_.load(); }
  const std::vector<uint8_t>& devices() const { return devices_; }

 private:
  uint8_t* const memory_;
  std::vector<std::thread> workers_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> paused_{false};
  std::atomic<int> parked_{0};
  std::atomic<uint64_t> counters_[kWorkers] = {};
  std::atomic<bool> started_{false};
  std::thread reader_;
  std::atomic<uint64_t> read_sum_{0};
  std::vector<uint8_t> devices_;
};

struct Params {
  Backing backing;
  bool postcopy;
};

class EmbedTest : public ::testing::TestWithParam<Params> {};

std::string SocketPath() {
  return fmt::format("unix:/tmp/faultline-embed-test-{}-{}.sock", getpid(),
                     ::testing::UnitTest::GetInstance()->random_seed());
}

TEST_P(EmbedTest, MigratesMemoryWrittenByWorkersAndTheirState) {
  const Params p = GetParam();
  VmmMemory from(p.backing), to(p.backing);
  TestVm source(from.host), destination(to.host);
  MigrationOptions options;
  options.postcopy = p.postcopy;
  options.channels = 2;
  options.precopy_passes = 2;
  options.key = "a shared secret of 32 bytes......";

  auto incoming = IncomingMigration::Create(destination, to.Regions(p.backing), options);
  ASSERT_TRUE(incoming.has_value()) << incoming.error().ToString();
  auto address = (*incoming)->Listen(SocketPath());
  ASSERT_TRUE(address.has_value()) << address.error().ToString();
  auto outgoing = OutgoingMigration::Create(source, from.Regions(p.backing), options);
  ASSERT_TRUE(outgoing.has_value()) << outgoing.error().ToString();

  source.StartWorkers();
  Result<MigrationStats> received = Error("not run");
  std::thread receiver([&] { received = (*incoming)->Run(); });
  Result<MigrationStats> sent = (*outgoing)->Run(*address);
  receiver.join();
  // A failed destination leaves the reader waiting for a page: its memory's
  // registration goes with the migration, which lets the reader finish.
  if (!received.has_value()) incoming->reset();
  destination.JoinReader();
  ASSERT_TRUE(sent.has_value()) << sent.error().ToString();
  ASSERT_TRUE(received.has_value()) << received.error().ToString();
  source.StopWorkers();  // paused since the switchover

  EXPECT_TRUE(destination.started());
  EXPECT_EQ(std::memcmp(from.host, to.host, kSize), 0) << "the memory differs";
  for (uint32_t i = 0; i < kWorkers; ++i) {
    EXPECT_EQ(destination.counter(i), source.counter(i)) << "worker " << i;
    EXPECT_GT(source.counter(i), 0u);
  }
  EXPECT_THAT(destination.devices(), ::testing::ElementsAre(1, 2, 3));
  EXPECT_EQ((*outgoing)->progress().phase, "completed");
  EXPECT_EQ((*incoming)->progress().phase, "completed");
  EXPECT_GT(sent->bytes, kSize / 4);  // written pages moved, zero pages as runs
  if (p.postcopy) {
    EXPECT_EQ(sent->sessions, 1u);
    EXPECT_GT(sent->pages_pushed + sent->pages_requested, 0u);
  } else {
    EXPECT_GE(sent->passes, 1u);
    EXPECT_GT(sent->downtime_us, 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, EmbedTest,
                         ::testing::Values(Params{Backing::kAnonymous, false},
                                           Params{Backing::kMemfd, false},
                                           Params{Backing::kAnonymous, true},
                                           Params{Backing::kMemfd, true}),
                         [](const auto& info) {
                           return fmt::format("{}_{}", BackingName(info.param.backing),
                                              info.param.postcopy ? "postcopy" : "precopy");
                         });

// A live snapshot of memory the workers keep writing, restored eagerly
// and lazily into a second "VMM": every byte and each worker's state.
class EmbedSnapshotTest : public ::testing::TestWithParam<std::tuple<Backing, bool>> {};

TEST_P(EmbedSnapshotTest, RestoresMemoryWrittenByWorkersAndTheirState) {
  const auto [backing, lazy] = GetParam();
  char tmpl[] = "/tmp/faultline-embed-snapshot-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = std::string(tmpl) + "/snap";
  VmmMemory from(backing), to(backing);
  TestVm source(from.host), restored(to.host);
  source.StartWorkers();
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  Result<SnapshotStats> written =
      WriteSnapshot(source, from.Regions(backing), dir, {.live = true, .resume = false});
  source.StopWorkers();  // paused since the snapshot's last pass
  ASSERT_TRUE(written.has_value()) << written.error().ToString();
  EXPECT_GT(written->data_pages, 0u);
  EXPECT_GE(written->passes, 2u);  // live: at least one dirty pass

  Result<RestoreStats> r = RestoreSnapshot(restored, to.Regions(backing), dir, {.lazy = lazy});
  restored.JoinReader();
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_TRUE(restored.started());
  EXPECT_EQ(std::memcmp(from.host, to.host, kSize), 0) << "the memory differs";
  for (uint32_t i = 0; i < kWorkers; ++i) {
    EXPECT_EQ(restored.counter(i), source.counter(i)) << "worker " << i;
  }
  EXPECT_THAT(restored.devices(), ::testing::ElementsAre(1, 2, 3));
  if (lazy) {
    EXPECT_GT(r->pages_read, 0u);
  }
  EXPECT_LE(r->start_us, r->resident_us);
  std::filesystem::remove_all(tmpl);
}

INSTANTIATE_TEST_SUITE_P(Modes, EmbedSnapshotTest,
                         ::testing::Combine(::testing::Values(Backing::kAnonymous, Backing::kMemfd),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           return fmt::format("{}_{}", BackingName(std::get<0>(info.param)),
                                              std::get<1>(info.param) ? "lazy" : "eager");
                         });

// A snapshot served by the embedded page server to a second "VMM" that
// connects with the embedded client: every byte arrives on first touch;
// stopping the server tells the client at once.
TEST(EmbedPageServerTest, ServesASnapshotToAConnectedVmm) {
  char tmpl[] = "/tmp/faultline-embed-pages-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = std::string(tmpl) + "/snap", socket = std::string(tmpl) + "/pages.sock";
  VmmMemory from(Backing::kAnonymous), to(Backing::kAnonymous);
  TestVm source(from.host);
  source.StartWorkers();
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  Result<SnapshotStats> written = WriteSnapshot(source, from.Regions(Backing::kAnonymous), dir,
                                                {.live = false, .resume = false});
  source.StopWorkers();
  ASSERT_TRUE(written.has_value()) << written.error().ToString();

  PageServerOptions options;
  options.snapshot_dir = dir;
  options.socket_path = socket;
  auto server = PageServer::Start(options);
  ASSERT_TRUE(server.has_value()) << server.error().ToString();
  std::atomic<bool> lost{false};
  auto connection = ConnectPageServer(socket, to.Regions(Backing::kAnonymous),
                                      [&](const Status&) { lost.store(true); });
  ASSERT_TRUE(connection.has_value()) << connection.error().ToString();
  EXPECT_EQ(std::memcmp(from.host, to.host, kSize), 0) << "the served memory differs";
  for (int i = 0; i < 500 && (*server)->active_clients() != 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ((*server)->active_clients(), 1u);
  (*server)->Stop();
  for (int i = 0; i < 500 && !lost.load(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(lost.load());
  EXPECT_TRUE((*connection)->server_lost());
  const std::vector<PageServerClient> released = (*server)->released();
  ASSERT_EQ(released.size(), 1u);
  EXPECT_TRUE(released[0].served);
  EXPECT_EQ(released[0].pid, static_cast<int64_t>(getpid()));
  // Every page was touched once and installed once, zero pages among them
  // (pages_installed counts them too: how many depends on how much the
  // workers wrote before the snapshot). A fault may be reported twice.
  EXPECT_EQ(released[0].pages_installed, kSize / 4096);
  EXPECT_LE(released[0].zero_pages, released[0].pages_installed);
  EXPECT_GE(released[0].faults, released[0].pages_installed);
  connection->reset();
  std::filesystem::remove_all(tmpl);
}

TEST(EmbedPageServerTest, MistakesSayWhat) {
  PageServerOptions options;
  options.snapshot_dir = "/nonexistent/snap";
  options.socket_path = "/tmp/x";
  auto none = PageServer::Start(options);
  ASSERT_FALSE(none.has_value());
  EXPECT_THAT(none.error().ToString(), ::testing::HasSubstr("no snapshot manifest"));
  VmmMemory memory(Backing::kAnonymous);
  auto nobody = ConnectPageServer("/nonexistent/pages.sock", memory.Regions(Backing::kAnonymous),
                                  [](const Status&) {});
  ASSERT_FALSE(nobody.has_value());
  EXPECT_THAT(nobody.error().ToString(), ::testing::HasSubstr("/nonexistent/pages.sock"));
}

TEST(EmbedErrorsTest, WrongKeyIsRefusedAndTheSourceRunsOn) {
  VmmMemory from(Backing::kAnonymous), to(Backing::kAnonymous);
  TestVm source(from.host), destination(to.host);
  MigrationOptions options;
  options.key = "one key of sixteen bytes";
  auto incoming = IncomingMigration::Create(destination, to.Regions(Backing::kAnonymous), options);
  ASSERT_TRUE(incoming.has_value());
  auto address = (*incoming)->Listen(SocketPath());
  ASSERT_TRUE(address.has_value());
  options.key = "another key, as long";
  auto outgoing = OutgoingMigration::Create(source, from.Regions(Backing::kAnonymous), options);
  ASSERT_TRUE(outgoing.has_value());
  Result<MigrationStats> received = Error("not run");
  std::thread receiver([&] { received = (*incoming)->Run(); });
  Result<MigrationStats> sent = (*outgoing)->Run(*address);
  receiver.join();
  ASSERT_FALSE(sent.has_value());
  ASSERT_FALSE(received.has_value());
  EXPECT_FALSE(destination.started());
  EXPECT_EQ((*outgoing)->progress().phase, "failed");
}

// TLS between two embedders: the memory and state arrive over tcp: with
// both certificates checked; a source from another CA is refused and its
// guest runs on.
TEST(EmbedTlsTest, MigratesOverTlsAndRefusesAnotherCa) {
  const std::string root = fmt::format("/tmp/faultline-embed-tls-{}", getpid());
  mkdir(root.c_str(), 0700);
  migration::testing::TestCa ca, other("another CA");
  ca.WriteDir(root + "/src", "source", "DNS:source");
  ca.WriteDir(root + "/dst", "dest", "DNS:dest");
  other.WriteDir(root + "/intruder", "source", "DNS:source");
  VmmMemory from(Backing::kAnonymous), to(Backing::kAnonymous);
  TestVm source(from.host), destination(to.host);
  MigrationOptions in_options, out_options;
  in_options.tls_dir = root + "/dst";
  in_options.tls_peer_name = "source";
  auto incoming =
      IncomingMigration::Create(destination, to.Regions(Backing::kAnonymous), in_options);
  ASSERT_TRUE(incoming.has_value()) << incoming.error().ToString();
  auto address = (*incoming)->Listen("tcp:127.0.0.1:0");
  ASSERT_TRUE(address.has_value()) << address.error().ToString();
  Result<MigrationStats> received = Error("not run");
  std::thread receiver([&] { received = (*incoming)->Run(); });

  out_options.tls_dir = root + "/intruder";
  auto intruder = OutgoingMigration::Create(source, from.Regions(Backing::kAnonymous), out_options);
  ASSERT_TRUE(intruder.has_value()) << intruder.error().ToString();
  source.StartWorkers();
  Result<MigrationStats> refused = (*intruder)->Run(*address);
  ASSERT_FALSE(refused.has_value());
  EXPECT_THAT(refused.error().ToString(), ::testing::HasSubstr("failed verification"));

  out_options.tls_dir = root + "/src";
  out_options.tls_peer_name = "dest";
  auto outgoing = OutgoingMigration::Create(source, from.Regions(Backing::kAnonymous), out_options);
  ASSERT_TRUE(outgoing.has_value()) << outgoing.error().ToString();
  Result<MigrationStats> sent = (*outgoing)->Run(*address);
  receiver.join();
  destination.JoinReader();
  ASSERT_TRUE(sent.has_value()) << sent.error().ToString();
  ASSERT_TRUE(received.has_value()) << received.error().ToString();
  source.StopWorkers();
  EXPECT_EQ(std::memcmp(from.host, to.host, kSize), 0) << "the memory differs";

  // A directory that is not one is refused when the migration is made.
  MigrationOptions wrong;
  wrong.tls_dir = root + "/nowhere";
  auto refused_early = OutgoingMigration::Create(source, from.Regions(Backing::kAnonymous), wrong);
  ASSERT_FALSE(refused_early.has_value());
  EXPECT_THAT(refused_early.error().ToString(), ::testing::HasSubstr("MigrationOptions::tls_dir"));
}

TEST(EmbedErrorsTest, MistakesInTheDescriptionSayWhat) {
  VmmMemory memory(Backing::kAnonymous);
  TestVm vm(memory.host);
  auto none = OutgoingMigration::Create(vm, {}, {});
  ASSERT_FALSE(none.has_value());
  EXPECT_THAT(none.error().message(), HasSubstr("describe at least one GuestRegion"));

  auto no_fd = RamBlock::Create(
      {.name = "m", .size = kSize, .backing = Backing::kMemfd, .host = memory.host});
  ASSERT_FALSE(no_fd.has_value());
  EXPECT_THAT(no_fd.error().message(), HasSubstr("RamBlockOptions::adopt_fd"));

  auto unaligned = RamBlock::Create(
      {.name = "u", .size = 4096, .backing = Backing::kAnonymous, .host = memory.host + 8});
  ASSERT_FALSE(unaligned.has_value());
  EXPECT_THAT(unaligned.error().message(), HasSubstr("not aligned"));

  MigrationOptions options;
  options.channels = 0;
  auto zero = OutgoingMigration::Create(vm, memory.Regions(Backing::kAnonymous), options);
  ASSERT_FALSE(zero.has_value());
  EXPECT_THAT(zero.error().message(), HasSubstr("channels"));

  auto incoming = IncomingMigration::Create(vm, memory.Regions(Backing::kAnonymous), {});
  ASSERT_TRUE(incoming.has_value());
  auto run = (*incoming)->Run();
  ASSERT_FALSE(run.has_value());
  EXPECT_THAT(run.error().message(), HasSubstr("Listen() first"));
}

}  // namespace
}  // namespace faultline
