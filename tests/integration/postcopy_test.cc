// Post-copy live migration between two reference VMs in this process over
// loopback TCP. The test guest writes random pages (with its ledger) on the
// source; after one pre-copy pass (or none) the VM switches over, runs on the
// destination at once with its missing memory demand-paged over the network
// while the rest is pushed, and finally verifies every page there.
//
// Sizes: every backing with its default installer at 256 MiB, twice each;
// one 2 GiB run (the acceptance size) on anonymous memory; a link
// cut at three points of one post-copy, each resumed over a new session.
#include <atomic>
#include <chrono>
#include <fstream>
#include <optional>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "guest/abi.h"
#include "src/migration/fault_transport.h"
#include "src/migration/handshake.h"
#include "src/migration/postcopy_destination.h"
#include "src/migration/postcopy_session.h"
#include "src/migration/postcopy_source.h"
#include "src/migration/tcp_transport.h"
#include "src/migration/vm_adapter.h"
#include "src/vmm/vm.h"
#include "tests/integration/huge_pages.h"

namespace faultline::migration {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;

using ::faultline::integration::HugePages;

vmm::VmConfig GuestConfig(uint64_t mem, Backing backing) {
  vmm::VmConfig c;
  c.mem_size = mem;
  c.vcpus = 2;
  c.backing = backing;
  c.guest_args = "workload=fill,random,verify until_command=1 rate=64 quiet=1";
  return c;
}

struct Outcome {
  Status source = Error("not run");
  Status destination = Error("not run");
  PostcopySourceStats source_stats;
  PostcopyDestinationStats destination_stats;
  Result<GuestReport> report = Error("not run");
  GuestReport before;
  uint32_t resumes = 0;
};

struct Plan {
  uint64_t mem = 256ull << 20;
  Backing backing = Backing::kAnonymous;
  uint32_t precopy_passes = 1;
  // Cut the link when this share of the post-copy push is done (one per
  // session; each cut is resumed over a new session).
  std::vector<double> cuts;
};

Outcome RunPostcopy(const Plan& plan) {
  Outcome out;
  // KVM keeps no dirty log for guest_memfd memslots, so a guest_memfd
  // source cannot run pre-copy passes: the source is anonymous memory then
  // (block backings may differ between the ends), the destination keeps
  // guest_memfd and its hole installer.
  const vmm::VmConfig config =
      GuestConfig(plan.mem, plan.backing == Backing::kGuestMemfd && plan.precopy_passes > 0
                                ? Backing::kAnonymous
                                : plan.backing);
  auto from = vmm::Vm::Create(config);
  if (!from) {
    out.source = from.error();
    return out;
  }
  vmm::VmConfig incoming = config;
  incoming.boot = false;
  incoming.backing = plan.backing;
  auto to = vmm::Vm::Create(incoming);
  if (!to) {
    out.destination = to.error();
    return out;
  }
  if (Status s = (*from)->Start(); !s.ok()) {
    out.source = s;
    return out;
  }
  // The guest fills its memory, then writes random pages.
  const auto fill_wait = std::chrono::milliseconds(300 + plan.mem / (1 << 20) * 3);
  std::this_thread::sleep_for(fill_wait);
  out.before = (*from)->report();

  auto listener = TcpListener::Listen(Address{"tcp", "127.0.0.1", 0}, {});
  if (!listener) {
    out.source = listener.error();
    return out;
  }
  const Address address{"tcp", "127.0.0.1", (*listener)->port()};
  auto source_vm = MakeSourceVm(**from);
  auto destination_vm = MakePostcopyDestinationVm(**to);
  PostcopySourceOptions options;
  options.base.page_channels = 2;
  options.precopy_passes = plan.precopy_passes;
  PostcopySource source(*source_vm, options);
  PostcopyDestination destination(*destination_vm, {});

  std::thread receiver([&] {
    Result<PostcopyDestinationStats> r = destination.Run(**listener);
    while (!r && destination.phase() == PostcopyPhase::kPaused) {
      fmt::print(stderr, "destination paused: {}\n", r.error().ToString());
      r = destination.Resume(**listener);
    }
    out.destination = r ? Status::Ok() : r.error();
    if (!r) fmt::print(stderr, "destination: {}\n", r.error().ToString());
    if (r) out.destination_stats = *r;
  });

  // One link per session; a cut breaks all of its connections.
  size_t next_cut = 0;
  std::shared_ptr<FaultController> link;
  auto connector = [&]() -> std::unique_ptr<Connector> {
    std::atomic_store(&link, FaultController::Create());
    return std::make_unique<FaultyConnector>(
        std::make_unique<TcpConnector>(address, TransportOptions{}), std::atomic_load(&link));
  };
  std::atomic<bool> done{false};
  std::atomic<uint32_t> resumes{0};
  std::thread cutter([&] {
    while (!done.load() && next_cut < plan.cuts.size()) {
      const PostcopyProgress p = source.progress();
      const uint64_t total = plan.mem / kWirePageSize;
      if (p.phase == PostcopyPhase::kPostcopy &&
          static_cast<double>(total - p.pages_remaining) >= plan.cuts[next_cut] * total) {
        ++next_cut;
        const uint32_t before = resumes.load();
        std::atomic_load(&link)->Cut();
        // The next cut is for the next session.
        while (!done.load() && resumes.load() == before) std::this_thread::sleep_for(1ms);
      }
      std::this_thread::sleep_for(200us);
    }
  });
  auto c = connector();
  Result<PostcopySourceStats> r = source.Run(*c);
  while (!r && source.phase() == PostcopyPhase::kPaused && out.resumes < 10) {
    fmt::print(stderr, "source paused: {}\n", r.error().ToString());
    ++out.resumes;
    c = connector();
    resumes.store(out.resumes);
    r = source.Resume(*c);
  }
  done.store(true);
  cutter.join();
  out.source = r ? Status::Ok() : r.error();
  if (r) out.source_stats = *r;
  receiver.join();
  (*from)->Stop();
  from->reset();
  if (out.source.ok() && out.destination.ok()) {
    std::this_thread::sleep_for(200ms);
    (*to)->SetGuestCommand(FL_CMD_STOP);
    out.report = (*to)->Wait(240s);
  }
  (*to)->Stop();
  return out;
}

void ExpectVerified(const Outcome& o) {
  ASSERT_TRUE(o.source.ok()) << o.source.ToString();
  ASSERT_TRUE(o.destination.ok()) << o.destination.ToString();
  ASSERT_TRUE(o.report.has_value()) << o.report.error().ToString();
  EXPECT_TRUE(o.report->success());
  EXPECT_EQ(o.report->bad_page_count(), 0u);
  for (uint32_t i = 0; i < 2; ++i) {
    EXPECT_TRUE(o.before.vcpus[i].booted);
    EXPECT_TRUE(o.report->vcpus[i].done);
    EXPECT_EQ(o.report->vcpus[i].bad_pages, 0u);
    EXPECT_EQ(o.report->vcpus[i].pages_verified, o.before.vcpus[i].pages);
  }
  const PostcopyDestinationStats& d = o.destination_stats;
  fmt::print(
      "post-copy: {} pre-copy passes, {} pages present at the start, {} dirty; vCPUs ran {:.2f} ms "
      "after the Switchover arrived (state {:.2f}, channels {:.2f}, paging {:.2f}); {} pages "
      "demanded, {} pushed, fault p50 {:.0f} us p99 {:.0f} "
      "us; {} sessions\n",
      d.passes, d.present_at_start, d.dirty_at_switchover, d.start_vm.count() / 1e3,
      d.state_wait.count() / 1e3, d.channels_wait.count() / 1e3, d.start_paging.count() / 1e3,
      d.network.pages_demanded, d.network.pages_pushed, d.network.fault_latency.p50_us,
      d.network.fault_latency.p99_us, d.sessions);
}

class PostcopyBackingTest : public ::testing::TestWithParam<Backing> {};

TEST_P(PostcopyBackingTest, GuestVerifiesEveryPageOnTheDestination) {
  constexpr uint64_t kMem = 256ull << 20;
  std::optional<HugePages> huge;
  if (GetParam() == Backing::kHugetlb) huge.emplace(2 * kMem / (2 << 20) + 8);
  for (int run = 0; run < 2; ++run) {
    SCOPED_TRACE(fmt::format("run {}", run));
    // The second run switches over without any pre-copy: every page comes
    // by request or push.
    Outcome o =
        RunPostcopy({.mem = kMem, .backing = GetParam(), .precopy_passes = 1u - run, .cuts = {}});
    ExpectVerified(o);
    EXPECT_EQ(o.destination_stats.sessions, 1u);
    EXPECT_EQ(o.source_stats.requests_rejected, 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(Backings, PostcopyBackingTest,
                         ::testing::Values(Backing::kAnonymous, Backing::kMemfd, Backing::kHugetlb,
                                           Backing::kGuestMemfd),
                         [](const auto& info) { return std::string(BackingName(info.param)); });

TEST(PostcopyTest, TwoGiBGuestVerifiesEveryPage) {
  Outcome o = RunPostcopy(
      {.mem = 2ull << 30, .backing = Backing::kAnonymous, .precopy_passes = 1, .cuts = {}});
  ExpectVerified(o);
}

TEST(PostcopyRecoveryTest, LinkCutThreeTimesResumesAndCompletes) {
  for (Backing backing : {Backing::kAnonymous, Backing::kMemfd}) {
    SCOPED_TRACE(BackingName(backing));
    Outcome o = RunPostcopy(
        {.mem = 256ull << 20, .backing = backing, .precopy_passes = 0, .cuts = {0.05, 0.4, 0.8}});
    ExpectVerified(o);
    EXPECT_EQ(o.resumes, 3u);
    EXPECT_EQ(o.destination_stats.sessions, 4u);
  }
}

// A destination that sends a page request for an index past the end of the
// block: the source rejects and logs it, and answers the next request.
TEST(PostcopySourceTest, OutOfRangePageRequestIsRejectedAndLogged) {
  const vmm::VmConfig config = GuestConfig(64ull << 20, Backing::kAnonymous);
  auto from = vmm::Vm::Create(config);
  ASSERT_TRUE(from.has_value()) << from.error().ToString();
  ASSERT_TRUE((*from)->Start().ok());
  std::this_thread::sleep_for(300ms);
  auto listener = TcpListener::Listen(Address{"tcp", "127.0.0.1", 0}, {});
  ASSERT_TRUE(listener.has_value());
  TcpConnector connector(Address{"tcp", "127.0.0.1", (*listener)->port()}, TransportOptions{});
  auto source_vm = MakeSourceVm(**from);
  PostcopySourceOptions options;
  options.base.page_channels = 1;
  options.precopy_passes = 0;
  std::mutex log_mu;
  std::vector<std::string> log;
  options.log = [&](std::string_view line) {
    std::lock_guard lock(log_mu);
    log.emplace_back(line);
  };
  PostcopySource source(*source_vm, options);
  Result<PostcopySourceStats> result = Error("not run");
  std::thread sender([&] { result = source.Run(connector); });

  // The hostile destination.
  ReceiverConfig rc;
  for (const auto& b : (*from)->memory().blocks()) rc.blocks.push_back(DescribeBlock(*b));
  rc.features_supported = kFeatureAuth | kFeaturePostcopy | kFeatureRecovery;
  SessionReceiver receiver(rc, *RandomNonce());
  auto session = AcceptSession(**listener, receiver);
  ASSERT_TRUE(session.has_value()) << session.error().ToString();
  auto priority = AcceptPriorityChannel(**listener, *session, {}, 10s);
  ASSERT_TRUE(priority.has_value()) << priority.error().ToString();
  for (uint32_t seen = 0; seen < 2;) {  // Switchover, then one VcpuState each
    Result<Message> m = session->main->reader().Read();
    ASSERT_TRUE(m.has_value()) << m.error().ToString();
    seen += std::holds_alternative<VcpuStateMessage>(*m);
  }
  const uint32_t pages = static_cast<uint32_t>((64ull << 20) / kWirePageSize);
  // The encoder checks nothing: a hostile peer can send any index.
  Channel& raw = (*priority)->channel();
  ASSERT_TRUE(raw.Send(EncodeFrame(PageRequest{0, 1, {pages + 5}}, 1)).ok());
  ASSERT_TRUE(raw.Send(EncodeFrame(PageRequest{0, 2, {7}}, 2)).ok());
  // The answer to the good request comes back (seq 0 was the ChannelHello).
  std::vector<uint8_t> page(kWirePageSize);
  Result<Message> reply = (*priority)->reader().Read();
  ASSERT_TRUE(reply.has_value()) << reply.error().ToString();
  const auto* header = std::get_if<PagesHeader>(&*reply);
  ASSERT_NE(header, nullptr);
  EXPECT_EQ(header->pages, std::vector<uint32_t>{7});
  ASSERT_TRUE((*priority)->reader().ReceivePageData({{MutableBuffer(page)}}).ok());
  EXPECT_EQ(
      0, std::memcmp(page.data(), (*from)->ram_block()->host() + 7 * kWirePageSize, kWirePageSize));
  // Hang up: the source pauses (it cannot know whether this destination runs the guest).
  session->Shutdown();
  (*priority)->channel().Shutdown();
  sender.join();
  ASSERT_FALSE(result.has_value());
  EXPECT_EQ(source.phase(), PostcopyPhase::kPaused);
  std::lock_guard lock(log_mu);
  ASSERT_EQ(log.size(), 1u);
  EXPECT_THAT(log[0], HasSubstr("rejected a page request"));
  EXPECT_THAT(log[0], HasSubstr("out of range"));
  (*from)->Stop();
}

}  // namespace
}  // namespace faultline::migration
