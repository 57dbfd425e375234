#include "src/migration/network_page_source.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <set>
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

// The pager's side of pushes, by hand: a place in `memory` per unit of
// `unit_pages` wire pages, each unit handed out once, as DemandPager does.
struct FakePushTarget final : paging::PushTarget {
  FakePushTarget(std::vector<uint8_t>& memory, uint64_t unit_pages)
      : memory(memory), unit(unit_pages * kWirePageSize) {}
  std::vector<paging::PushSlot> Claim(uint32_t block, uint64_t offset, uint64_t length) override {
    std::vector<paging::PushSlot> slots;
    for (uint64_t u = offset / unit; u * unit < offset + length; ++u) {
      if (!handed.insert(u).second) continue;
      slots.push_back({block, u * unit, std::span(memory).subspan(u * unit, unit),
                       [this](paging::FetchResult r) {
                         ++(r.kind == paging::FetchResult::Kind::kFilled ? filled : failed);
                       }});
    }
    return slots;
  }

  std::vector<uint8_t>& memory;
  const uint64_t unit;
  std::set<uint64_t> handed;
  int filled = 0;
  int failed = 0;
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

TEST(NetworkPageSourceTest, PushedPagesFillThePlacesThePagerClaims) {
  Peer peer;
  NetworkPageSource network({NetworkBlock{kPages * kWirePageSize, nullptr}});
  ASSERT_TRUE(network.Connect(peer.destination.get()).ok());
  std::vector<uint8_t> memory(kPages * kWirePageSize);
  FakePushTarget pager(memory, 1);
  network.SetPushTarget(&pager);
  peer.Deliver(network, *peer.source, *peer.destination, {3, 4, 5}, false);
  EXPECT_EQ(pager.filled, 3);
  EXPECT_EQ(memory[3 * kWirePageSize], 3);
  EXPECT_EQ(memory[5 * kWirePageSize + 100], 5);
  EXPECT_EQ(network.stats().requests_sent, 0u);  // pushed data needs no request
  EXPECT_EQ(network.stats().pages_pushed, 3u);
  EXPECT_EQ(network.outstanding_fetches(), 0u);
}

// A unit larger than a wire page (a huge page): its place is claimed by the
// first of its pages to arrive and completed by the last.
TEST(NetworkPageSourceTest, AClaimedHugeUnitCompletesWhenAllItsPagesArrived) {
  Peer peer;
  NetworkPageSource network({NetworkBlock{kPages * kWirePageSize, nullptr}});
  ASSERT_TRUE(network.Connect(peer.destination.get()).ok());
  std::vector<uint8_t> memory(kPages * kWirePageSize);
  FakePushTarget pager(memory, 4);
  network.SetPushTarget(&pager);
  peer.Deliver(network, *peer.source, *peer.destination, {4, 5}, false);
  EXPECT_EQ(pager.handed, (std::set<uint64_t>{1}));
  EXPECT_EQ(pager.filled, 0);
  EXPECT_EQ(network.outstanding_fetches(), 1u);
  peer.Deliver(network, *peer.source, *peer.destination, {6, 7}, false);
  EXPECT_EQ(pager.filled, 1);
  EXPECT_EQ(memory[7 * kWirePageSize], 7);
  EXPECT_EQ(network.stats().pages_pushed, 4u);
  EXPECT_EQ(network.stats().requests_sent, 0u);
}

// Without a target (before the pager runs) a push is dropped, to come again
// when a fetch asks; after CancelAll a claimed place is completed, failed.
TEST(NetworkPageSourceTest, PushesWithoutATargetAreDroppedAndCancelFailsClaims) {
  Peer peer;
  NetworkPageSource network({NetworkBlock{kPages * kWirePageSize, nullptr}});
  ASSERT_TRUE(network.Connect(peer.destination.get()).ok());
  std::vector<uint8_t> memory(kPages * kWirePageSize);
  peer.Deliver(network, *peer.source, *peer.destination, {1}, false);
  EXPECT_EQ(network.stats().pages_duplicate, 1u);
  EXPECT_FALSE(network.have()[0].Test(1));
  FakePushTarget pager(memory, 4);
  network.SetPushTarget(&pager);
  peer.Deliver(network, *peer.source, *peer.destination, {8}, false);
  EXPECT_EQ(network.outstanding_fetches(), 1u);
  network.CancelAll();
  EXPECT_EQ(pager.failed, 1);
  EXPECT_EQ(pager.filled, 0);
  EXPECT_EQ(network.outstanding_fetches(), 0u);
  // Claims after the cancel are given back at once, failed.
  peer.Deliver(network, *peer.source, *peer.destination, {20}, false);
  EXPECT_EQ(pager.failed, 2);
  EXPECT_EQ(network.outstanding_fetches(), 0u);
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
    // The pager's places for pushed pages: their places in `memory`.
    FakePushTarget pager(memory, 1);
    if (!direct) network.SetPushTarget(&pager);
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
    EXPECT_EQ(completed, 1);  // the fault's fetch
    // Pager block: one claim per pushed page (units of one page).
    EXPECT_EQ(static_cast<uint64_t>(pager.filled), direct ? 0u : s.pages_pushed);
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
