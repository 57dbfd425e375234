// The faultline CLI as a user runs it: exit codes, messages, JSON.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include "tests/integration/test_accel.h"

extern char** environ;

namespace faultline {
namespace {

using ::testing::HasSubstr;

struct Outcome {
  int exit_code = -1;  // -1: killed after the timeout
  std::string out, err;
};

std::string Slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

Outcome RunCli(std::vector<std::string> args, int timeout_s = 120) {
  std::string dir = testing::TempDir();
  std::string out_path = dir + "cli_out.txt", err_path = dir + "cli_err.txt";
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                   0644);
  posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                   0644);
  itest::AddAccelArgs(args);
  args.insert(args.begin(), FAULTLINE_CLI_PATH);
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid;
  Outcome o;
  if (posix_spawn(&pid, FAULTLINE_CLI_PATH, &actions, nullptr, argv.data(), environ) != 0) {
    return o;
  }
  posix_spawn_file_actions_destroy(&actions);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      o.out = Slurp(out_path);
      o.err = Slurp(err_path) + "\n(killed: timeout)";
      return o;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  o.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  o.out = Slurp(out_path);
  o.err = Slurp(err_path);
  return o;
}

TEST(CliTest, RunPrintsJsonAndSucceeds) {
  Outcome o = RunCli({"run", "--mem", "128M", "--vcpus", "2", "--json", "--quiet"});
  ASSERT_EQ(o.exit_code, 0) << o.err;
  nlohmann::json j = nlohmann::json::parse(o.out);
  EXPECT_GT(j["pages_verified"].get<uint64_t>(), 30000u);
  EXPECT_EQ(j["bad_pages"].get<uint64_t>(), 0u);
  EXPECT_TRUE(j.contains("max_stall_us"));
  EXPECT_TRUE(j["success"].get<bool>());
}

TEST(CliTest, HelpOnEverySubcommand) {
  Outcome o = RunCli({"run", "--help"});
  EXPECT_EQ(o.exit_code, 0);
  EXPECT_THAT(o.out, HasSubstr("--workload"));
  EXPECT_THAT(o.out, HasSubstr("--backing"));
}

TEST(CliTest, BadInputGivesAClearMessageAndNonZeroExit) {
  struct Case {
    std::vector<std::string> args;
    std::string message;
  } cases[] = {
      {{"run", "--mem", "0"}, "memory size is zero"},
      {{"run", "--mem", "32M"}, "outside"},
      {{"run", "--mem", "65M"}, "not a multiple of 2 MiB"},
      {{"run", "--mem", "lots"}, "not a size"},
      {{"run", "--vcpus", "9"}, "1 to 8"},
      {{"run", "--guest", "/nonexistent/guest.elf"}, "No such file"},
      {{"run", "--guest", "/etc/hostname"}, "not an ELF file"},
      {{"run", "--guest", "/bin/true"}, "not a Faultline guest"},
      {{"run", "--workload", "bogus"}, "unknown workload"},
      {{"run", "--backing", "floppy"}, "floppy"},
      {{"run", "--mem", "64M", "--workload", "triplefault"}, "triple-fault"},
  };
  for (const Case& c : cases) {
    Outcome o = RunCli(c.args, 60);
    EXPECT_NE(o.exit_code, 0) << c.args.back();
    EXPECT_NE(o.exit_code, -1) << "hung: " << c.args.back();
    EXPECT_GE(o.exit_code, 0) << c.args.back();
    EXPECT_LT(o.exit_code, 128) << "crashed: " << c.args.back() << "\n" << o.err;
    EXPECT_THAT(o.err, HasSubstr(c.message)) << c.args.back();
  }
}

}  // namespace
}  // namespace faultline
