// TLS between faultline processes (issue 14): a post-copy migration over
// TLS that verifies every page, and a live TLS destination that refuses a
// plaintext peer, a certificate from another CA, a replayed handshake and
// a crowd of silent peers, each before any page, and then takes the real
// migration, whose guest verifies every page it wrote.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "src/migration/socket_transport.h"
#include "src/migration/tls_test_certs.h"
#include "src/migration/tls_transport.h"
#include "src/sys/unique_fd.h"
#include "tests/integration/cli_process.h"
#include "tests/integration/test_accel.h"

namespace faultline {
namespace {

using namespace ::faultline::clitest;  // NOLINT: the test helpers
using migration::testing::TestCa;
using ::testing::HasSubstr;
using ::testing::Not;
using namespace std::chrono_literals;

// TLS directories under the test's temporary directory: "src" and "dst"
// from one CA, "intruder" from another.
class TlsDirs {
 public:
  TlsDirs() : root_(fmt::format("{}tls_cli_{}", ::testing::TempDir(), getpid())) {
    mkdir(root_.c_str(), 0700);
    ca_.WriteDir(Dir("src"), "source", "DNS:source,IP:127.0.0.1");
    ca_.WriteDir(Dir("dst"), "dest", "DNS:dest,IP:127.0.0.1");
    other_.WriteDir(Dir("intruder"), "source", "DNS:source,IP:127.0.0.1");
  }
  std::string Dir(const std::string& name) const { return root_ + "/" + name; }

 private:
  std::string root_;
  TestCa ca_;
  TestCa other_{"another CA"};
};

sys::UniqueFd Dial(uint16_t port) {
  sys::UniqueFd fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) return sys::UniqueFd();
  return fd;
}

// What a TLS source sends on one channel to a server with the
// destination's certificate: a real client's handshake and first record,
// captured on the way (as an eavesdropper on the path would), for replay.
std::vector<uint8_t> RecordAHandshake(const TlsDirs& dirs) {
  migration::TransportOptions dst, src;
  dst.tls = *migration::TlsContext::Load(dirs.Dir("dst"));
  src.tls = *migration::TlsContext::Load(dirs.Dir("src"));
  auto server = *migration::MakeAcceptor({"tcp", "127.0.0.1", 0}, dst);
  const uint16_t server_port = migration::ParseAddress(server->address())->port;
  auto tap = *migration::SocketListener::Listen({"tcp", "127.0.0.1", 0}, {});
  std::vector<uint8_t> recorded;
  std::thread accept([&] {
    auto channel = server->Accept(10s);
    std::array<uint8_t, 5> hello{};
    if (channel) (void)(*channel)->Receive(hello);
  });
  std::thread relay([&] {
    // One connection through: client bytes recorded and passed on, the
    // server's passed back, until the server hangs up.
    auto in = tap->AcceptSocket(10s);
    if (!in) return;
    sys::UniqueFd out = Dial(server_port);
    pollfd fds[2] = {{(*in)->native_fd(), POLLIN, 0}, {out.get(), POLLIN, 0}};
    char buf[16384];
    while (poll(fds, 2, 5000) > 0) {
      if (fds[0].revents != 0) {
        const ssize_t n = recv(fds[0].fd, buf, sizeof(buf), 0);
        if (n <= 0) break;
        recorded.insert(recorded.end(), buf, buf + n);
        (void)send(out.get(), buf, static_cast<size_t>(n), MSG_NOSIGNAL);
      }
      if (fds[1].revents != 0) {
        const ssize_t n = recv(fds[1].fd, buf, sizeof(buf), 0);
        if (n <= 0) break;
        (void)send(fds[0].fd, buf, static_cast<size_t>(n), MSG_NOSIGNAL);
      }
    }
  });
  auto client = (*migration::MakeConnector({"tcp", "127.0.0.1", tap->port()}, src))->Connect();
  EXPECT_TRUE(client.has_value()) << client.error().ToString();
  const std::array<uint8_t, 5> hello{'h', 'e', 'l', 'l', 'o'};
  if (client) {
    EXPECT_TRUE((*client)->Send(hello).ok());
  }
  accept.join();
  if (client) (*client)->Shutdown();
  relay.join();
  return recorded;
}

TEST(TlsCliTest, DemoPostcopyOverTlsVerifiesEveryPage) {
  TlsDirs dirs;
  Cli demo({"demo", "--mode", "postcopy", "--mem", itest::MemArg("256M", "64M"), "--tls-dir",
            dirs.Dir("src"), "--json"});
  ASSERT_EQ(demo.Wait(300s), 0) << demo.Describe();
  nlohmann::json j = demo.Json();
  EXPECT_EQ(j["bad_pages"].get<uint64_t>(), 0u) << j.dump();
  EXPECT_EQ(j["pages_verified"], j["workload_pages"]) << j.dump();
  // Both ends' channels count in the one context the demo shares.
  EXPECT_THAT(j["tls"].get<std::string>(), HasSubstr("TLSv1.3")) << j.dump();
  fmt::print("demo over TLS: {}\n", j["tls"].get<std::string>());
}

TEST(TlsCliTest, HostilePeersAreRefusedBeforeAnyPageAndTheRealMigrationCompletes) {
  TlsDirs dirs;
  const std::string mem = itest::MemArg("256M", "64M");
  Destination dest = StartDestination(mem, "anon", {"--tls-dir", dirs.Dir("dst")});
  ASSERT_NE(dest.port, 0) << dest.cli->Describe();
  const std::string control = ControlPath();
  std::unique_ptr<Cli> source = StartSource(control, mem, "anon", 8);
  ASSERT_TRUE(AwaitRandomWrites(control, *source));
  const std::string to = fmt::format("tcp:127.0.0.1:{}", dest.port);
  const uint64_t rss_before = RssKib(dest.cli->pid());

  // 1. A plaintext source, the real one and the hostile tool's.
  Cli plain({"migrate", "--control", control, "--to", to, "--json"});
  EXPECT_EQ(plain.Wait(), 1) << plain.Describe();
  EXPECT_TRUE(dest.cli->AwaitStderr("does not speak TLS", 20s)) << dest.cli->Describe();
  Hostile(dest.port, {"hello"});
  // 2. A source whose certificate another CA signed (and which trusts that
  // CA only: it refuses the destination too).
  Cli intruder(
      {"migrate", "--control", control, "--to", to, "--tls-dir", dirs.Dir("intruder"), "--json"});
  EXPECT_EQ(intruder.Wait(), 1) << intruder.Describe();
  EXPECT_THAT(intruder.out() + intruder.err(), HasSubstr("failed verification"))
      << intruder.Describe();
  EXPECT_TRUE(dest.cli->AwaitStderr("refused this side's certificate", 20s))
      << dest.cli->Describe();
  EXPECT_THAT(Hostile(dest.port, {"hello", "--tls-dir", dirs.Dir("intruder")}).dump(),
              HasSubstr("failed verification"));
  // 3. A real source's handshake, recorded elsewhere and replayed here; and
  // bytes that are no protocol at all.
  const std::vector<uint8_t> recorded = RecordAHandshake(dirs);
  ASSERT_GT(recorded.size(), 500u);
  const std::string replay = dirs.Dir("replay.bin");
  std::ofstream(replay, std::ios::binary)
      .write(reinterpret_cast<const char*>(recorded.data()),
             static_cast<std::streamsize>(recorded.size()));
  Hostile(dest.port, {"replay", "--file", replay});
  Hostile(dest.port, {"oversized"});
  Hostile(dest.port, {"garbage", "--bytes", "65536"});
  // 4. Silent peers, more than the destination handshakes at once, still
  // connected while the real migration comes (the 16 newest are still in
  // their handshakes when the tool lets go: it exits 1).
  Cli silent({"--to", to, "silent", "--count", "40", "--hold-ms", "4000"},
             FAULTLINE_HOSTILE_PEER_PATH);
  std::this_thread::sleep_for(1s);
  const uint64_t rss_attacked = RssKib(dest.cli->pid());
  const std::string said = dest.cli->err();
  EXPECT_THAT(said, HasSubstr("a replayed or tampered handshake"));
  EXPECT_THAT(said, HasSubstr("the oldest is dropped"));
  EXPECT_THAT(said, Not(HasSubstr("error")));
  // The source's guest never stopped.
  std::optional<nlohmann::json> status = Query(control, "query-status");
  ASSERT_TRUE(status) << source->Describe();
  EXPECT_EQ((*status)["state"], "running") << status->dump();

  // The real migration, over TLS, with the destination's name checked.
  Cli good({"migrate", "--control", control, "--to", to, "--tls-dir", dirs.Dir("src"),
            "--tls-peer-name", "dest", "--json"});
  ASSERT_EQ(good.Wait(), 0) << good.Describe() << "\n" << dest.cli->Describe();
  nlohmann::json m = good.Json();
  EXPECT_EQ(m["result"], "completed") << m.dump();
  EXPECT_THAT(m["migration"]["tls"].get<std::string>(), HasSubstr("TLSv1.3")) << m.dump();
  ASSERT_EQ(source->Wait(), 0) << source->Describe();
  ExpectVerifiedOn(*dest.cli, source->Json()["workload_pages"].get<uint64_t>());
  nlohmann::json d = dest.cli->Json();
  EXPECT_THAT(d["incoming"]["tls"].get<std::string>(), HasSubstr("refused")) << d.dump();
  EXPECT_EQ(silent.Wait(), 1) << silent.Describe();
  fmt::print("silent peers: {}\n", silent.out());
  fmt::print("destination RSS: {} KiB before the attacks, {} KiB under 40 silent peers\n",
             rss_before, rss_attacked);
  fmt::print("destination said:\n{}\n", said);
  fmt::print("the plaintext source said: {}\nthe intruder said: {}\n", plain.Json().dump(),
             intruder.Json().dump());
  ::testing::Test::RecordProperty("rss_before_kib", std::to_string(rss_before));
  ::testing::Test::RecordProperty("rss_attacked_kib", std::to_string(rss_attacked));
  // Bounded: 16 handshakes in flight at most, a few KiB each, whatever
  // the number of peers.
  EXPECT_LT(rss_attacked, rss_before + 32 * 1024);
}

}  // namespace
}  // namespace faultline
