// The local update's engine on real Unix sockets and real memfds, with a
// fake VM: the memory is shared and nothing copied, the state arrives, and
// every failure before the destination's confirmation resumes the guest.
#include "src/migration/local_update.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <future>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/migration/socket_transport.h"
#include "src/sys/mutex.h"

namespace faultline::migration {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;

constexpr uint64_t kSize = 8ull << 20;

class FakeVm final : public SourceVm, public DestinationVm {
 public:
  explicit FakeVm(std::shared_ptr<RamBlock> block, uint32_t vcpus = 2)
      : block_(std::move(block)), vcpus_(vcpus) {}

  std::vector<std::shared_ptr<RamBlock>> blocks() override { return {block_}; }
  HelloAccel accelerator() const override { return HelloAccel::kTcg; }
  Status StartDirtyTracking() override { return Error("a local update tracks no dirty pages"); }
  Status StopDirtyTracking() override { return Status::Ok(); }
  Status TakeDirty(const RamBlock&, DirtyBitmap&) override { return Error("not expected"); }
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
    for (uint32_t i = 0; i < vcpus_; ++i) out.push_back({0xc0, static_cast<uint8_t>(i)});
    return out;
  }
  uint32_t vcpu_count() const override { return vcpus_; }
  Result<std::vector<DeviceBlob>> SaveDevices() override {
    return std::vector<DeviceBlob>{{"serial", {7}}};
  }
  bool memory_is_zero() const override { return false; }
  Status LoadVcpus(std::span<const std::vector<uint8_t>> states) override {
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
  int pauses() {
    sys::MutexLock lock(mu_);
    return pauses_;
  }
  int resumes() {
    sys::MutexLock lock(mu_);
    return resumes_;
  }

  std::shared_ptr<RamBlock> block_;
  const uint32_t vcpus_;
  std::vector<std::vector<uint8_t>> loaded_;
  size_t devices_loaded_ = 0;

 private:
  sys::Mutex mu_;
  bool paused_ GUARDED_BY(mu_) = false;
  int pauses_ GUARDED_BY(mu_) = 0;
  int resumes_ GUARDED_BY(mu_) = 0;
};

std::shared_ptr<RamBlock> MemfdBlock(Backing backing = Backing::kMemfd, int adopt = -1) {
  RamBlockOptions options{.name = "ram0", .size = kSize, .backing = backing};
  options.adopt_fd = adopt;
  Result<std::shared_ptr<RamBlock>> block = RamBlock::Create(options);
  EXPECT_TRUE(block.has_value()) << block.error().ToString();
  return block.has_value() ? *block : nullptr;
}

std::string SocketPath() {
  static std::atomic<int> counter{0};
  return fmt::format("{}local_update_{}_{}.sock", ::testing::TempDir(), getpid(), counter++);
}

Address Unix(const std::string& path) {
  Address a;
  a.scheme = "unix";
  a.path = path;
  return a;
}

struct Endpoints {
  std::string path = SocketPath();
  std::unique_ptr<SocketListener> listener;
  std::unique_ptr<Connector> connector;
  Endpoints() {
    auto l = SocketListener::Listen(Unix(path), {});
    EXPECT_TRUE(l.has_value()) << l.error().ToString();
    if (l.has_value()) listener = std::move(*l);
    connector = std::make_unique<SocketConnector>(Unix(path), TransportOptions{});
  }
};

// A destination that maps what it is offered and confirms.
Status AcceptAndRun(Acceptor& acceptor, std::shared_ptr<RamBlock>& mapped,
                    std::unique_ptr<FakeVm>& vm) {
  ASSIGN_OR_RETURN(auto d, LocalUpdateDestination::Accept(acceptor, 10s));
  const BlockInfo local[] = {BlockInfo{"ram0", kSize, 4096, Backing::kMemfd}};
  Status checked = CheckLocalOffer(d->offer(), d->fds().size(), local, 2, HelloAccel::kTcg);
  if (!checked.ok()) return d->Refuse(checked, ErrorCode::kBlockMismatch);
  mapped = MemfdBlock(Backing::kMemfd, d->fds()[0].get());
  if (!mapped) return d->Refuse(Error("mapping failed"), ErrorCode::kResource);
  vm = std::make_unique<FakeVm>(mapped);
  RETURN_IF_ERROR(d->Ready());
  return d->ReceiveState(*vm);
}

TEST(LocalUpdateTest, PassesTheMemoryAndCopiesNothing) {
  Endpoints e;
  FakeVm source(MemfdBlock());
  std::memset(source.block_->host(), 0x5a, kSize);
  std::shared_ptr<RamBlock> mapped;
  std::unique_ptr<FakeVm> dest;
  auto destination =
      std::async(std::launch::async, [&] { return AcceptAndRun(*e.listener, mapped, dest); });
  LocalUpdateSource update(source);
  Result<LocalUpdateStats> stats = update.Run(*e.connector);
  ASSERT_TRUE(stats.has_value()) << stats.error().ToString();
  ASSERT_TRUE(destination.get().ok());
  EXPECT_EQ(update.outcome(), SourceOutcome::kCompleted);
  EXPECT_EQ(update.phase(), LocalUpdateSource::Phase::kCompleted);
  EXPECT_TRUE(source.paused());  // for good: the destination runs the guest
  EXPECT_EQ(source.resumes(), 0);
  EXPECT_EQ(stats->fds_passed, 1u);
  EXPECT_EQ(stats->pages_copied, 0u);
  // The offer and a few bytes of state: nothing near the 8 MiB of memory.
  EXPECT_LT(stats->bytes_sent, 4096u);
  EXPECT_GT(stats->pause.count(), 0);
  // The same pages, not a copy: a write on either side shows on the other.
  EXPECT_EQ(mapped->host()[12345], 0x5a);
  mapped->host()[777] = 0x11;
  EXPECT_EQ(source.block_->host()[777], 0x11);
  ASSERT_EQ(dest->loaded_.size(), 2u);
  EXPECT_EQ(dest->loaded_[1], (std::vector<uint8_t>{0xc0, 1}));
  EXPECT_EQ(dest->devices_loaded_, 1u);
}

TEST(LocalUpdateTest, RefusedLayoutKeepsTheGuestRunning) {
  Endpoints e;
  FakeVm source(MemfdBlock(), /*vcpus=*/3);  // the destination expects 2
  std::shared_ptr<RamBlock> mapped;
  std::unique_ptr<FakeVm> dest;
  auto destination =
      std::async(std::launch::async, [&] { return AcceptAndRun(*e.listener, mapped, dest); });
  LocalUpdateSource update(source);
  Result<LocalUpdateStats> stats = update.Run(*e.connector);
  ASSERT_FALSE(stats.has_value());
  EXPECT_THAT(stats.error().ToString(), HasSubstr("3 vCPUs"));
  EXPECT_THAT(destination.get().ToString(), HasSubstr("--vcpus 3"));
  EXPECT_EQ(update.outcome(), SourceOutcome::kFailedRunning);
  EXPECT_EQ(source.pauses(), 0);
}

TEST(LocalUpdateTest, WithheldDescriptorsAreRefused) {
  Endpoints e;
  FakeVm source(MemfdBlock());
  std::shared_ptr<RamBlock> mapped;
  std::unique_ptr<FakeVm> dest;
  auto destination =
      std::async(std::launch::async, [&] { return AcceptAndRun(*e.listener, mapped, dest); });
  LocalUpdateSource update(source, {.withhold_fds = true});
  Result<LocalUpdateStats> stats = update.Run(*e.connector);
  ASSERT_FALSE(stats.has_value());
  EXPECT_THAT(stats.error().ToString(), HasSubstr("0 descriptor(s) for 1 block(s)"));
  EXPECT_FALSE(destination.get().ok());
  EXPECT_EQ(source.pauses(), 0);
}

// The destination dies after the state arrived, before confirming: the
// source resumes the guest.
TEST(LocalUpdateTest, DestinationGoneBeforeConfirmingResumesTheGuest) {
  Endpoints e;
  FakeVm source(MemfdBlock());
  auto destination = std::async(std::launch::async, [&]() -> Status {
    ASSIGN_OR_RETURN(auto d, LocalUpdateDestination::Accept(*e.listener, 10s));
    RETURN_IF_ERROR(d->Ready());
    // Vanish without a word while the source sends the state.
    std::this_thread::sleep_for(50ms);
    return Status::Ok();  // `d` goes: the connection closes
  });
  LocalUpdateSource update(source);
  Result<LocalUpdateStats> stats = update.Run(*e.connector);
  ASSERT_TRUE(destination.get().ok());
  ASSERT_FALSE(stats.has_value());
  EXPECT_THAT(stats.error().ToString(), HasSubstr("resumed here"));
  EXPECT_EQ(update.outcome(), SourceOutcome::kFailedResumed);
  EXPECT_EQ(source.pauses(), 1);
  EXPECT_EQ(source.resumes(), 1);
  EXPECT_FALSE(source.paused());
}

TEST(LocalUpdateTest, ForeignPeerIsAnErrorBeforeThePause) {
  Endpoints e;
  FakeVm source(MemfdBlock());
  std::thread foreign([&] {
    auto c = e.listener->Accept(10s);
    if (!c.has_value()) return;
    const char reply[] = "HTTP/1.0 400 Bad Request\r\n\r\n";
    (void)(*c)->Send({reinterpret_cast<const uint8_t*>(reply), sizeof(reply)});
  });
  LocalUpdateSource update(source);
  Result<LocalUpdateStats> stats = update.Run(*e.connector);
  foreign.join();
  ASSERT_FALSE(stats.has_value());
  EXPECT_EQ(update.outcome(), SourceOutcome::kFailedRunning);
  EXPECT_EQ(source.pauses(), 0);
}

TEST(LocalUpdateTest, StaleSocketSaysNothingListens) {
  const std::string path = SocketPath();
  {
    // A socket file whose process is gone: bound, never unlinked.
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof(a.sun_path) - 1);
    ASSERT_EQ(bind(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    close(s);
  }
  FakeVm source(MemfdBlock());
  SocketConnector connector(Unix(path), {});
  LocalUpdateSource update(source);
  Result<LocalUpdateStats> stats = update.Run(connector);
  ASSERT_FALSE(stats.has_value());
  EXPECT_THAT(stats.error().ToString(), HasSubstr("nothing listens"));
  EXPECT_EQ(source.pauses(), 0);
  // A destination may listen there now: the stale file is replaced.
  auto listener = SocketListener::Listen(Unix(path), {});
  ASSERT_TRUE(listener.has_value()) << listener.error().ToString();
  struct stat st {};
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  // A second listener on a live socket is refused.
  auto second = SocketListener::Listen(Unix(path), {});
  ASSERT_FALSE(second.has_value());
  EXPECT_THAT(second.error().ToString(), HasSubstr("another process listens"));
  listener->reset();
  EXPECT_NE(stat(path.c_str(), &st), 0) << "the listener removes its socket file";
}

TEST(LocalUpdateTest, MemoryKinds) {
  FakeVm memfd(MemfdBlock());
  EXPECT_EQ(LocalMemoryFor(memfd), LocalMemory::kFds);
  FakeVm anon(MemfdBlock(Backing::kAnonymous));
  EXPECT_EQ(LocalMemoryFor(anon), LocalMemory::kCopy);
}

TEST(LocalUpdateTest, AdoptChecksTheDescriptor) {
  std::shared_ptr<RamBlock> block = MemfdBlock();
  RamBlockOptions options{.name = "ram0", .size = kSize * 2, .backing = Backing::kMemfd};
  options.adopt_fd = block->fd();
  auto wrong_size = RamBlock::Create(options);
  ASSERT_FALSE(wrong_size.has_value());
  EXPECT_THAT(wrong_size.error().ToString(), HasSubstr("not the 16777216 bytes expected"));
  options.size = kSize;
  options.backing = Backing::kHugetlb;
  auto wrong_kind = RamBlock::Create(options);
  ASSERT_FALSE(wrong_kind.has_value());
  EXPECT_THAT(wrong_kind.error().ToString(), HasSubstr("is not a hugetlbfs memfd"));
}

TEST(LocalUpdateTest, OfferRoundTripsAndBadOffersAreRefused) {
  LocalOffer offer;
  offer.memory = LocalMemory::kCopy;
  offer.mode = SwitchoverMode::kPostcopy;
  offer.vcpu_count = 4;
  offer.hello_flags = static_cast<uint32_t>(HelloAccel::kKvm);
  offer.blocks = {BlockInfo{"ram0", 1ull << 30, 4096, Backing::kAnonymous}};
  std::vector<uint8_t> frame = EncodeFrame(offer, 0);
  std::span<const uint8_t> payload(frame.data() + kFrameHeaderSize,
                                   frame.size() - kFrameHeaderSize);
  Result<Message> decoded = DecodePayload(MessageType::kLocalOffer, payload, {});
  ASSERT_TRUE(decoded.has_value()) << decoded.error().ToString();
  EXPECT_EQ(std::get<LocalOffer>(*decoded), offer);
  // Passed memory with a post-copy mode makes no sense.
  offer.memory = LocalMemory::kFds;
  frame = EncodeFrame(offer, 0);
  payload = {frame.data() + kFrameHeaderSize, frame.size() - kFrameHeaderSize};
  EXPECT_FALSE(DecodePayload(MessageType::kLocalOffer, payload, {}).has_value());
  frame = EncodeFrame(LocalReady{}, 0);
  payload = {frame.data() + kFrameHeaderSize, frame.size() - kFrameHeaderSize};
  EXPECT_TRUE(DecodePayload(MessageType::kLocalReady, payload, {}).has_value());
}

TEST(LocalUpdateTest, CheckLocalOfferSaysWhatDiffers) {
  LocalOffer offer;
  offer.vcpu_count = 2;
  offer.blocks = {BlockInfo{"ram0", kSize, 2u << 20, Backing::kHugetlb}};
  const BlockInfo memfd[] = {BlockInfo{"ram0", kSize, 4096, Backing::kMemfd}};
  EXPECT_THAT(CheckLocalOffer(offer, 1, memfd, 2, HelloAccel::kKvm).ToString(),
              HasSubstr("--backing hugetlb"));
  const BlockInfo bigger[] = {BlockInfo{"ram0", kSize * 2, 2u << 20, Backing::kHugetlb}};
  EXPECT_THAT(CheckLocalOffer(offer, 1, bigger, 2, HelloAccel::kKvm).ToString(),
              HasSubstr("mismatch"));
  offer.hello_flags = static_cast<uint32_t>(HelloAccel::kTcg);
  const BlockInfo same[] = {offer.blocks[0]};
  EXPECT_THAT(CheckLocalOffer(offer, 1, same, 2, HelloAccel::kKvm).ToString(),
              HasSubstr("--accel tcg"));
  EXPECT_TRUE(CheckLocalOffer(offer, 1, same, 2, HelloAccel::kTcg).ok());
}

}  // namespace
}  // namespace faultline::migration
