#include "src/migration/fault_transport.h"

#include <cerrno>
#include <cstring>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/migration/test_util.h"

namespace faultline::migration {
namespace {

using ::testing::HasSubstr;
using testing::MakeTcpPair;
using Clock = std::chrono::steady_clock;

struct FaultyPair {
  std::shared_ptr<FaultController> link;
  std::unique_ptr<Channel> client;  // wrapped
  std::unique_ptr<Channel> server;  // not wrapped
};

FaultyPair MakeFaultyPair(FaultPlan plan) {
  auto tcp = MakeTcpPair();
  FaultyPair pair;
  pair.link = FaultController::Create(plan);
  pair.client = pair.link->Wrap(std::move(tcp.client));
  pair.server = std::move(tcp.server);
  return pair;
}

TEST(FaultTransportTest, PassesBytesThroughUnchanged) {
  auto pair = MakeFaultyPair({});
  std::vector<uint8_t> data(100000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 7);
  ASSERT_TRUE(pair.client->Send(data).ok());
  std::vector<uint8_t> got(data.size());
  ASSERT_TRUE(pair.server->Receive(got).ok());
  EXPECT_EQ(got, data);
  EXPECT_EQ(pair.link->bytes_sent(), data.size());
  EXPECT_THAT(pair.client->name(), HasSubstr("faulty tcp"));
}

TEST(FaultTransportTest, DelayPerSend) {
  FaultPlan plan;
  plan.delay_per_send = std::chrono::milliseconds(10);
  auto pair = MakeFaultyPair(plan);
  const uint8_t byte[1] = {1};
  const auto start = Clock::now();
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(pair.client->Send(byte).ok());
  EXPECT_GE(Clock::now() - start, std::chrono::milliseconds(100));
  uint8_t got[10];
  ASSERT_TRUE(pair.server->Receive(got).ok());
}

// Each message: its send time (ns since the clock's epoch) and a body whose
// bytes follow from its index.
std::vector<uint8_t> StampedMessage(uint32_t index, size_t body) {
  std::vector<uint8_t> m(sizeof(int64_t) + sizeof(index) + body);
  const int64_t now = Clock::now().time_since_epoch().count();
  std::memcpy(m.data(), &now, sizeof(now));
  std::memcpy(m.data() + sizeof(now), &index, sizeof(index));
  for (size_t i = 0; i < body; ++i) m[sizeof(now) + sizeof(index) + i] = uint8_t(index * 31 + i);
  return m;
}

TEST(FaultTransportTest, OneWayDelayDeliversEverySendInOrderNoEarlierThanTheDelay) {
  FaultPlan plan;
  plan.one_way_delay = std::chrono::milliseconds(20);
  auto pair = MakeFaultyPair(plan);
  constexpr uint32_t kMessages = 50;
  auto body = [](uint32_t i) -> size_t { return (i * 7919) % 70000; };
  std::thread sender([&] {
    for (uint32_t i = 0; i < kMessages; ++i) {
      ASSERT_TRUE(pair.client->Send(StampedMessage(i, body(i))).ok());
    }
  });
  for (uint32_t i = 0; i < kMessages; ++i) {
    int64_t sent_ns = 0;
    uint32_t index = 0;
    ASSERT_TRUE(
        pair.server->Receive(MutableBuffer(reinterpret_cast<uint8_t*>(&sent_ns), sizeof(sent_ns)))
            .ok());
    const auto arrived = Clock::now();
    ASSERT_TRUE(
        pair.server->Receive(MutableBuffer(reinterpret_cast<uint8_t*>(&index), sizeof(index)))
            .ok());
    ASSERT_EQ(index, i);  // in order, nothing lost or repeated
    std::vector<uint8_t> got(body(i));
    ASSERT_TRUE(pair.server->Receive(got).ok());
    for (size_t k = 0; k < got.size(); ++k) ASSERT_EQ(got[k], uint8_t(i * 31 + k)) << k;
    EXPECT_GE(arrived - Clock::time_point(Clock::duration(sent_ns)), plan.one_way_delay) << i;
  }
  sender.join();
}

TEST(FaultTransportTest, OneWayDelayStillDeliversWhatWasSentBeforeTheChannelWent) {
  FaultPlan plan;
  plan.one_way_delay = std::chrono::milliseconds(30);
  auto pair = MakeFaultyPair(plan);
  std::vector<uint8_t> data(1 << 20);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 13);
  std::thread reader([&] {
    std::vector<uint8_t> got(data.size());
    EXPECT_TRUE(pair.server->Receive(got).ok());
    EXPECT_EQ(got, data);
  });
  for (size_t at = 0; at < data.size(); at += 4096) {
    ASSERT_TRUE(pair.client->Send(ConstBuffer(data.data() + at, 4096)).ok());
  }
  pair.client.reset();  // the line drains first
  reader.join();
}

TEST(FaultTransportTest, OneWayDelayDeliversWhatWasSentBeforeAShutdown) {
  FaultPlan plan;
  plan.one_way_delay = std::chrono::milliseconds(20);
  auto pair = MakeFaultyPair(plan);
  const uint8_t bytes[3] = {1, 2, 3};
  ASSERT_TRUE(pair.client->Send(bytes).ok());
  pair.client->Shutdown();
  uint8_t got[3] = {};
  ASSERT_TRUE(pair.server->Receive(got).ok());
  EXPECT_EQ(got[2], 3);
  uint8_t more[1];
  EXPECT_FALSE(pair.server->Receive(more).ok());  // then end of stream
  EXPECT_FALSE(pair.client->Send(bytes).ok());
}

TEST(FaultTransportTest, OneWayDelayLosesWhatIsInTheLineWhenTheLinkIsCut) {
  FaultPlan plan;
  plan.one_way_delay = std::chrono::seconds(30);  // nothing arrives before the cut
  auto pair = MakeFaultyPair(plan);
  const uint8_t byte[1] = {7};
  ASSERT_TRUE(pair.client->Send(byte).ok());
  pair.link->Cut();
  uint8_t got[1];
  EXPECT_FALSE(pair.server->Receive(got).ok());  // end of stream, not the byte
  Status again = pair.client->Send(byte);
  EXPECT_EQ(again.code(), ECONNABORTED) << again.ToString();
}

TEST(FaultTransportTest, ThrottleLimitsAggregateBandwidth) {
  FaultPlan plan;
  plan.bytes_per_second = 32 << 20;
  auto link = FaultController::Create(plan);
  auto a = MakeTcpPair();
  auto b = MakeTcpPair();
  auto a_client = link->Wrap(std::move(a.client));
  auto b_client = link->Wrap(std::move(b.client));
  // Two channels share the link: 2 x 4 MiB at 32 MiB/s take >= 250 ms.
  auto pump = [](Channel& out, Channel& in) {
    std::vector<uint8_t> chunk(256 << 10);
    std::thread reader([&] {
      std::vector<uint8_t> sink(4 << 20);
      EXPECT_TRUE(in.Receive(sink).ok());
    });
    for (int i = 0; i < 16; ++i) EXPECT_TRUE(out.Send(chunk).ok());
    reader.join();
  };
  const auto start = Clock::now();
  std::thread t1([&] { pump(*a_client, *a.server); });
  std::thread t2([&] { pump(*b_client, *b.server); });
  t1.join();
  t2.join();
  const auto elapsed = Clock::now() - start;
  EXPECT_GE(elapsed, std::chrono::milliseconds(240));
  EXPECT_LT(elapsed, std::chrono::seconds(5));
  EXPECT_EQ(link->bytes_sent(), 8u << 20);
}

TEST(FaultTransportTest, CutAfterBytesDeliversExactlyThePrefix) {
  FaultPlan plan;
  plan.cut_after_bytes_sent = 6000;
  auto pair = MakeFaultyPair(plan);
  std::vector<uint8_t> first(4000, 1), second(4000, 2);
  ASSERT_TRUE(pair.client->Send(first).ok());
  Status s = pair.client->Send(second);
  EXPECT_EQ(s.code(), ECONNABORTED);
  EXPECT_THAT(s.message(), HasSubstr("link cut by the test transport during send (2000 of 4000"));
  EXPECT_TRUE(pair.link->cut());
  std::vector<uint8_t> got(6000);
  ASSERT_TRUE(pair.server->Receive(got).ok());
  EXPECT_EQ(got[3999], 1);
  EXPECT_EQ(got[4000], 2);
  uint8_t more[1];
  EXPECT_EQ(pair.server->Receive(more).code(), ECONNRESET);  // the peer sees the break
  EXPECT_FALSE(pair.client->Send(first).ok());
}

TEST(FaultTransportTest, CutAfterBytesReceived) {
  FaultPlan plan;
  plan.cut_after_bytes_received = 10;
  auto tcp = MakeTcpPair();
  auto link = FaultController::Create(plan);
  auto server = link->Wrap(std::move(tcp.server));
  std::vector<uint8_t> data(16, 5);
  ASSERT_TRUE(tcp.client->Send(data).ok());
  uint8_t eight[8];
  ASSERT_TRUE(server->Receive(eight).ok());
  Status s = server->Receive(eight);
  EXPECT_EQ(s.code(), ECONNABORTED);
  EXPECT_THAT(s.message(), HasSubstr("during receive (2 of 8 bytes passed"));
}

TEST(FaultTransportTest, CutWakesBlockedAndSleepingThreadsOnEveryChannel) {
  FaultPlan plan;
  plan.bytes_per_second = 1024;  // a 1 MiB send would take 1024 s
  auto link = FaultController::Create(plan);
  auto a = MakeTcpPair();
  auto b = MakeTcpPair();
  auto a_client = link->Wrap(std::move(a.client));
  auto b_server = link->Wrap(std::move(b.server));
  Status send_status, receive_status;
  std::thread sender([&] {
    std::vector<uint8_t> big(1 << 20);
    send_status = a_client->Send(big);
  });
  std::thread receiver([&] {
    uint8_t buf[8];
    receive_status = b_server->Receive(buf);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const auto start = Clock::now();
  link->Cut();
  sender.join();
  receiver.join();
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(2));
  EXPECT_EQ(send_status.code(), ECONNABORTED);
  EXPECT_EQ(receive_status.code(), ECONNABORTED);
  EXPECT_THAT(receive_status.message(), HasSubstr("link cut by the test transport"));
  // A channel wrapped after the cut is cut from the start.
  auto c = MakeTcpPair();
  auto late = link->Wrap(std::move(c.client));
  const uint8_t byte[1] = {0};
  EXPECT_EQ(late->Send(byte).code(), ECONNABORTED);
}

TEST(FaultTransportTest, ConnectorAndAcceptorWrapBothSides) {
  auto listener = SocketListener::Listen(testing::Loopback(), {});
  ASSERT_TRUE(listener.has_value());
  const uint16_t port = (*listener)->port();
  auto source_link = FaultController::Create({});
  auto destination_link = FaultController::Create({});
  FaultyAcceptor acceptor(std::move(*listener), destination_link);
  FaultyConnector connector(
      std::make_unique<SocketConnector>(Address{"tcp", "127.0.0.1", port}, TransportOptions{}),
      source_link);
  auto client = connector.Connect();
  ASSERT_TRUE(client.has_value());
  auto server = acceptor.Accept(std::chrono::seconds(5));
  ASSERT_TRUE(server.has_value());
  const uint8_t msg[3] = {1, 2, 3};
  ASSERT_TRUE((*client)->Send(msg).ok());
  uint8_t got[3];
  ASSERT_TRUE((*server)->Receive(got).ok());
  EXPECT_EQ(source_link->bytes_sent(), 3u);
  EXPECT_EQ(destination_link->bytes_received(), 3u);
  destination_link->Cut();
  EXPECT_EQ((*server)->Receive(got).code(), ECONNABORTED);
  EXPECT_EQ((*client)->Receive(got).code(), ECONNRESET);  // the source side sees the break
}

}  // namespace
}  // namespace faultline::migration
