#include "src/migration/tls_transport.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <numeric>
#include <thread>

#include "src/migration/socket_transport.h"
#include "src/migration/test_util.h"
#include "src/migration/tls_test_certs.h"

namespace faultline::migration {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using testing::Loopback;
using testing::TestCa;
using namespace std::chrono_literals;

class TlsTransportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = ::testing::TempDir() + "tls_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    mkdir(root_.c_str(), 0700);
    ca_.WriteDir(Dir("src"), "source", "DNS:source,IP:127.0.0.1");
    ca_.WriteDir(Dir("dst"), "dest", "DNS:dest,IP:127.0.0.1");
  }
  std::string Dir(const std::string& name) const { return root_ + "/" + name; }

  TransportOptions Options(const std::string& dir, const std::string& peer_name = "") {
    TransportOptions options;
    auto tls = TlsContext::Load(dir, peer_name);
    EXPECT_TRUE(tls.has_value()) << tls.error().ToString();
    if (tls) options.tls = *tls;
    options.on_refused = [this](const std::string& line) {
      sys::MutexLock lock(mu_);
      refusals_.push_back(line);
    };
    return options;
  }
  std::vector<std::string> refusals() {
    sys::MutexLock lock(mu_);
    return refusals_;
  }

  // A TLS acceptor on 127.0.0.1 with the destination's certificates.
  std::unique_ptr<Acceptor> Listen(TransportOptions options) {
    auto acceptor = MakeAcceptor(Loopback(), options);
    EXPECT_TRUE(acceptor.has_value()) << acceptor.error().ToString();
    return acceptor ? std::move(*acceptor) : nullptr;
  }
  static Address AddressOf(const Acceptor& acceptor) { return *ParseAddress(acceptor.address()); }

  TestCa ca_;
  std::string root_;
  sys::Mutex mu_;
  std::vector<std::string> refusals_ GUARDED_BY(mu_);
};

std::vector<uint8_t> Pattern(size_t size, uint8_t seed) {
  std::vector<uint8_t> v(size);
  for (size_t i = 0; i < size; ++i) v[i] = static_cast<uint8_t>(i * 31 + seed + (i >> 12));
  return v;
}

TEST_F(TlsTransportTest, MutuallyAuthenticatedChannelCarriesDataBothWaysAtOnce) {
  TransportOptions dst = Options(Dir("dst"), "source");
  TransportOptions src = Options(Dir("src"), "dest");
  std::unique_ptr<Acceptor> acceptor = Listen(dst);
  ASSERT_TRUE(acceptor);
  auto connector = MakeConnector(AddressOf(*acceptor), src);
  ASSERT_TRUE(connector.has_value()) << connector.error().ToString();
  Result<std::unique_ptr<Channel>> server;
  std::thread accept([&] { server = acceptor->Accept(10s); });
  auto client = (*connector)->Connect();
  accept.join();
  ASSERT_TRUE(client.has_value()) << client.error().ToString();
  ASSERT_TRUE(server.has_value()) << server.error().ToString();
  EXPECT_THAT((*client)->name(), HasSubstr("(TLS)"));

  // 24 MiB each way at once, sent as a header and page-sized pieces (the
  // shape of a Pages message), received in other pieces.
  const std::vector<uint8_t> up = Pattern(24 << 20, 1), down = Pattern(24 << 20, 2);
  auto send = [](Channel& c, const std::vector<uint8_t>& data) {
    std::vector<ConstBuffer> parts{ConstBuffer(data.data(), 24)};
    for (size_t off = 24; off < data.size(); off += 4096)
      parts.emplace_back(data.data() + off, std::min<size_t>(4096, data.size() - off));
    return c.SendGather(parts);
  };
  std::vector<uint8_t> got_up(up.size()), got_down(down.size());
  Status s1, s2, r1, r2;
  std::thread t1([&] { s1 = send(**client, up); });
  std::thread t2([&] { s2 = send(**server, down); });
  std::thread t3([&] { r1 = (*server)->Receive(got_up); });
  r2 = (*client)->Receive(got_down);
  t1.join();
  t2.join();
  t3.join();
  ASSERT_TRUE(s1.ok()) << s1.ToString();
  ASSERT_TRUE(s2.ok()) << s2.ToString();
  ASSERT_TRUE(r1.ok()) << r1.ToString();
  ASSERT_TRUE(r2.ok()) << r2.ToString();
  EXPECT_TRUE(got_up == up);
  EXPECT_TRUE(got_down == down);
  EXPECT_EQ((*client)->stats().bytes_sent, up.size());
  EXPECT_EQ((*server)->stats().bytes_received, up.size());

  const TlsStats stats = src.tls->stats();
  EXPECT_EQ(stats.handshakes, 1u);
  EXPECT_EQ(stats.protocol, "TLSv1.3");
  EXPECT_EQ(stats.cipher, "TLS_AES_128_GCM_SHA256");
  EXPECT_EQ(dst.tls->stats().refused, 0u);
  fmt::print("{}\n", src.tls->Describe());
}

// The acceptor goes on past peers that fail, within one Accept: a
// plaintext peer and a silent one are refused or left waiting, and the good
// client that comes after them gets its channel.
TEST_F(TlsTransportTest, PlaintextAndSilentPeersDoNotHoldUpAGoodOne) {
  TransportOptions dst = Options(Dir("dst"));
  dst.connect_timeout = 1500ms;  // the handshake's limit on this side
  std::unique_ptr<Acceptor> acceptor = Listen(dst);
  ASSERT_TRUE(acceptor);
  const Address address = AddressOf(*acceptor);
  SocketConnector plain(address, {});
  auto silent = plain.Connect();
  ASSERT_TRUE(silent.has_value());
  auto talker = plain.Connect();
  ASSERT_TRUE(talker.has_value());
  const std::vector<uint8_t> hello = Pattern(96, 7);
  ASSERT_TRUE((*talker)->Send(hello).ok());

  Result<std::unique_ptr<Channel>> server;
  std::thread accept([&] { server = acceptor->Accept(10s); });
  std::this_thread::sleep_for(200ms);  // the bad ones are pending first
  auto good = (*MakeConnector(address, Options(Dir("src"))))->Connect();
  accept.join();
  ASSERT_TRUE(good.has_value()) << good.error().ToString();
  ASSERT_TRUE(server.has_value()) << server.error().ToString();
  // The plaintext peer was refused with a reason; the silent one, once
  // its time is up, too.
  EXPECT_THAT(refusals(), ::testing::Contains(HasSubstr("does not speak TLS")));
  auto again = acceptor->Accept(3s);
  ASSERT_FALSE(again.has_value());
  EXPECT_EQ(again.error().code(), ETIMEDOUT);
  EXPECT_THAT(refusals(), ::testing::Contains(HasSubstr("silent peer")));
  EXPECT_EQ(dst.tls->stats().refused, 2u);
  EXPECT_EQ(dst.tls->stats().handshakes, 1u);
}

// An intruder with a CA of its own: each end refuses the other's
// certificate, and says so.
TEST_F(TlsTransportTest, ACertificateFromAnotherCaIsRefusedOnBothEnds) {
  TestCa other("another CA");
  other.WriteDir(Dir("intruder"), "source", "DNS:source");
  TransportOptions dst = Options(Dir("dst"));
  std::unique_ptr<Acceptor> acceptor = Listen(dst);
  ASSERT_TRUE(acceptor);
  TransportOptions intruder = Options(Dir("intruder"));
  ASSERT_TRUE(intruder.tls);
  Result<std::unique_ptr<Channel>> server;
  std::thread accept([&] { server = acceptor->Accept(2s); });
  auto client = (*MakeConnector(AddressOf(*acceptor), intruder))->Connect();
  accept.join();
  ASSERT_FALSE(server.has_value());
  EXPECT_THAT(server.error().ToString(), HasSubstr("refused"));
  EXPECT_EQ(dst.tls->stats().refused, 1u);
  ASSERT_FALSE(client.has_value());
  EXPECT_THAT(client.error().ToString(),
              AllOf(HasSubstr("failed verification"), HasSubstr(Dir("intruder") + "/ca.pem")));

  // The other way round: our source refuses a destination from another CA.
  other.WriteDir(Dir("fake_dst"), "dest", "DNS:dest");
  TransportOptions fake = Options(Dir("fake_dst"));
  std::unique_ptr<Acceptor> fake_acceptor = Listen(fake);
  ASSERT_TRUE(fake_acceptor);
  std::thread fake_accept([&] { (void)fake_acceptor->Accept(2s); });
  auto refused = (*MakeConnector(AddressOf(*fake_acceptor), Options(Dir("src"))))->Connect();
  fake_accept.join();
  ASSERT_FALSE(refused.has_value());
  EXPECT_THAT(refused.error().ToString(),
              AllOf(HasSubstr("failed verification"), HasSubstr(Dir("src") + "/ca.pem")));
  EXPECT_THAT(refusals(), ::testing::Contains(HasSubstr("refused this side's certificate")));
}

TEST_F(TlsTransportTest, ThePeerMustCarryTheExpectedName) {
  TransportOptions dst = Options(Dir("dst"));
  std::unique_ptr<Acceptor> acceptor = Listen(dst);
  ASSERT_TRUE(acceptor);
  std::thread accept([&] { (void)acceptor->Accept(2s); });
  auto client = (*MakeConnector(AddressOf(*acceptor), Options(Dir("src"), "elsewhere")))->Connect();
  accept.join();
  ASSERT_FALSE(client.has_value());
  EXPECT_THAT(client.error().ToString(), HasSubstr("does not name 'elsewhere'"));
}

TEST_F(TlsTransportTest, ATlsSourceToAPlaintextDestinationFailsWithAHint) {
  auto listener = SocketListener::Listen(Loopback(), {});
  ASSERT_TRUE(listener.has_value());
  TransportOptions src = Options(Dir("src"));
  src.connect_timeout = 1s;
  auto connector = MakeConnector(Address{"tcp", "127.0.0.1", (*listener)->port()}, src);
  std::thread accept([&] {
    // A plaintext destination reads the ClientHello as garbage and hangs up.
    auto c = (*listener)->Accept(5s);
    std::array<uint8_t, 16> bytes{};
    if (c) (void)(*c)->Receive(bytes);
  });
  auto client = (*connector)->Connect();
  accept.join();
  ASSERT_FALSE(client.has_value());
  EXPECT_THAT(client.error().ToString(), HasSubstr("--tls-dir"));
}

TEST_F(TlsTransportTest, ReceiveTimesOutIntactAndShutdownWakesIt) {
  TransportOptions dst = Options(Dir("dst")), src = Options(Dir("src"));
  dst.io_timeout = 300ms;
  std::unique_ptr<Acceptor> acceptor = Listen(dst);
  ASSERT_TRUE(acceptor);
  Result<std::unique_ptr<Channel>> server;
  std::thread accept([&] { server = acceptor->Accept(10s); });
  auto client = (*MakeConnector(AddressOf(*acceptor), src))->Connect();
  accept.join();
  ASSERT_TRUE(server.has_value() && client.has_value());
  std::array<uint8_t, 4> bytes{};
  Status nothing = (*server)->Receive(bytes);
  EXPECT_EQ(nothing.code(), EAGAIN) << nothing.ToString();
  const std::array<uint8_t, 4> sent{1, 2, 3, 4};
  ASSERT_TRUE((*client)->Send(sent).ok());
  ASSERT_TRUE((*server)->Receive(bytes).ok());
  EXPECT_EQ(bytes, sent);

  std::thread stopper([&] {
    std::this_thread::sleep_for(100ms);
    (*client)->Shutdown();
  });
  Status stopped = (*client)->Receive(bytes);
  stopper.join();
  EXPECT_EQ(stopped.code(), ESHUTDOWN) << stopped.ToString();
  // The peer sees the end of the stream.
  Status ended = (*server)->Receive(bytes);
  EXPECT_EQ(ended.code(), ECONNRESET) << ended.ToString();
}

TEST_F(TlsTransportTest, LoadSaysWhichFileIsWrong) {
  auto missing = TlsContext::Load(Dir("nowhere"));
  ASSERT_FALSE(missing.has_value());
  EXPECT_THAT(missing.error().ToString(), AllOf(HasSubstr("ca.pem"), HasSubstr("section 8.2")));

  // A key that is not the certificate's.
  ca_.WriteDir(Dir("mixed"), "x", "DNS:x");
  ASSERT_EQ(std::rename((Dir("src") + "/key.pem").c_str(), (Dir("mixed") + "/key.pem").c_str()), 0);
  auto mixed = TlsContext::Load(Dir("mixed"));
  ASSERT_FALSE(mixed.has_value());
  EXPECT_THAT(mixed.error().ToString(), HasSubstr("is not the key of"));

  // A certificate the directory's CA did not sign.
  TestCa other("another CA");
  other.WriteDir(Dir("foreign"), "x", "DNS:x", &ca_);
  auto foreign = TlsContext::Load(Dir("foreign"));
  ASSERT_FALSE(foreign.has_value());
  EXPECT_THAT(foreign.error().ToString(), HasSubstr("is not signed by"));

  // TLS is for TCP.
  TransportOptions unix_tls = Options(Dir("dst"));
  auto refused = MakeAcceptor(Address{"unix", "", 0, root_ + "/sock"}, unix_tls);
  ASSERT_FALSE(refused.has_value());
  EXPECT_THAT(refused.error().ToString(), HasSubstr("TLS protects TCP channels"));
}

}  // namespace
}  // namespace faultline::migration
