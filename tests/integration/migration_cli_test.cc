// Live migration as an operator runs it: real processes, real KVM, loopback
// TCP. A source `faultline run --control SOCK` runs the test guest writing
// random pages with its ledger; a destination `faultline run --incoming
// tcp:127.0.0.1:0` waits; `faultline migrate` moves the guest; the
// destination runs it to the end of its workload and verifies every page.
// Also: every backing, cancel mid-migration, and a destination fed bad
// input (through a tampering proxy, or a block list that does not match)
// refusing it while the source's guest goes on.
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <list>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "src/sys/mutex.h"
#include "tests/integration/cli_process.h"
#include "tests/integration/huge_pages.h"
#include "tests/integration/postcopy_cli.h"
#include "tests/integration/socket_io.h"
#include "tests/integration/test_accel.h"

namespace faultline {
namespace {

using ::faultline::integration::HugePages;
using namespace ::faultline::clitest;  // NOLINT: the test helpers

using ::testing::HasSubstr;
using ::testing::Not;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

struct MigrationRun {
  nlohmann::json migrate, source, destination;
};

// Source and destination processes of `mem`, a migration between them over
// `channels` page channels; expects it to complete and the guest to verify
// every page it wrote on the destination.
void MigrateAndVerify(const std::string& mem, const std::string& backing, int channels,
                      MigrationRun* out) {
  Destination dest = StartDestination(mem, backing);
  ASSERT_NE(dest.port, 0) << dest.cli->Describe();
  const std::string control = ControlPath();
  // 8 s of random writes (5 on the software CPU, whose guests are small):
  // time for the migration even on a busy machine under sanitizers, so that
  // the guest is still writing when it moves.
  std::unique_ptr<Cli> source = StartSource(control, mem, backing, itest::OnKvm() ? 8 : 5);
  ASSERT_TRUE(AwaitRandomWrites(control, *source));

  Cli migrate({"migrate", "--control", control, "--to", fmt::format("tcp:127.0.0.1:{}", dest.port),
               "--channels", std::to_string(channels), "--json"});
  ASSERT_EQ(migrate.Wait(), 0) << migrate.Describe() << "\n"
                               << source->Describe() << "\n"
                               << dest.cli->Describe();
  out->migrate = migrate.Json();
  EXPECT_EQ(out->migrate["result"], "completed");

  // The source process ends at once, saying where the guest went.
  ASSERT_EQ(source->Wait(), 0) << source->Describe();
  out->source = source->Json();
  ASSERT_FALSE(out->source.is_discarded()) << source->Describe();
  EXPECT_EQ(out->source["migrated_to"], fmt::format("tcp:127.0.0.1:{}", dest.port));
  const uint64_t written = out->source["workload_pages"].get<uint64_t>();
  EXPECT_GT(written, 0u);

  // The destination runs the rest of the workload, then verifies all of it.
  ASSERT_EQ(dest.cli->Wait(), 0) << dest.cli->Describe();
  out->destination = dest.cli->Json();
  ASSERT_FALSE(out->destination.is_discarded()) << dest.cli->Describe();
  const nlohmann::json& d = out->destination;
  EXPECT_TRUE(d["success"].get<bool>()) << d.dump();
  EXPECT_EQ(d["bad_pages"].get<uint64_t>(), 0u) << d.dump();
  EXPECT_EQ(d["pages_verified"].get<uint64_t>(), written) << d.dump();
  EXPECT_GE(d["incoming"]["passes"].get<uint32_t>(), 2u) << d.dump();
  for (const auto& v : d["vcpus"]) {
    // The random phase went on here before the final verify.
    bool random_here = false;
    for (const auto& p : v["phases"]) random_here |= p["phase"] == "random";
    EXPECT_TRUE(random_here) << d.dump();
  }
}

// Pre-copy of a guest writing random pages at 64 MiB/s, five times over.
class RepeatedMigrationTest : public ::testing::TestWithParam<int> {};

TEST_P(RepeatedMigrationTest, RandomWritesAt64MiBpsVerifyOnTheDestination) {
  // The software CPU under the sanitizers takes ~10 s a run: two of them
  // there (the same paths; the repetitions look for rare interleavings,
  // which KVM's five, and every other migration test on tcg, also meet).
  if (!itest::OnKvm() && GetParam() >= 2) {
    GTEST_SKIP() << "repetitions 3 to 5 run on KVM only (test time on the software CPU)";
  }
  MigrationRun run;
  MigrateAndVerify(itest::MemArg("384M", "64M"), "anon", 2, &run);
  if (!HasFailure()) {
    fmt::print("repetition {}: {} passes, downtime {} ms, {} pages verified\n", GetParam(),
               run.destination["incoming"]["passes"].dump(),
               run.migrate["migration"]["downtime_ms"].dump(),
               run.destination["pages_verified"].dump());
  }
}

INSTANTIATE_TEST_SUITE_P(FiveTimes, RepeatedMigrationTest, ::testing::Range(0, 5));

class BackingMigrationTest : public ::testing::TestWithParam<std::string> {};

TEST_P(BackingMigrationTest, Migrates) {
  if (GetParam() == "gmem") FAULTLINE_SKIP_UNLESS_GUEST_MEMFD();
  // Source and destination: 2 x 256 MiB of 2 MiB pages.
  std::optional<HugePages> huge;
  if (GetParam() == "hugetlb") huge.emplace(256);
  MigrationRun run;
  MigrateAndVerify(itest::MemArg("256M", "64M"), GetParam(), 2, &run);
  if (GetParam() == "gmem" && !HasFailure()) {
    // No dirty log for guest_memfd: every pass is every page, so pre-copy
    // stops iterating and copies what is left with the guest stopped.
    EXPECT_LE(run.destination["incoming"]["passes"].get<uint32_t>(), 3u);
  }
}

INSTANTIATE_TEST_SUITE_P(FourBackings, BackingMigrationTest,
                         ::testing::Values("anon", "memfd", "hugetlb", "gmem"),
                         [](const auto& info) { return info.param; });

TEST(MigrationCliTest, CancelLeavesTheGuestRunningOnTheSource) {
  Destination dest = StartDestination(itest::MemArg("256M", "64M"), "anon");
  ASSERT_NE(dest.port, 0) << dest.cli->Describe();
  const std::string control = ControlPath();
  std::unique_ptr<Cli> source = StartSource(control, itest::MemArg("256M", "64M"), "anon", 4);
  ASSERT_TRUE(AwaitRandomWrites(control, *source));
  // Slow enough to be cancelled in the middle of the first pass.
  Cli migrate({"migrate", "--control", control, "--to", fmt::format("tcp:127.0.0.1:{}", dest.port),
               "--bandwidth", "16M", "--json"});
  auto deadline = Clock::now() + 30s;
  for (;;) {
    std::optional<nlohmann::json> m = Query(control, "query-migrate");
    ASSERT_TRUE(m.has_value());
    if ((*m)["phase"] == "precopy" && (*m)["bytes_sent"].get<uint64_t>() > (8u << 20)) break;
    ASSERT_LT(Clock::now(), deadline) << m->dump();
    std::this_thread::sleep_for(50ms);
  }
  Cli cancel({"migrate", "--control", control, "--cancel", "--json"});
  ASSERT_EQ(cancel.Wait(), 0) << cancel.Describe();
  EXPECT_EQ(cancel.Json()["result"], "cancelled") << cancel.Describe();
  EXPECT_EQ(migrate.Wait(), 1) << migrate.Describe();
  EXPECT_EQ(migrate.Json()["result"], "cancelled") << migrate.Describe();

  // The destination gives up without running anything.
  EXPECT_EQ(dest.cli->Wait(), 1) << dest.cli->Describe();
  EXPECT_THAT(dest.cli->err(), HasSubstr("The guest was not started here"));
  ExpectVerifiedHere(*source);
  EXPECT_THAT(source->err(), HasSubstr("the guest keeps running here"));
}

// A TCP proxy between source and destination that rewrites the source's
// frames (16-byte headers, length at offset 4; docs/protocol.md §2): a
// deliberately malicious peer for the destination.
class TamperingProxy {
 public:
  enum class Action { kForward, kTruncate };
  // Sees each frame the source sends (its type and payload, any channel;
  // called on several channels' threads at once) and may change it, or ask
  // for it to be cut short and the link closed.
  using Tamper = std::function<Action(uint8_t type, std::vector<uint8_t>& payload)>;

  TamperingProxy(uint16_t destination_port, Tamper tamper)
      : destination_port_(destination_port), tamper_(std::move(tamper)) {
    listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a = Loopback(0);
    bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
    listen(listen_fd_, 32);
    socklen_t len = sizeof a;
    getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    accept_thread_ = std::thread([this] { AcceptLoop(); });
  }
  ~TamperingProxy() {
    stopping_ = true;
    shutdown(listen_fd_, SHUT_RDWR);
    accept_thread_.join();
    {
      sys::MutexLock lock(mu_);
      for (int fd : fds_) shutdown(fd, SHUT_RDWR);
    }
    for (std::thread& t : threads_) t.join();
    sys::MutexLock lock(mu_);
    for (int fd : fds_) close(fd);
    close(listen_fd_);
  }
  uint16_t port() const { return port_; }

 private:
  static sockaddr_in Loopback(uint16_t port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
  }
  void AcceptLoop() {
    for (;;) {
      int from = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (from < 0 || stopping_) {
        if (from >= 0) close(from);
        return;
      }
      int to = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in a = Loopback(destination_port_);
      if (connect(to, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
        close(from);
        close(to);
        continue;
      }
      sys::MutexLock lock(mu_);
      fds_.push_back(from);
      fds_.push_back(to);
      threads_.emplace_back([this, from, to] { SourceToDestination(from, to); });
      threads_.emplace_back([from, to] {
        std::vector<uint8_t> buffer(64 << 10);
        for (;;) {
          ssize_t n = read(to, buffer.data(), buffer.size());
          if (n <= 0 || !itest::WriteAll(from, {buffer.data(), static_cast<size_t>(n)})) break;
        }
        shutdown(from, SHUT_RDWR);
        shutdown(to, SHUT_RDWR);
      });
    }
  }

  void SourceToDestination(int from, int to) {
    std::vector<uint8_t> payload;
    for (;;) {
      uint8_t header[16];
      if (!itest::ReadAll(from, header, sizeof header)) break;
      uint32_t length;
      std::memcpy(&length, header + 4, 4);  // little-endian, as is this host
      if (length > (4u << 20)) break;
      payload.resize(length);
      if (!itest::ReadAll(from, payload.data(), length)) break;
      const Action action = tamper_(header[2], payload);
      if (action == Action::kTruncate) {
        itest::WriteAll(to, header);
        itest::WriteAll(to, {payload.data(), payload.size() / 2});
        break;
      }
      if (!itest::WriteAll(to, header) || !itest::WriteAll(to, payload)) {
        break;
      }
    }
    shutdown(from, SHUT_RDWR);
    shutdown(to, SHUT_RDWR);
  }

 private:
  const uint16_t destination_port_;
  const Tamper tamper_;
  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread accept_thread_;
  sys::Mutex mu_;
  std::vector<int> fds_ GUARDED_BY(mu_);
  std::list<std::thread> threads_ GUARDED_BY(mu_);
};

constexpr uint8_t kHello = 1;
constexpr uint8_t kPages = 6;

void PutU16(std::vector<uint8_t>& p, size_t at, uint16_t v) { std::memcpy(&p[at], &v, 2); }
void PutU32(std::vector<uint8_t>& p, size_t at, uint32_t v) { std::memcpy(&p[at], &v, 4); }
uint32_t GetU32(const std::vector<uint8_t>& p, size_t at) {
  uint32_t v;
  std::memcpy(&v, &p[at], 4);
  return v;
}

struct BadInput {
  std::string name;
  bool dest_bigger = false;       // the destination has twice the source's memory
  TamperingProxy::Tamper tamper;  // null: connect directly
  std::string expected;           // in the destination's error
};

// For gtest's messages and ctest's names: the case, not its bytes.
void PrintTo(const BadInput& bad, std::ostream* os) { *os << bad.name; }

class BadDestinationInputTest : public ::testing::TestWithParam<BadInput> {};

TEST_P(BadDestinationInputTest, RefusedWhileTheSourceGoesOn) {
  const BadInput& bad = GetParam();
  const std::string dest_mem =
      bad.dest_bigger ? itest::MemArg("512M", "256M") : itest::MemArg("256M", "64M");
  Destination dest = StartDestination(dest_mem, "anon");
  ASSERT_NE(dest.port, 0) << dest.cli->Describe();
  std::optional<TamperingProxy> proxy;
  if (bad.tamper) proxy.emplace(dest.port, bad.tamper);
  const std::string control = ControlPath();
  std::unique_ptr<Cli> source = StartSource(control, itest::MemArg("256M", "64M"), "anon", 3);
  ASSERT_TRUE(AwaitRandomWrites(control, *source));
  const uint16_t port = proxy ? proxy->port() : dest.port;
  Cli migrate({"migrate", "--control", control, "--to", fmt::format("tcp:127.0.0.1:{}", port),
               "--channels", "2", "--json"});
  EXPECT_EQ(migrate.Wait(), 1) << migrate.Describe();
  EXPECT_EQ(migrate.Json()["result"], "failed") << migrate.Describe();

  // The destination says what was wrong and runs nothing.
  EXPECT_EQ(dest.cli->Wait(), 1) << dest.cli->Describe();
  EXPECT_THAT(dest.cli->err(), HasSubstr(bad.expected)) << dest.cli->Describe();
  EXPECT_THAT(dest.cli->err(), HasSubstr("The guest was not started here"));
  // The source's guest never stopped and finishes correctly.
  ExpectVerifiedHere(*source);
  std::optional<std::string> said = dest.cli->AwaitStderr("error:", 1s);
  fmt::print("{}: {}\n", bad.name, said.value_or("?"));
}

INSTANTIATE_TEST_SUITE_P(Refusals, BadDestinationInputTest,
                         ::testing::Values(BadInput{"BadVersion", false,
                                                    [](uint8_t type, std::vector<uint8_t>& p) {
                                                      if (type == kHello) {
                                                        PutU16(p, 8, 7);  // min_version
                                                        PutU16(p, 10, 9);
                                                      }
                                                      return TamperingProxy::Action::kForward;
                                                    },
                                                    "version"},
                                           BadInput{"PageIndexOutOfRange", false,
                                                    [](uint8_t type, std::vector<uint8_t>& p) {
                                                      if (type == kPages) {
                                                        uint32_t count = GetU32(p, 4);
                                                        PutU32(p, 16 + 4 * (count - 1),
                                                               0xFFFFFFF0u);  // still increasing
                                                      }
                                                      return TamperingProxy::Action::kForward;
                                                    },
                                                    "out of range"},
                                           BadInput{"TruncatedMessage", false,
                                                    [](uint8_t type, std::vector<uint8_t>&) {
                                                      return type == kPages
                                                                 ? TamperingProxy::Action::kTruncate
                                                                 : TamperingProxy::Action::kForward;
                                                    },
                                                    "truncated"},
                                           BadInput{"BlockListMismatch", true, nullptr, "block"}),
                         [](const auto& info) { return info.param.name; });

// Connections that are no migration at all (a frame announcing 4 GiB,
// random bytes, a Hello cut in half) are strays to a plaintext destination:
// each is dropped, said, and the destination goes on waiting; the real
// migration that follows completes and its guest verifies every page.
TEST(MigrationCliTest, NonProtocolPeersAreDroppedAndTheMigrationThenCompletes) {
  const std::string mem = itest::MemArg("256M", "64M");
  Destination dest = StartDestination(mem, "anon");
  ASSERT_NE(dest.port, 0) << dest.cli->Describe();
  const std::string control = ControlPath();
  std::unique_ptr<Cli> source = StartSource(control, mem, "anon", 3);
  ASSERT_TRUE(AwaitRandomWrites(control, *source));
  Hostile(dest.port, {"oversized"});
  Hostile(dest.port, {"garbage", "--bytes", "65536"});
  Hostile(dest.port, {"truncated"});
  EXPECT_TRUE(dest.cli->Running()) << dest.cli->Describe();
  Cli migrate({"migrate", "--control", control, "--to", fmt::format("tcp:127.0.0.1:{}", dest.port),
               "--json"});
  ASSERT_EQ(migrate.Wait(), 0) << migrate.Describe() << "\n" << dest.cli->Describe();
  ASSERT_EQ(source->Wait(), 0) << source->Describe();
  ExpectVerifiedOn(*dest.cli, source->Json()["workload_pages"].get<uint64_t>());
}

// The demo in pre-copy mode: the destination control path's other engine,
// which receives every page before the destination starts the guest, here
// into memory allocated beforehand (--prealloc).
TEST(MigrationCliTest, DemoPrecopyJsonVerifiesEveryPage) {
  Cli demo({"demo", "--mode", "precopy", "--mem", itest::MemArg("256M", "64M"), "--after", "0.3",
            "--prealloc", "--json"});
  ASSERT_EQ(demo.Wait(), 0) << demo.Describe();
  nlohmann::json j = demo.Json();
  ASSERT_FALSE(j.is_discarded()) << demo.Describe();
  EXPECT_EQ(j["mode"], "precopy") << j.dump();
  EXPECT_TRUE(j["prealloc"].get<bool>()) << j.dump();
  EXPECT_TRUE(j["success"].get<bool>()) << j.dump();
  EXPECT_EQ(j["bad_pages"].get<uint64_t>(), 0u) << j.dump();
  EXPECT_GT(j["workload_pages"].get<uint64_t>(), 0u) << j.dump();
  EXPECT_EQ(j["pages_verified"], j["workload_pages"]) << j.dump();
  // Pre-copy's figures: pages by kind, the engine's downtime, no installer.
  EXPECT_GE(j["passes"].get<uint32_t>(), 1u) << j.dump();
  EXPECT_EQ(j["precopy_pages"].get<uint64_t>(),
            j["data_pages"].get<uint64_t>() + j["zero_pages"].get<uint64_t>())
      << j.dump();
  EXPECT_TRUE(j["engine_downtime_ms"].is_number()) << j.dump();
  EXPECT_GE(j["switchover_pause_ms"].get<double>(), 0) << j.dump();
  EXPECT_TRUE(j["installer"].is_null()) << j.dump();
  EXPECT_FALSE(j.contains("fault_p50_us")) << j.dump();
}

// Post-copy through the tools (issue 6): the demo, and `faultline migrate
// --mode postcopy` between a source `faultline run --control` and a
// destination `faultline run --incoming ... --postcopy`, including a broken
// link resumed with `faultline migrate --resume`.

TEST(PostcopyCliTest, DemoPostcopyJsonVerifiesEveryPage) {
  Cli demo({"demo", "--mode", "postcopy", "--mem", itest::MemArg("256M", "64M"), "--after", "0.3",
            "--json"});
  ASSERT_EQ(demo.Wait(), 0) << demo.Describe();
  nlohmann::json j = demo.Json();
  ASSERT_FALSE(j.is_discarded()) << demo.Describe();
  for (const char* key :
       {"total_ms", "switchover_pause_ms", "bytes_sent", "pages_verified", "bad_pages",
        "fault_p50_us", "fault_p99_us", "pages_demanded", "pages_pushed", "blocked_ms"}) {
    EXPECT_TRUE(j.contains(key)) << key << " " << j.dump();
  }
  EXPECT_EQ(j["mode"], "postcopy");
  // --installer auto on anonymous memory: copy or move, as measured.
  EXPECT_TRUE(j["installer"] == "copy" || j["installer"] == "move") << j.dump();
  EXPECT_EQ(j["installer_calibration"]["chosen"], j["installer"]) << j.dump();
  EXPECT_EQ(j["installer_calibration"]["trials"].size(), 2u) << j.dump();
  EXPECT_EQ(j["accel"], hv::AccelName(itest::TestAccel())) << j.dump();
  EXPECT_TRUE(j["success"].get<bool>()) << j.dump();
  EXPECT_EQ(j["bad_pages"].get<uint64_t>(), 0u) << j.dump();
  EXPECT_GT(j["workload_pages"].get<uint64_t>(), 0u) << j.dump();
  EXPECT_EQ(j["pages_verified"], j["workload_pages"]) << j.dump();
  EXPECT_GT(j["pages_demanded"].get<uint64_t>() + j["pages_pushed"].get<uint64_t>(), 0u)
      << j.dump();
}

TEST(PostcopyCliTest, MigrateModePostcopyBetweenProcesses) {
  Destination dest = StartPostcopyDestination(itest::MemArg("256M", "64M"), "memfd");
  ASSERT_NE(dest.port, 0) << dest.cli->Describe();
  const std::string control = ControlPath();
  std::unique_ptr<Cli> source = StartSource(control, itest::MemArg("256M", "64M"), "memfd", 6);
  ASSERT_TRUE(AwaitRandomWrites(control, *source));
  const std::string to = fmt::format("tcp:127.0.0.1:{}", dest.port);
  // Pre-copy passes until told: the switch comes from `faultline migrate
  // --start-postcopy` once a second pass is under way.
  Cli migrate({"migrate", "--control", control, "--to", to, "--mode", "postcopy", "--channels", "2",
               "--postcopy-on-command", "--json"});
  bool switched = false;
  for (auto deadline = Clock::now() + 60s; Clock::now() < deadline && migrate.Running();) {
    std::optional<nlohmann::json> q = Query(control, "query-migrate");
    if (q && (*q)["phase"] == "precopy" && (*q)["pass"].get<uint32_t>() >= 2) {
      Cli start({"migrate", "--control", control, "--start-postcopy"});
      ASSERT_EQ(start.Wait(), 0) << start.Describe();
      switched = true;
      break;
    }
    std::this_thread::sleep_for(50ms);
  }
  ASSERT_TRUE(switched) << migrate.Describe() << "\n" << source->Describe();
  ASSERT_EQ(migrate.Wait(), 0) << migrate.Describe() << "\n"
                               << source->Describe() << "\n"
                               << dest.cli->Describe();
  nlohmann::json m = migrate.Json();
  EXPECT_EQ(m["result"], "completed") << m.dump();
  EXPECT_EQ(m["migration"]["mode"], "postcopy") << m.dump();
  EXPECT_EQ(m["migration"]["sessions"].get<uint32_t>(), 1u) << m.dump();
  EXPECT_GE(m["migration"]["pass"].get<uint32_t>(), 2u) << m.dump();

  ASSERT_EQ(source->Wait(), 0) << source->Describe();
  nlohmann::json s = source->Json();
  EXPECT_EQ(s["migrated_to"], to) << s.dump();
  ExpectPostcopyVerified(*dest.cli, s["workload_pages"].get<uint64_t>(), 1, "copy|continue", 2);
}

// A flood of page requests in post-copy, from an on-path attacker between
// the source and its destination (plaintext: TLS leaves it nothing to
// inject into): faultline_hostile_peer's flood relay injects 3000 requests,
// 16 pages each, one in ten for a page past the block's end. The source
// answers the valid ones in turn, counts the rest and logs only the first
// few; its memory stays bounded (the answers are far more than the bound);
// the migration completes and the guest verifies every page.
TEST(PostcopyCliTest, AFloodOfPageRequestsIsServedWithBoundedMemoryAndTheGuestVerifies) {
  const std::string mem = itest::MemArg("256M", "64M");
  Destination dest = StartPostcopyDestination(mem, "anon");
  ASSERT_NE(dest.port, 0) << dest.cli->Describe();
  constexpr uint64_t kRequests = 3000, kPages = 16;
  Cli relay({"--to", fmt::format("tcp:127.0.0.1:{}", dest.port), "flood", "--count",
             std::to_string(kRequests), "--pages", std::to_string(kPages)},
            FAULTLINE_HOSTILE_PEER_PATH);
  std::optional<std::string> line = relay.AwaitStderr("listening on tcp:", 30s);
  ASSERT_TRUE(line.has_value()) << relay.Describe();
  const std::string to = line->substr(line->find("tcp:"));
  const std::string control = ControlPath();
  std::unique_ptr<Cli> source = StartSource(control, mem, "anon", 4);
  ASSERT_TRUE(AwaitRandomWrites(control, *source));

  const uint64_t rss_before = RssKib(source->pid());
  uint64_t rss_peak = rss_before;
  Cli migrate({"migrate", "--control", control, "--to", to, "--mode", "postcopy", "--json"});
  while (migrate.Running()) {
    rss_peak = std::max(rss_peak, RssKib(source->pid()));
    std::this_thread::sleep_for(5ms);
  }
  ASSERT_EQ(migrate.Wait(), 0) << migrate.Describe() << "\n"
                               << source->Describe() << "\n"
                               << dest.cli->Describe();
  ASSERT_EQ(relay.Wait(60s), 0) << relay.Describe();
  const nlohmann::json flood = relay.Json(), m = migrate.Json();
  fmt::print("flood: {}\nsource: RSS {} KiB before, {} KiB at most during the migration\n{}\n",
             flood.dump(), rss_before, rss_peak, m.dump());
  EXPECT_EQ(flood["injected"].get<uint64_t>(), kRequests) << flood.dump();
  EXPECT_EQ(flood["invalid"].get<uint64_t>(), kRequests / 10) << flood.dump();
  // The relay saw the source answer (real requests and the flood's); the
  // source counted every page it sent on its priority channel.
  const uint64_t answered = flood["answered_pages"].get<uint64_t>();
  EXPECT_GT(answered, kPages) << flood.dump();
  EXPECT_GE(m["migration"]["pages_demanded"].get<uint64_t>(), answered) << m.dump();
  // The refused ones are counted: at most every tenth of the flood, and
  // some once the source got far into it (the guest's own requests are far
  // fewer than 1000).
  const uint64_t rejected = m["migration"]["requests_rejected"].get<uint64_t>();
  EXPECT_LE(rejected, kRequests / 10) << m.dump();
  if (flood["answers"].get<uint64_t>() >= 1000) {
    EXPECT_GT(rejected, 0u) << m.dump();
  }
  // Bounded: the source answers one request at a time, so the flood's
  // answers (kRequests * 0.9 * kPages pages: 169 MiB) never pile up there.
  EXPECT_LT(rss_peak - rss_before, uint64_t{64} << 10) << "KiB";
  // The log names the first rejections only.
  const std::string err = source->err();
  size_t logged = 0;
  for (size_t at = err.find("rejected a page request"); at != std::string::npos;
       at = err.find("rejected a page request", at + 1)) {
    ++logged;
  }
  EXPECT_LE(logged, 8u) << err;
  if (rejected > 8) {
    EXPECT_THAT(err, HasSubstr("page requests in this session")) << err;
  }

  ASSERT_EQ(source->Wait(), 0) << source->Describe();
  nlohmann::json s = source->Json();
  EXPECT_EQ(s["migrated_to"], to) << s.dump();
  ExpectPostcopyVerified(*dest.cli, s["workload_pages"].get<uint64_t>(), 1, "copy|move");
}

// A 256 MiB (TCG: 128 MiB) source guest writing at random whose link breaks after 64 MiB
// sent, and a pure post-copy of it (no pre-copy pass) to `port`: that is
// inside post-copy (the pushed pages alone are more), so the migration
// pauses there with the guest running (and faulting) on the destination.
struct BreakingPostcopy {
  std::string control;  // the source's
  std::unique_ptr<Cli> source;
  std::unique_ptr<Cli> migrate;  // null if the source never wrote
};

BreakingPostcopy StartBreakingPostcopy(uint16_t port) {
  BreakingPostcopy b;
  b.control = ControlPath();
  b.source = std::make_unique<Cli>(std::vector<std::string>{
      "run", "--control", b.control, "--mem", itest::MemArg("256M", "128M"), "--vcpus", "2",
      "--workload", "random,rate=64", "--duration", "6", "--json", "--quiet", "--timeout", "120",
      "--test-cut-link-after", std::to_string(64 << 20)});
  testing::AssertionResult writing = AwaitRandomWrites(b.control, *b.source);
  EXPECT_TRUE(writing);
  if (!writing) return b;
  b.migrate = std::make_unique<Cli>(std::vector<std::string>{
      "migrate", "--control", b.control, "--to", fmt::format("tcp:127.0.0.1:{}", port), "--mode",
      "postcopy", "--precopy-passes", "0", "--json"});
  return b;
}

TEST(PostcopyCliTest, BrokenLinkPausesAndMigrateResumeCompletes) {
  Destination dest = StartPostcopyDestination(itest::MemArg("256M", "128M"), "anon");
  ASSERT_NE(dest.port, 0) << dest.cli->Describe();
  BreakingPostcopy run = StartBreakingPostcopy(dest.port);
  ASSERT_TRUE(run.migrate);
  const std::string& control = run.control;
  std::unique_ptr<Cli>& source = run.source;
  Cli& migrate = *run.migrate;
  std::optional<nlohmann::json> paused = AwaitPaused(control, migrate);
  ASSERT_TRUE(paused) << migrate.Describe() << "\n" << source->Describe();
  EXPECT_EQ((*paused)["phase"], "postcopy") << paused->dump();
  EXPECT_THAT((*paused)["error"].get<std::string>(), HasSubstr("link cut"));
  // The destination survives and waits; so does the first `faultline
  // migrate`, which follows the paused migration.
  ASSERT_TRUE(dest.cli->AwaitStderr("waiting on", 30s)) << dest.cli->Describe();
  EXPECT_TRUE(migrate.Running());

  Cli resume({"migrate", "--control", control, "--resume", "--json"});
  ASSERT_EQ(resume.Wait(), 0) << resume.Describe() << "\n" << source->Describe();
  EXPECT_EQ(resume.Json()["result"], "completed") << resume.out();
  ASSERT_EQ(migrate.Wait(), 0) << migrate.Describe();
  nlohmann::json m = migrate.Json();
  EXPECT_EQ(m["result"], "completed") << m.dump();
  EXPECT_EQ(m["migration"]["sessions"].get<uint32_t>(), 2u) << m.dump();
  // No pre-copy pass: the pages came by push or by demand only.
  EXPECT_GE(m["migration"]["pages_pushed"].get<uint64_t>() +
                m["migration"]["pages_demanded"].get<uint64_t>(),
            itest::Mem(256ull << 20, 128ull << 20) / 4096)
      << m.dump();
  ASSERT_EQ(source->Wait(), 0) << source->Describe();
  ExpectPostcopyVerified(*dest.cli, source->Json()["workload_pages"].get<uint64_t>(), 2,
                         "copy|move");
}

// The destination's post-copy figures, as query-migrate on its control
// socket and its end-of-migration JSON give them: the per-vCPU fault counts
// add up to the total, and every page is counted once, as held at the
// switchover, demanded or pushed.
void ExpectConsistentFigures(const nlohmann::json& j, uint64_t guest_pages, bool final) {
  ASSERT_TRUE(j.contains("vcpus")) << j.dump();
  uint64_t faults = j["other_faults"].get<uint64_t>();
  for (const nlohmann::json& v : j["vcpus"]) {
    faults += v["faults"].get<uint64_t>();
    if (final && v["faults"].get<uint64_t>() > 0) {
      EXPECT_TRUE(v["fault_p50_us"].is_number()) << v.dump();
      EXPECT_GE(v["max_us"].get<double>(), v["fault_p50_us"].get<double>()) << v.dump();
    }
  }
  EXPECT_EQ(faults, j["faults"].get<uint64_t>()) << j.dump();
  const uint64_t here = j["present_at_start"].get<uint64_t>() +
                        j["pages_demanded"].get<uint64_t>() + j["pages_pushed"].get<uint64_t>();
  if (final) {
    EXPECT_EQ(here, guest_pages) << j.dump();
  } else {
    EXPECT_LE(here, guest_pages) << j.dump();
  }
}

TEST(PostcopyCliTest, DestinationQueryMigrateShowsFaultLatencyPerVcpu) {
  const std::string dest_control = ControlPath();
  Destination dest = StartPostcopyDestination(itest::MemArg("256M", "128M"), "anon", dest_control);
  ASSERT_NE(dest.port, 0) << dest.cli->Describe();
  const uint64_t kGuestPages = itest::Mem(256ull << 20, 128ull << 20) / 4096;
  // Served while it waits for the migration.
  std::optional<nlohmann::json> waiting = Query(dest_control, "query-migrate");
  ASSERT_TRUE(waiting) << dest.cli->Describe();
  // (The engine says pre-copy from the moment it waits for the source.)
  EXPECT_TRUE((*waiting)["phase"] == "setup" || (*waiting)["phase"] == "precopy")
      << waiting->dump();
  EXPECT_EQ((*waiting)["direction"], "incoming") << waiting->dump();
  EXPECT_EQ((*waiting)["mode"], "postcopy") << waiting->dump();

  // The migration pauses inside post-copy, with the guest running (and
  // faulting) here, which leaves a window as long as the test wants to look.
  BreakingPostcopy run = StartBreakingPostcopy(dest.port);
  ASSERT_TRUE(run.migrate);
  const std::string& control = run.control;
  std::unique_ptr<Cli>& source = run.source;
  Cli& migrate = *run.migrate;
  std::optional<nlohmann::json> live;
  for (auto deadline = Clock::now() + 60s; Clock::now() < deadline && migrate.Running();) {
    std::optional<nlohmann::json> q = Query(dest_control, "query-migrate");
    if (q && (*q)["phase"] == "postcopy" && (*q)["paused"] == true) {
      live = q;
      break;
    }
    std::this_thread::sleep_for(20ms);
  }
  ASSERT_TRUE(live) << migrate.Describe() << "\n" << dest.cli->Describe();
  EXPECT_EQ((*live)["direction"], "incoming") << live->dump();
  // The guest ran here before the link broke: its vCPUs faulted.
  EXPECT_GT((*live)["faults"].get<uint64_t>(), 0u) << live->dump();
  EXPECT_GE((*live)["vcpus"].size(), 1u) << live->dump();
  EXPECT_GT((*live)["present_at_start"].get<uint64_t>() + (*live)["pages_pushed"].get<uint64_t>(),
            0u)
      << live->dump();
  ExpectConsistentFigures(*live, kGuestPages, /*final=*/false);
  std::optional<nlohmann::json> status = Query(dest_control, "query-status");
  ASSERT_TRUE(status);
  EXPECT_EQ((*status)["migration"], "postcopy") << status->dump();
  EXPECT_EQ((*status)["state"], "running") << status->dump();
  {
    Cli pretty({"query", "--control", dest_control, "--pretty", "query-migrate"});
    ASSERT_EQ(pretty.Wait(30s), 0) << pretty.Describe();
    fmt::print("faultline query --pretty query-migrate on the destination:\n{}", pretty.out());
    EXPECT_THAT(pretty.out(), HasSubstr("incoming postcopy migration: postcopy (paused"));
    EXPECT_THAT(pretty.out(), HasSubstr("vcpu 0: "));
    EXPECT_THAT(pretty.out(), HasSubstr("demanded"));
  }

  Cli resume({"migrate", "--control", control, "--resume", "--json"});
  ASSERT_EQ(resume.Wait(), 0) << resume.Describe() << "\n" << source->Describe();
  ASSERT_EQ(migrate.Wait(), 0) << migrate.Describe();
  // After the end, until the guest leaves again: the final figures.
  std::optional<nlohmann::json> done;
  for (auto deadline = Clock::now() + 30s; Clock::now() < deadline && dest.cli->Running();) {
    done = Query(dest_control, "query-migrate");
    if (done && (*done)["phase"] == "completed") break;
    std::this_thread::sleep_for(20ms);
  }
  ASSERT_TRUE(done) << dest.cli->Describe();
  EXPECT_EQ((*done)["phase"], "completed") << done->dump();
  EXPECT_EQ((*done)["sessions"].get<uint32_t>(), 2u) << done->dump();
  ExpectConsistentFigures(*done, kGuestPages, /*final=*/true);

  ASSERT_EQ(source->Wait(), 0) << source->Describe();
  ExpectPostcopyVerified(*dest.cli, source->Json()["workload_pages"].get<uint64_t>(), 2,
                         "copy|move");
  const nlohmann::json in = dest.cli->Json()["incoming"];
  ExpectConsistentFigures(in, kGuestPages, /*final=*/true);
  EXPECT_TRUE(in["fault_p50_us"].is_number()) << in.dump();
  EXPECT_TRUE(in["request_p50_us"].is_number()) << in.dump();
  EXPECT_GT(in["blocked_ms"].get<double>(), 0) << in.dump();
}

TEST(PostcopyCliTest, ModeMismatchIsRefusedAndTheSourceGoesOn) {
  // A pre-copy migration to a post-copy destination: refused in the
  // handshake; the guest keeps running on the source to the end.
  Destination dest = StartPostcopyDestination(itest::MemArg("256M", "64M"), "anon");
  ASSERT_NE(dest.port, 0) << dest.cli->Describe();
  const std::string control = ControlPath();
  std::unique_ptr<Cli> source = StartSource(control, itest::MemArg("256M", "64M"), "anon", 2);
  ASSERT_TRUE(AwaitRandomWrites(control, *source));
  Cli migrate({"migrate", "--control", control, "--to", fmt::format("tcp:127.0.0.1:{}", dest.port),
               "--json"});
  EXPECT_EQ(migrate.Wait(), 1) << migrate.Describe();
  EXPECT_THAT(migrate.err(), HasSubstr("post-copy")) << migrate.Describe();
  EXPECT_EQ(dest.cli->Wait(), 1) << dest.cli->Describe();
  ExpectVerifiedHere(*source);
}

TEST(PostcopyCliTest, AnInstallerThatCannotMigrateIsRefusedBeforeListening) {
  // The zero installer (a benchmark floor) answers faults with zeros and
  // never asks the source: no destination may wait for a migration with it.
  Cli dest({"run", "--incoming", "tcp:127.0.0.1:0", "--postcopy", "--installer", "zero", "--mem",
            "64M", "--vcpus", "1", "--quiet"});
  EXPECT_EQ(dest.Wait(), 1) << dest.Describe();
  EXPECT_THAT(dest.err(), HasSubstr("--installer")) << dest.Describe();
  EXPECT_THAT(dest.err(), HasSubstr("zero")) << dest.Describe();
  EXPECT_THAT(dest.err(), Not(HasSubstr("waiting for"))) << dest.Describe();
}

TEST(PostcopyCliTest, PostcopyToAPrecopyDestinationIsRefused) {
  Destination dest = StartDestination(itest::MemArg("256M", "64M"), "anon");
  ASSERT_NE(dest.port, 0) << dest.cli->Describe();
  const std::string control = ControlPath();
  std::unique_ptr<Cli> source = StartSource(control, itest::MemArg("256M", "64M"), "anon", 2);
  ASSERT_TRUE(AwaitRandomWrites(control, *source));
  Cli migrate({"migrate", "--control", control, "--to", fmt::format("tcp:127.0.0.1:{}", dest.port),
               "--mode", "postcopy", "--json"});
  EXPECT_EQ(migrate.Wait(), 1) << migrate.Describe();
  EXPECT_THAT(migrate.err(), HasSubstr("does not support post-copy")) << migrate.Describe();
  EXPECT_EQ(dest.cli->Wait(), 1) << dest.cli->Describe();
  EXPECT_THAT(dest.cli->err(), HasSubstr("--postcopy")) << dest.cli->Describe();
  ExpectVerifiedHere(*source);
}

}  // namespace
}  // namespace faultline
