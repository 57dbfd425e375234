#include "src/migration/network_page_source.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "src/migration/test_util.h"

namespace faultline::migration {
namespace {

using testing::MakeTcpPair;

constexpr uint64_t kPages = 64;

// The source's end of the priority channel, driven by hand.
struct Peer {
  Peer() {
    auto pair = MakeTcpPair();
    source = std::make_unique<Link>(std::move(pair.client));
    destination = std::make_unique<Link>(std::move(pair.server));
    source->reader().set_blocks(&blocks);
    destination->reader().set_blocks(&blocks);
  }
  // Reads one PageRequest on the source's end.
  PageRequest NextRequest() {
    Result<Message> m = source->reader().Read();
    EXPECT_TRUE(m.has_value()) << m.error().ToString();
    if (!m) return {};
    auto* r = std::get_if<PageRequest>(&*m);
    EXPECT_NE(r, nullptr);
    return r ? *r : PageRequest{};
  }
  // Sends `pages` filled with their index (byte) on `link` as the source, and
  // has the destination receive them.
  void Deliver(NetworkPageSource& network, Link& from, Link& to, std::vector<uint32_t> pages,
               bool reply) {
    std::vector<std::vector<uint8_t>> data;
    std::vector<ConstBuffer> parts;
    for (uint32_t p : pages) data.emplace_back(kWirePageSize, static_cast<uint8_t>(p));
    for (auto& d : data) parts.push_back(d);
    ASSERT_TRUE(from.writer().SendPages(PagesHeader{0, 1, 0, pages}, parts).ok());
    Result<Message> m = to.reader().Read();
    ASSERT_TRUE(m.has_value()) << m.error().ToString();
    ASSERT_TRUE(network.ReceivePages(to, std::get<PagesHeader>(*m), reply).ok());
  }

  std::vector<BlockInfo> blocks{
      BlockInfo{"ram0", kPages* kWirePageSize, 4096, Backing::kAnonymous}};
  std::unique_ptr<Link> source, destination;
};

TEST(NetworkPageSourceTest, FaultBecomesARequestAndTheReplyLandsInTheDestination) {
  Peer peer;
  NetworkPageSource network({NetworkBlock{kPages * kWirePageSize, nullptr}});
  ASSERT_TRUE(network.Connect(peer.destination.get()).ok());
  std::vector<uint8_t> dest(2 * kWirePageSize);
  std::atomic<int> done{0};
  network.Fetch({0, 10 * kWirePageSize, dest, paging::FetchPriority::kFault},
                [&](paging::FetchResult r) {
                  EXPECT_EQ(r.kind, paging::FetchResult::Kind::kFilled);
                  ++done;
                });
  PageRequest request = peer.NextRequest();
  EXPECT_EQ(request.pages, (std::vector<uint32_t>{10, 11}));
  EXPECT_EQ(done.load(), 0);
  peer.Deliver(network, *peer.source, *peer.destination, {10, 11}, true);
  EXPECT_EQ(done.load(), 1);
  EXPECT_EQ(dest[0], 10);
  EXPECT_EQ(dest[kWirePageSize], 11);
  // The same pages again (a push crossing the reply): ignored.
  peer.Deliver(network, *peer.source, *peer.destination, {10, 11}, false);
  EXPECT_EQ(done.load(), 1);
  const NetworkSourceStats s = network.stats();
  EXPECT_EQ(s.pages_demanded, 2u);
  EXPECT_EQ(s.pages_replied, 2u);
  EXPECT_EQ(s.pages_duplicate, 2u);
  EXPECT_EQ(s.fault_latency.count, 1u);
  EXPECT_TRUE(network.have()[0].Test(10));
}

TEST(NetworkPageSourceTest, PushedPagesAreOfferedToThePagerAndFillItsFetch) {
  Peer peer;
  NetworkPageSource network({NetworkBlock{kPages * kWirePageSize, nullptr}});
  ASSERT_TRUE(network.Connect(peer.destination.get()).ok());
  std::vector<uint8_t> dest(kWirePageSize * 3);
  int filled = 0;
  // The pager's push: a fetch for each offered page, into its own buffer.
  network.SetPushHook([&](uint32_t block, uint64_t offset, uint64_t length) {
    for (uint64_t o = offset; o < offset + length; o += kWirePageSize) {
      network.Fetch(
          {block, o, std::span(dest).subspan(o / kWirePageSize % 3 * kWirePageSize, kWirePageSize),
           paging::FetchPriority::kPush},
          [&](paging::FetchResult r) { filled += r.kind == paging::FetchResult::Kind::kFilled; });
    }
  });
  peer.Deliver(network, *peer.source, *peer.destination, {3, 4, 5}, false);
  EXPECT_EQ(filled, 3);
  EXPECT_EQ(dest[0], 3);  // 3 % 3 == 0
  EXPECT_EQ(dest[kWirePageSize], 4);
  EXPECT_EQ(network.stats().requests_sent, 0u);  // pushed data needs no request
  EXPECT_EQ(network.stats().pages_pushed, 3u);
}

// Every page that arrives counts once, as demanded (a fetch asked for it,
// whichever channel brought it) or pushed (nobody asked), so that with the
// pages held at the start they cover the whole block: for a block whose
// pushes go through the pager and for one whose pushes land in its memory.
TEST(NetworkPageSourceTest, EveryPageCountsOnceAsHeldDemandedOrPushed) {
  for (bool direct : {false, true}) {
    SCOPED_TRACE(direct ? "direct (hole) block" : "pager block");
    Peer peer;
    std::vector<uint8_t> memory(kPages * kWirePageSize);
    NetworkPageSource network(
        {NetworkBlock{kPages * kWirePageSize, direct ? memory.data() : nullptr}});
    ASSERT_TRUE(network.Connect(peer.destination.get()).ok());
    DirtyBitmap held(kPages);
    held.SetRange(0, 8);
    network.MarkHave(0, held);
    int completed = 0;
    auto count = [&](paging::FetchResult r) {
      completed += r.kind == paging::FetchResult::Kind::kFilled;
    };
    if (!direct) {
      // The pager's push: a fetch into the page's place in `memory`.
      network.SetPushHook([&](uint32_t block, uint64_t offset, uint64_t length) {
        network.Fetch({block, offset, std::span(memory).subspan(offset, length),
                       paging::FetchPriority::kPush},
                      count);
      });
    }
    // A fault on pages 10 and 11: 10 comes by a push that crosses the
    // request, 11 by the reply; then the push of everything else, 10 and
    // 11 again among it, and a held page pushed needlessly.
    network.Fetch(
        {0, 10 * kWirePageSize, std::span(memory).subspan(10 * kWirePageSize, 2 * kWirePageSize),
         paging::FetchPriority::kFault},
        count);
    EXPECT_EQ(peer.NextRequest().pages, (std::vector<uint32_t>{10, 11}));
    peer.Deliver(network, *peer.source, *peer.destination, {10}, false);
    peer.Deliver(network, *peer.source, *peer.destination, {11}, true);
    std::vector<uint32_t> rest;
    for (uint32_t p = 7; p < kPages; ++p) rest.push_back(p);
    for (size_t i = 0; i < rest.size(); i += 16) {
      peer.Deliver(
          network, *peer.source, *peer.destination,
          std::vector<uint32_t>(rest.begin() + static_cast<long>(i),
                                rest.begin() + static_cast<long>(std::min(i + 16, rest.size()))),
          false);
    }
    const NetworkSourceStats s = network.stats();
    EXPECT_EQ(s.pages_demanded, 2u);
    EXPECT_EQ(s.pages_replied, 1u);
    EXPECT_EQ(s.pages_requested, 2u);
    EXPECT_EQ(8 + s.pages_demanded + s.pages_pushed, kPages);
    EXPECT_EQ(s.pages_duplicate, 3u);  // 7 (held), 10 and 11
    EXPECT_EQ(network.have()[0].Count(), kPages);
    EXPECT_EQ(memory[40 * kWirePageSize], 40);
    // The fault's fetch, and (pager block) one per run of offered pages.
    EXPECT_EQ(completed, direct ? 1 : 6);
    EXPECT_EQ(network.outstanding_fetches(), 0u);
  }
}

TEST(NetworkPageSourceTest, OutstandingRequestsAreSentAgainOnReconnect) {
  Peer first;
  NetworkPageSource network({NetworkBlock{kPages * kWirePageSize, nullptr}});
  ASSERT_TRUE(network.Connect(first.destination.get()).ok());
  std::vector<uint8_t> dest(kWirePageSize);
  bool done = false;
  network.Fetch(
      {0, 7 * kWirePageSize, dest, paging::FetchPriority::kFault},
      [&](paging::FetchResult r) { done = r.kind == paging::FetchResult::Kind::kFilled; });
  EXPECT_EQ(first.NextRequest().pages, std::vector<uint32_t>{7});
  // The link breaks: the fetch waits, it does not fail.
  network.Disconnect();
  EXPECT_FALSE(done);
  EXPECT_EQ(network.outstanding_fetches(), 1u);
  Peer second;
  ASSERT_TRUE(network.Connect(second.destination.get()).ok());
  EXPECT_EQ(second.NextRequest().pages, std::vector<uint32_t>{7});
  second.Deliver(network, *second.source, *second.destination, {7}, true);
  EXPECT_TRUE(done);
  EXPECT_EQ(dest[0], 7);
}

TEST(NetworkPageSourceTest, DirectBlocksTakePushesInPlaceAndCompleteLaterFetchesWithoutACopy) {
  Peer peer;
  std::vector<uint8_t> memory(kPages * kWirePageSize);
  NetworkPageSource network({NetworkBlock{kPages * kWirePageSize, memory.data()}});
  ASSERT_TRUE(network.Connect(peer.destination.get()).ok());
  peer.Deliver(network, *peer.source, *peer.destination, {20, 21}, false);
  EXPECT_EQ(memory[20 * kWirePageSize], 20);
  bool done = false;
  network.Fetch(
      {0, 20 * kWirePageSize, std::span(memory).subspan(20 * kWirePageSize, 2 * kWirePageSize),
       paging::FetchPriority::kFault},
      [&](paging::FetchResult r) { done = r.kind == paging::FetchResult::Kind::kFilled; });
  EXPECT_TRUE(done);  // inline: the pages are in place already
  EXPECT_EQ(network.stats().fetches_inline, 1u);
  EXPECT_EQ(network.stats().requests_sent, 0u);
}

TEST(NetworkPageSourceTest, FetchOutsideTheBlockFailsAndCancelFailsWaiters) {
  NetworkPageSource network({NetworkBlock{kPages * kWirePageSize, nullptr}});
  std::vector<uint8_t> dest(kWirePageSize);
  paging::FetchResult::Kind kind{};
  network.Fetch({0, kPages * kWirePageSize, dest, paging::FetchPriority::kFault},
                [&](paging::FetchResult r) { kind = r.kind; });
  EXPECT_EQ(kind, paging::FetchResult::Kind::kFailed);
  kind = paging::FetchResult::Kind::kFilled;
  network.Fetch({0, 0, dest, paging::FetchPriority::kFault},
                [&](paging::FetchResult r) { kind = r.kind; });
  EXPECT_EQ(kind, paging::FetchResult::Kind::kFilled);  // not yet: no link, waiting
  network.CancelAll();
  EXPECT_EQ(kind, paging::FetchResult::Kind::kFailed);
}

}  // namespace
}  // namespace faultline::migration
