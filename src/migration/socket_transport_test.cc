#include "src/migration/socket_transport.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <numeric>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/migration/test_util.h"
#include "src/sys/memfd.h"

namespace faultline::migration {
namespace {

using ::testing::HasSubstr;
using testing::Loopback;
using testing::MakeTcpPair;

TEST(AddressTest, Parses) {
  auto a = ParseAddress("tcp:127.0.0.1:4444");
  ASSERT_TRUE(a.has_value()) << a.error().ToString();
  EXPECT_EQ(a->host, "127.0.0.1");
  EXPECT_EQ(a->port, 4444);
  EXPECT_EQ(a->ToString(), "tcp:127.0.0.1:4444");
  a = ParseAddress("tcp:[::1]:0");
  ASSERT_TRUE(a.has_value()) << a.error().ToString();
  EXPECT_EQ(a->host, "::1");
  EXPECT_EQ(a->port, 0);
  EXPECT_EQ(a->ToString(), "tcp:[::1]:0");
  a = ParseAddress("tcp:localhost:65535");
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->host, "127.0.0.1");
}

TEST(AddressTest, ParsesUnix) {
  auto a = ParseAddress("unix:/run/faultline/vm 1.sock");
  ASSERT_TRUE(a.has_value()) << a.error().ToString();
  EXPECT_TRUE(a->is_unix());
  EXPECT_EQ(a->path, "/run/faultline/vm 1.sock");
  EXPECT_EQ(a->ToString(), "unix:/run/faultline/vm 1.sock");
}

TEST(AddressTest, Errors) {
  auto error = [](std::string_view text) { return ParseAddress(text).error().message(); };
  EXPECT_THAT(error("127.0.0.1:4444"), HasSubstr("unknown scheme '127.0.0.1'"));
  EXPECT_THAT(error("tcp4444"), HasSubstr("no scheme; expected tcp:HOST:PORT"));
  EXPECT_THAT(error("udp:127.0.0.1:1"), HasSubstr("unknown scheme 'udp' (tcp or unix)"));
  EXPECT_THAT(error("unix:"), HasSubstr("empty path"));
  EXPECT_THAT(error("unix:" + std::string(108, 'a')), HasSubstr("at most 107"));
  EXPECT_THAT(error("tcp:127.0.0.1"), HasSubstr("no port"));
  EXPECT_THAT(error("tcp:127.0.0.1:"), HasSubstr("port '' is not a number"));
  EXPECT_EQ(error("tcp:127.0.0.1:70000"),
            "address 'tcp:127.0.0.1:70000': port '70000' is not a number from 0 to 65535");
  EXPECT_EQ(error("tcp:127.0.0.1:44x"),
            "address 'tcp:127.0.0.1:44x': port '44x' is not a number from 0 to 65535");
  EXPECT_EQ(error("tcp::1:4444"),
            "address 'tcp::1:4444': put an IPv6 address in brackets, e.g. tcp:[::1]:4444");
  EXPECT_EQ(error("tcp:[::1:4444"), "address 'tcp:[::1:4444': unclosed '['");
  EXPECT_THAT(error("tcp::4444"), HasSubstr("empty host"));
  EXPECT_EQ(error("tcp:example.com:4444"),
            "address 'tcp:example.com:4444': host 'example.com' is not a numeric IPv4 or IPv6 "
            "address (host names are not resolved)");
}

TEST(TcpTransportTest, ScatterGatherAcrossBoundaries) {
  auto pair = MakeTcpPair();
  ASSERT_TRUE(pair.client && pair.server);
  std::vector<uint8_t> a(5), b(10000), c(1);
  std::iota(a.begin(), a.end(), 0);
  std::iota(b.begin(), b.end(), 7);
  c[0] = 0xee;
  const ConstBuffer parts[] = {a, {}, b, c};
  ASSERT_TRUE(pair.client->SendGather(parts).ok());
  // Received in pieces that straddle the sender's.
  std::vector<uint8_t> x(3), y(10002), z(1);
  const MutableBuffer out[] = {x, y, {}, z};
  ASSERT_TRUE(pair.server->ReceiveScatter(out).ok());
  std::vector<uint8_t> sent, got;
  for (auto& v : {a, b, c}) sent.insert(sent.end(), v.begin(), v.end());
  for (auto& v : {x, y, z}) got.insert(got.end(), v.begin(), v.end());
  EXPECT_EQ(sent, got);
  EXPECT_EQ(pair.client->stats().bytes_sent, 10006u);
  EXPECT_EQ(pair.server->stats().bytes_received, 10006u);
  EXPECT_THAT(pair.client->name(), HasSubstr("tcp 127.0.0.1:"));
  EXPECT_TRUE(pair.client->SetLowLatency(true).ok());
}

TEST(TcpTransportTest, ManyPiecesBeyondIovMax) {
  auto pair = MakeTcpPair();
  ASSERT_TRUE(pair.client && pair.server);
  std::vector<uint8_t> data(3000 * 7);
  std::iota(data.begin(), data.end(), 0);
  std::vector<ConstBuffer> parts;
  for (size_t i = 0; i < 3000; ++i) parts.push_back(ConstBuffer(data).subspan(i * 7, 7));
  std::thread sender([&] { EXPECT_TRUE(pair.client->SendGather(parts).ok()); });
  std::vector<uint8_t> got(data.size());
  std::vector<MutableBuffer> out;
  for (size_t i = 0; i < 2100; ++i) out.push_back(MutableBuffer(got).subspan(i * 10, 10));
  EXPECT_TRUE(pair.server->ReceiveScatter(out).ok());
  sender.join();
  EXPECT_EQ(got, data);
}

TEST(TcpTransportTest, PeerCloseIsAnError) {
  auto pair = MakeTcpPair();
  ASSERT_TRUE(pair.client && pair.server);
  const uint8_t three[3] = {1, 2, 3};
  ASSERT_TRUE(pair.client->Send(three).ok());
  pair.client.reset();
  uint8_t buf[10];
  Status s = pair.server->Receive(buf);
  EXPECT_EQ(s.code(), ECONNRESET);
  EXPECT_THAT(s.message(), HasSubstr("connection closed by the peer after 3 of 10 bytes"));
}

TEST(TcpTransportTest, ShutdownUnblocksReceiverAndSender) {
  auto pair = MakeTcpPair();
  ASSERT_TRUE(pair.client && pair.server);
  Status receive_status;
  std::thread receiver([&] {
    uint8_t buf[16];
    receive_status = pair.server->Receive(buf);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  pair.server->Shutdown();
  receiver.join();
  EXPECT_EQ(receive_status.code(), ESHUTDOWN);
  EXPECT_THAT(receive_status.message(), HasSubstr("channel shut down"));
  const uint8_t one[1] = {1};
  EXPECT_FALSE(pair.server->Send(one).ok());

  // A sender blocked on a full socket buffer (nobody reads) is woken too.
  Status send_status;
  std::thread sender([&] {
    std::vector<uint8_t> big(64 << 20);
    send_status = pair.client->Send(big);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  pair.client->Shutdown();
  sender.join();
  EXPECT_FALSE(send_status.ok());
}

TEST(TcpTransportTest, IoTimeout) {
  TransportOptions options;
  options.io_timeout = std::chrono::milliseconds(100);
  auto pair = MakeTcpPair(options);
  ASSERT_TRUE(pair.client && pair.server);
  uint8_t buf[4];
  const auto start = std::chrono::steady_clock::now();
  Status s = pair.server->Receive(buf);
  // Nothing at all arrived: EAGAIN, and the channel is still usable.
  EXPECT_EQ(s.code(), EAGAIN);
  EXPECT_THAT(s.message(), HasSubstr("nothing received within the I/O timeout"));
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(90));
  const uint8_t two[2] = {1, 2};
  ASSERT_TRUE(pair.client->Send(two).ok());
  s = pair.server->Receive(buf);  // two of four bytes, then silence: final
  EXPECT_EQ(s.code(), ETIMEDOUT);
  EXPECT_THAT(s.message(), HasSubstr("made no progress within the I/O timeout (2 of 4 bytes"));
  ASSERT_TRUE(pair.client->Send(two).ok());
}

int IntOption(const Channel& channel, int level, int option) {
  const auto* socket = dynamic_cast<const SocketChannel*>(&channel);
  EXPECT_NE(socket, nullptr);
  if (socket == nullptr) return -1;
  int value = -1;
  socklen_t length = sizeof(value);
  EXPECT_EQ(getsockopt(socket->native_fd(), level, option, &value, &length), 0) << errno;
  return value;
}

// Both ends of a TCP channel: a dead link ends it after the link timeout,
// with data in flight (TCP_USER_TIMEOUT) or idle (keepalive probes).
TEST(TcpTransportTest, LinkTimeoutIsAppliedOnBothEnds) {
  struct Case {
    int link_ms, user_timeout_ms, idle_s, interval_s, probes;
  };
  for (const Case c :
       {Case{30'000, 30'000, 10, 5, 4}, Case{2'000, 2'000, 1, 1, 1}, Case{6'500, 6'500, 2, 1, 4}}) {
    TransportOptions options;
    options.link_timeout = std::chrono::milliseconds(c.link_ms);
    auto pair = MakeTcpPair(options);
    ASSERT_TRUE(pair.client && pair.server);
    for (const Channel* end : {pair.client.get(), pair.server.get()}) {
      SCOPED_TRACE(fmt::format("{} ms, {}", c.link_ms, end->name()));
      EXPECT_EQ(IntOption(*end, IPPROTO_TCP, TCP_USER_TIMEOUT), c.user_timeout_ms);
      EXPECT_EQ(IntOption(*end, SOL_SOCKET, SO_KEEPALIVE), 1);
      EXPECT_EQ(IntOption(*end, IPPROTO_TCP, TCP_KEEPIDLE), c.idle_s);
      EXPECT_EQ(IntOption(*end, IPPROTO_TCP, TCP_KEEPINTVL), c.interval_s);
      EXPECT_EQ(IntOption(*end, IPPROTO_TCP, TCP_KEEPCNT), c.probes);
    }
  }
}

TEST(TcpTransportTest, LinkTimeoutOutOfRangeIsRefused) {
  auto listener = SocketListener::Listen(Loopback(), {});
  ASSERT_TRUE(listener.has_value());
  TransportOptions options;
  options.link_timeout = std::chrono::milliseconds(500);
  SocketConnector connector(Address{"tcp", "127.0.0.1", (*listener)->port()}, options);
  auto refused = connector.Connect();
  ASSERT_FALSE(refused.has_value());
  EXPECT_THAT(refused.error().message(), HasSubstr("link timeout 500 ms: give 1000 ms to 1 h"));
}

TEST(TcpTransportTest, ConnectAndAcceptErrors) {
  uint16_t port;
  {
    auto listener = SocketListener::Listen(Loopback(), {});
    ASSERT_TRUE(listener.has_value());
    port = (*listener)->port();
    auto none = (*listener)->Accept(std::chrono::milliseconds(20));
    EXPECT_EQ(none.error().code(), ETIMEDOUT);
    EXPECT_THAT(none.error().message(), HasSubstr("no connection within 20 ms"));
  }
  SocketConnector connector(Address{"tcp", "127.0.0.1", port}, {});
  auto refused = connector.Connect();
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code(), ECONNREFUSED);
  EXPECT_THAT(refused.error().message(),
              HasSubstr(fmt::format("connect to tcp:127.0.0.1:{}", port)));
  EXPECT_FALSE(MakeConnector(Address{"tcp", "127.0.0.1", 0}, {}).has_value());
}

TEST(TcpTransportTest, Ipv6Loopback) {
  auto listener = SocketListener::Listen(Address{"tcp", "::1", 0}, {});
  if (!listener) GTEST_SKIP() << "no IPv6 loopback: " << listener.error().ToString();
  auto address = ParseAddress((*listener)->address());
  ASSERT_TRUE(address.has_value()) << address.error().ToString();
  auto connector = MakeConnector(*address, {});
  ASSERT_TRUE(connector.has_value());
  auto client = (*connector)->Connect();
  ASSERT_TRUE(client.has_value()) << client.error().ToString();
  auto server = (*listener)->Accept(std::chrono::seconds(5));
  ASSERT_TRUE(server.has_value());
  const uint8_t msg[2] = {4, 2};
  ASSERT_TRUE((*client)->Send(msg).ok());
  uint8_t got[2];
  ASSERT_TRUE((*server)->Receive(got).ok());
  EXPECT_EQ(got[1], 2);
  EXPECT_THAT((*server)->name(), HasSubstr("[::1]:"));
}

}  // namespace
}  // namespace faultline::migration

namespace faultline::migration {
namespace {

using ::testing::HasSubstr;

struct UnixPair {
  std::unique_ptr<SocketListener> listener;
  std::unique_ptr<Channel> client, server;
};

UnixPair MakeUnixPair() {
  UnixPair p;
  Address a;
  a.scheme = "unix";
  a.path = fmt::format("{}transport_{}.sock", ::testing::TempDir(), getpid());
  auto listener = SocketListener::Listen(a, {});
  EXPECT_TRUE(listener.has_value()) << listener.error().ToString();
  if (!listener) return p;
  p.listener = std::move(*listener);
  auto client = SocketConnector(a, {}).Connect();
  EXPECT_TRUE(client.has_value()) << client.error().ToString();
  auto server = p.listener->Accept(std::chrono::seconds(10));
  EXPECT_TRUE(server.has_value()) << server.error().ToString();
  if (client) p.client = std::move(*client);
  if (server) p.server = std::move(*server);
  return p;
}

TEST(UnixTransportTest, CarriesBytesAndDescriptors) {
  UnixPair p = MakeUnixPair();
  ASSERT_TRUE(p.client && p.server);
  EXPECT_THAT(p.client->name(), HasSubstr("unix "));
  EXPECT_TRUE(p.client->SetLowLatency(true).ok());  // nothing to do on a Unix socket
  auto memfd = sys::CreateMemfd("t", 4096, 0);
  ASSERT_TRUE(memfd.has_value());
  const uint8_t hello[] = {1, 2, 3, 4, 5};
  const int fds[] = {memfd->get(), memfd->get()};
  ASSERT_TRUE(p.client->SendWithFds(hello, fds).ok());
  uint8_t got[5] = {};
  auto received = p.server->ReceiveWithFds(got, 4);
  ASSERT_TRUE(received.has_value()) << received.error().ToString();
  ASSERT_EQ(received->size(), 2u);
  EXPECT_EQ(std::memcmp(got, hello, 5), 0);
  struct stat a {
  }, b{};
  ASSERT_EQ(fstat(memfd->get(), &a), 0);
  ASSERT_EQ(fstat((*received)[1].get(), &b), 0);
  EXPECT_EQ(a.st_ino, b.st_ino) << "the same file, passed";
  // More descriptors than the receiver takes: an error, none kept.
  ASSERT_TRUE(p.client->SendWithFds(hello, fds).ok());
  received = p.server->ReceiveWithFds(got, 1);
  ASSERT_FALSE(received.has_value());
  EXPECT_THAT(received.error().ToString(), HasSubstr("more than 1 descriptors"));
}

TEST(UnixTransportTest, TcpChannelsPassNoDescriptors) {
  auto pair = testing::MakeTcpPair();
  ASSERT_TRUE(pair.client);
  const uint8_t byte = 0;
  const int fd = 0;
  Status s = pair.client->SendWithFds({&byte, 1}, {&fd, 1});
  EXPECT_EQ(s.code(), EOPNOTSUPP);
  EXPECT_THAT(s.ToString(), HasSubstr("needs a unix: channel"));
}

}  // namespace
}  // namespace faultline::migration
