// Local update as an operator runs it: a source `faultline run --control
// SOCK` whose guest writes random pages, a new process `faultline run
// --incoming unix:PATH`, and `faultline migrate --local --to unix:PATH`.
// memfd and hugetlb RAM is handed over by descriptor (no page copied), the
// guest goes on in the new process and verifies every page; anonymous RAM
// falls back to copying; and every refusal (a stale or foreign socket, a
// wrong layout, a missing descriptor, a destination that dies before it
// confirms) leaves the guest running at the source, where it verifies.
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/integration/cli_process.h"
#include "tests/integration/huge_pages.h"

namespace faultline {
namespace {

using ::faultline::integration::HugePages;
using ::testing::HasSubstr;
using namespace ::faultline::clitest;  // NOLINT: the test helpers

std::string UnixPath() {
  static std::atomic<int> counter{0};
  return fmt::format("{}lu_{}_{}.sock", testing::TempDir(), getpid(), counter++);
}

// A Unix socket bound to `path` (a socket file), or -1.
int BoundUnixSocket(const std::string& path) {
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof(a.sun_path) - 1);
  if (s < 0 || bind(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) return -1;
  return s;
}

// `faultline run --incoming unix:PATH`, once it listens.
std::unique_ptr<Cli> StartIncoming(const std::string& path, const std::string& mem,
                                   const std::string& backing,
                                   std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"run",       "--incoming", "unix:" + path, "--mem", mem,
                                   "--vcpus",   "2",          "--backing",    backing, "--json",
                                   "--timeout", "120"};
  args.insert(args.end(), extra.begin(), extra.end());
  auto cli = std::make_unique<Cli>(args);
  cli->AwaitStderr("waiting for a local update or migration on", 60s);
  return cli;
}

// `from` ended saying that the guest moved to unix:`path`; the pages its
// workload covers, as far as `from` saw the guest report them (a process
// the guest only passed through saw no report: 0).
uint64_t ExpectMovedTo(Cli& from, const std::string& path) {
  EXPECT_EQ(from.Wait(), 0) << from.Describe();
  nlohmann::json j = from.Json();
  EXPECT_FALSE(j.is_discarded()) << from.Describe();
  if (j.is_discarded()) return 0;
  EXPECT_EQ(j["migrated_to"], "unix:" + path) << from.Describe();
  return j["workload_pages"].get<uint64_t>();
}

void ExpectVerifiedThere(Cli& source, Cli& dest, const std::string& path) {
  const uint64_t written = ExpectMovedTo(source, path);
  EXPECT_GT(written, 0u);
  ExpectVerifiedOn(dest, written);
}

class LocalUpdateBackingTest : public ::testing::TestWithParam<std::string> {};

// The acceptance run: a 2 GiB guest (128 MiB on the software CPU) writing
// random pages moves into a new process with its RAM passed, not copied;
// then on into a third, as the next update would take it.
TEST_P(LocalUpdateBackingTest, MovesWithoutCopyingAndVerifies) {
  const std::string mem = itest::MemArg("2G", "128M");
  std::optional<HugePages> huge;
  if (GetParam() == "hugetlb") huge.emplace(itest::OnKvm() ? 1024 : 64);  // shared, not doubled
  const std::string path = UnixPath();
  const std::string next_control = ControlPath();
  std::unique_ptr<Cli> dest = StartIncoming(path, mem, GetParam(), {"--control", next_control});
  ASSERT_TRUE(dest->Running()) << dest->Describe();
  const std::string control = ControlPath();
  std::unique_ptr<Cli> source = StartSource(control, mem, GetParam(), 6);
  ASSERT_TRUE(AwaitRandomWrites(control, *source));

  Cli migrate({"migrate", "--control", control, "--to", "unix:" + path, "--local", "--json"});
  ASSERT_EQ(migrate.Wait(), 0) << migrate.Describe() << source->Describe() << dest->Describe();
  nlohmann::json m = migrate.Json();
  ASSERT_EQ(m["result"], "completed") << m.dump();
  const nlohmann::json& mig = m["migration"];
  EXPECT_EQ(mig["local"], true);
  EXPECT_EQ(mig["memory"], "fds");
  EXPECT_EQ(mig["fds_passed"], 1);
  EXPECT_EQ(mig["pages_copied"], 0);
  EXPECT_EQ(mig["pages_sent"], 0);
  // The state only: a few KiB against the guest's RAM.
  EXPECT_LT(mig["bytes_sent"].get<uint64_t>(), 64u << 10) << mig.dump();
  EXPECT_GT(mig["downtime_us"].get<uint64_t>(), 0u);
  fmt::print("local update of {} {}: paused {} us, {} bytes sent\n", mem, GetParam(),
             mig["downtime_us"].dump(), mig["bytes_sent"].dump());
  const uint64_t written = ExpectMovedTo(*source, path);
  EXPECT_GT(written, 0u);

  // The next update: the new process passes on the RAM it took over.
  const std::string next_path = UnixPath();
  std::unique_ptr<Cli> next = StartIncoming(next_path, mem, GetParam());
  Cli again({"migrate", "--control", next_control, "--to", "unix:" + next_path, "--local"});
  ASSERT_EQ(again.Wait(), 0) << again.Describe() << dest->Describe() << next->Describe();
  EXPECT_THAT(again.out(), HasSubstr("0 pages copied"));
  ExpectMovedTo(*dest, next_path);
  ExpectVerifiedOn(*next, written);
  nlohmann::json d = next->Json();
  EXPECT_EQ(d["incoming"]["mode"], "local") << d.dump();
  EXPECT_EQ(d["incoming"]["pages_copied"], 0) << d.dump();
}

INSTANTIATE_TEST_SUITE_P(PassableBackings, LocalUpdateBackingTest,
                         ::testing::Values("memfd", "hugetlb"),
                         [](const auto& info) { return info.param; });

class LocalUpdateFallbackTest : public ::testing::TestWithParam<std::string> {};

// Anonymous RAM has no descriptor: the update copies it, in either mode,
// over the same socket, and says so.
TEST_P(LocalUpdateFallbackTest, AnonymousMemoryIsCopied) {
  const std::string mem = itest::MemArg("512M", "128M");
  const std::string path = UnixPath();
  std::unique_ptr<Cli> dest = StartIncoming(path, mem, "anon");
  ASSERT_TRUE(dest->Running()) << dest->Describe();
  const std::string control = ControlPath();
  std::unique_ptr<Cli> source = StartSource(control, mem, "anon", 6);
  ASSERT_TRUE(AwaitRandomWrites(control, *source));
  Cli migrate({"migrate", "--control", control, "--to", "unix:" + path, "--local", "--mode",
               GetParam(), "--json"});
  ASSERT_EQ(migrate.Wait(), 0) << migrate.Describe() << source->Describe() << dest->Describe();
  nlohmann::json m = migrate.Json();
  EXPECT_EQ(m["migration"]["memory"], "copy") << m.dump();
  EXPECT_GT(m["migration"]["pages_copied"].get<uint64_t>(), 0u) << m.dump();
  ExpectVerifiedThere(*source, *dest, path);
  EXPECT_THAT(source->err(), HasSubstr("no descriptor to pass"));
  EXPECT_THAT(dest->err(), HasSubstr("cannot be passed (anonymous memory)"));
}

INSTANTIATE_TEST_SUITE_P(Modes, LocalUpdateFallbackTest, ::testing::Values("precopy", "postcopy"),
                         [](const auto& info) { return info.param; });

// One failed `migrate --local`: exit 1, the error on stderr containing
// `expect`, and query-migrate saying failed.
void ExpectRefused(const std::string& control, const std::string& path, const std::string& expect) {
  Cli migrate({"migrate", "--control", control, "--to", "unix:" + path, "--local"});
  EXPECT_EQ(migrate.Wait(), 1) << migrate.Describe();
  EXPECT_THAT(migrate.err(), HasSubstr(expect)) << migrate.Describe();
  std::optional<nlohmann::json> q = Query(control, "query-migrate");
  ASSERT_TRUE(q.has_value());
  EXPECT_EQ((*q)["phase"], "failed") << q->dump();
  EXPECT_EQ((*q)["local"], true) << q->dump();
}

// Each refusal before the handover leaves the guest running here, and it
// verifies every page at the end.
TEST(LocalUpdateTest, RefusalsLeaveTheGuestRunning) {
  const std::string mem = itest::MemArg("512M", "128M");
  const std::string control = ControlPath();
  // --test-withhold-fds: the offers go without descriptors, which only the
  // last destination, whose layout matches, gets to notice.
  std::unique_ptr<Cli> source = StartSource(control, mem, "memfd", 12, {"--test-withhold-fds"});
  ASSERT_TRUE(AwaitRandomWrites(control, *source));

  {  // A stale socket: its process exited without removing it.
    const std::string path = UnixPath();
    int s = BoundUnixSocket(path);
    ASSERT_GE(s, 0);
    close(s);
    ExpectRefused(control, path, "nothing listens on this socket");
    unlink(path.c_str());
  }
  {  // A foreign socket: something that is not Faultline answers.
    const std::string path = UnixPath();
    int s = BoundUnixSocket(path);
    ASSERT_GE(s, 0);
    ASSERT_EQ(listen(s, 4), 0);
    std::thread foreign([s] {
      // As a web server would: read the request, answer, wait for the end.
      int c = accept(s, nullptr, nullptr);
      if (c < 0) return;
      char request[256];
      (void)!read(c, request, sizeof(request));
      const char reply[] = "HTTP/1.0 400 Bad Request\r\n\r\n";
      (void)!write(c, reply, sizeof(reply) - 1);
      while (read(c, request, sizeof(request)) > 0) {
      }
      close(c);
    });
    ExpectRefused(control, path, "not a Faultline migration stream");
    foreign.join();
    close(s);
    unlink(path.c_str());
  }
  {  // A destination with another block layout refuses, and says why.
    const std::string path = UnixPath();
    std::unique_ptr<Cli> dest = StartIncoming(path, itest::MemArg("256M", "64M"), "memfd");
    ExpectRefused(control, path, "mismatch");
    EXPECT_EQ(dest->Wait(), 1) << dest->Describe();
    EXPECT_THAT(dest->err(), HasSubstr("the source keeps running it"));
  }
  {  // A missing descriptor.
    const std::string path = UnixPath();
    std::unique_ptr<Cli> dest = StartIncoming(path, mem, "memfd");
    ExpectRefused(control, path, "0 descriptor(s) for 1 block(s)");
    EXPECT_EQ(dest->Wait(), 1) << dest->Describe();
  }
  ExpectVerifiedHere(*source);
}

// The new process is killed with the state loaded, before it confirms: the
// source resumes the guest, which goes on and verifies there.
TEST(LocalUpdateTest, DestinationDiesBeforeConfirmingAndTheSourceResumes) {
  const std::string mem = itest::MemArg("512M", "128M");
  const std::string path = UnixPath();
  std::unique_ptr<Cli> dest = StartIncoming(path, mem, "memfd", {"--test-die-before-confirm"});
  ASSERT_TRUE(dest->Running()) << dest->Describe();
  const std::string control = ControlPath();
  std::unique_ptr<Cli> source = StartSource(control, mem, "memfd", 6);
  ASSERT_TRUE(AwaitRandomWrites(control, *source));
  Cli migrate({"migrate", "--control", control, "--to", "unix:" + path, "--local"});
  EXPECT_EQ(migrate.Wait(), 1) << migrate.Describe();
  EXPECT_THAT(migrate.err(), HasSubstr("the guest was resumed here")) << migrate.Describe();
  EXPECT_EQ(dest->Wait(), 128 + SIGKILL) << dest->Describe();
  ExpectVerifiedHere(*source);
}

TEST(LocalUpdateTest, GuestMemfdIsRefusedWithTheReason) {
  FAULTLINE_SKIP_UNLESS_GUEST_MEMFD();
  const std::string control = ControlPath();
  std::unique_ptr<Cli> source = StartSource(control, "256M", "gmem", 4);
  ASSERT_TRUE(AwaitRandomWrites(control, *source));
  Cli migrate({"migrate", "--control", control, "--to", "unix:" + UnixPath(), "--local"});
  EXPECT_EQ(migrate.Wait(), 1) << migrate.Describe();
  EXPECT_THAT(migrate.err(), HasSubstr("KVM binds a guest_memfd to the VM that created it"));
  ExpectVerifiedHere(*source);
}

}  // namespace
}  // namespace faultline
