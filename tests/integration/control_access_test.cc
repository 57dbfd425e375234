// The control socket's access between real processes: a VMM (`faultline
// run --control`) and `faultline query` / `faultline migrate` run as
// another user (uid 65534, by setresuid in a forked child).
#include <grp.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/integration/cli_process.h"

namespace faultline {
namespace {

using namespace ::faultline::clitest;  // NOLINT: the test helpers
using ::testing::HasSubstr;

constexpr uid_t kNobody = 65534;

struct Ran {
  int status = -1;     // exit status
  std::string output;  // stdout and stderr
};

// Runs the CLI with `args` as uid `uid`. Everything the child needs is made
// before fork (the parent has threads).
Ran RunAs(uid_t uid, std::vector<std::string> args) {
  args.insert(args.begin(), FAULTLINE_CLI_PATH);
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int out[2];
  EXPECT_EQ(pipe(out), 0);
  const pid_t child = fork();
  if (child == 0) {
    dup2(out[1], 1);
    dup2(out[1], 2);
    close(out[0]);
    if (setgroups(0, nullptr) != 0 || setresgid(uid, uid, uid) != 0 ||
        setresuid(uid, uid, uid) != 0) {
      _exit(120);
    }
    execv(argv[0], argv.data());
    _exit(121);
  }
  close(out[1]);
  Ran ran;
  char chunk[4096];
  for (ssize_t n; (n = read(out[0], chunk, sizeof chunk)) > 0;) ran.output.append(chunk, n);
  close(out[0]);
  int status = 0;
  EXPECT_EQ(waitpid(child, &status, 0), child);
  ran.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return ran;
}

class ControlAccessCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "needs root: the other user is made by setresuid";
  }
};

TEST_F(ControlAccessCliTest, AnotherUserIsRefusedAndChangesNothingUnlessAllowed) {
  const std::string control = ControlPath();
  auto vmm = StartSource(control, itest::MemArg("128M", "64M"), "anon", 60);
  ASSERT_TRUE(AwaitRandomWrites(control, *vmm));

  // The socket file keeps the other user out.
  Ran query = RunAs(kNobody, {"query", "--control", control, "query-status"});
  EXPECT_EQ(query.status, 1) << query.output;
  EXPECT_THAT(query.output, HasSubstr("Permission denied")) << query.output;

  // With the file opened to everyone by hand, its credentials still do;
  // a migrate it sends does not start.
  ASSERT_EQ(chmod(control.c_str(), 0666), 0);
  Ran migrate = RunAs(kNobody, {"migrate", "--control", control, "--to", "tcp:127.0.0.1:9"});
  EXPECT_EQ(migrate.status, 1) << migrate.output;
  EXPECT_THAT(migrate.output, HasSubstr("refused pid")) << migrate.output;
  EXPECT_THAT(migrate.output, HasSubstr("--control-allow-uid 65534")) << migrate.output;
  std::optional<nlohmann::json> status = Query(control, "query-migrate");
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ((*status)["phase"], "none") << status->dump();
  ASSERT_TRUE(vmm->AwaitStderr("refused pid", 10s)) << vmm->Describe();
  EXPECT_TRUE(vmm->Running()) << vmm->Describe();

  // A VMM that allows the user serves it.
  const std::string allowed = ControlPath();
  auto shared = StartSource(allowed, itest::MemArg("128M", "64M"), "anon", 60,
                            {"--control-allow-uid", std::to_string(kNobody)});
  ASSERT_TRUE(AwaitRandomWrites(allowed, *shared));
  struct stat st {};
  ASSERT_EQ(stat(allowed.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0007, 0u) << "others get nothing";
  Ran served = RunAs(kNobody, {"query", "--control", allowed, "query-status"});
  EXPECT_EQ(served.status, 0) << served.output;
  EXPECT_THAT(served.output, HasSubstr("\"state\"")) << served.output;
  ASSERT_EQ(::kill(vmm->pid(), SIGKILL), 0);
  ASSERT_EQ(::kill(shared->pid(), SIGKILL), 0);
}

}  // namespace
}  // namespace faultline
