// Faultline CLI processes for the integration tests: a `faultline` command
// in the background with its stdout and stderr in files, and the source
// and destination VMs that the migration tests start (the guest writes
// random pages, then verifies every page wherever it runs by then).
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/integration/test_accel.h"

extern char** environ;

namespace faultline::clitest {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

inline std::string Slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A faultline process in the background, its stdout and stderr in files.
class Cli {
 public:
  // `program`: the faultline CLI, or another program of the tests.
  // `prefix`: a command that runs it, e.g. {"ip", "netns", "exec", "NS"}
  // (found in PATH; it must exec the program in its own process, so that
  // pid() is the program's), or none.
  explicit Cli(std::vector<std::string> args, std::string program = FAULTLINE_CLI_PATH,
               std::vector<std::string> prefix = {}) {
    static std::atomic<int> counter{0};
    std::string base = fmt::format("{}mig_cli_{}_{}", testing::TempDir(), getpid(), counter++);
    out_path_ = base + ".out";
    err_path_ = base + ".err";
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, out_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    posix_spawn_file_actions_addopen(&actions, 2, err_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    if (program == FAULTLINE_CLI_PATH) itest::AddAccelArgs(args);
    args.insert(args.begin(), program);
    args.insert(args.begin(), prefix.begin(), prefix.end());
    command_ = fmt::format("{}", fmt::join(args, " "));
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (posix_spawnp(&pid_, args[0].c_str(), &actions, nullptr, argv.data(), environ) != 0) {
      pid_ = -1;
    }
    posix_spawn_file_actions_destroy(&actions);
  }
  ~Cli() {
    if (pid_ > 0 && !exit_code_) {
      kill(pid_, SIGKILL);
      int status;
      waitpid(pid_, &status, 0);
    }
  }

  // The exit code, or -1 if still running after `timeout` (then killed).
  int Wait(std::chrono::seconds timeout = 120s) {
    if (exit_code_) return *exit_code_;
    if (pid_ <= 0) return -1;
    auto deadline = Clock::now() + timeout;
    int status = 0;
    while (waitpid(pid_, &status, WNOHANG) == 0) {
      if (Clock::now() > deadline) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
        exit_code_ = -1;
        return -1;
      }
      std::this_thread::sleep_for(20ms);
    }
    exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return *exit_code_;
  }
  bool Running() {
    if (exit_code_) return false;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == 0) return true;
    exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return false;
  }
  // Waits until stderr contains `text`; the line that has it.
  std::optional<std::string> AwaitStderr(const std::string& text, std::chrono::seconds timeout) {
    auto deadline = Clock::now() + timeout;
    for (;;) {
      std::string err = Slurp(err_path_);
      size_t at = err.find(text);
      if (at != std::string::npos) {
        size_t begin = err.rfind('\n', at);
        begin = begin == std::string::npos ? 0 : begin + 1;
        size_t end = err.find('\n', at);
        if (end != std::string::npos) return err.substr(begin, end - begin);
      }
      if (!Running() || Clock::now() > deadline) return std::nullopt;
      std::this_thread::sleep_for(20ms);
    }
  }
  pid_t pid() const { return pid_; }
  std::string out() const { return Slurp(out_path_); }
  std::string err() const { return Slurp(err_path_); }
  nlohmann::json Json() const {
    std::string text = out();
    // The last line: the report.
    while (!text.empty() && text.back() == '\n') text.pop_back();
    size_t nl = text.rfind('\n');
    return nlohmann::json::parse(nl == std::string::npos ? text : text.substr(nl + 1), nullptr,
                                 false);
  }
  std::string Describe() const {
    return fmt::format("$ {}\n--- stdout\n{}\n--- stderr\n{}", command_, out(), err());
  }

 private:
  pid_t pid_ = -1;
  std::optional<int> exit_code_;
  std::string out_path_, err_path_, command_;
};

// A destination waiting for a migration; its port once it listens.
struct Destination {
  std::unique_ptr<Cli> cli;
  uint16_t port = 0;
};

inline Destination StartDestination(const std::string& mem, const std::string& backing,
                                    std::vector<std::string> extra = {}) {
  Destination d;
  std::vector<std::string> args{
      "run",       "--incoming", "tcp:127.0.0.1:0", "--mem",   mem,         "--vcpus", "2",
      "--backing", backing,      "--json",          "--quiet", "--timeout", "120"};
  args.insert(args.end(), extra.begin(), extra.end());
  d.cli = std::make_unique<Cli>(std::move(args));
  std::optional<std::string> line = d.cli->AwaitStderr("waiting for a migration on", 60s);
  if (line) d.port = static_cast<uint16_t>(std::stoul(line->substr(line->rfind(':') + 1)));
  return d;
}

inline std::string ControlPath() {
  static std::atomic<int> counter{0};
  return fmt::format("{}mig_ctl_{}_{}.sock", testing::TempDir(), getpid(), counter++);
}

// The source: the guest fills its memory, then writes random pages at
// 64 MiB/s for `seconds`, then verifies every page, wherever it runs then.
// `extra`: more arguments; `prefix`: see Cli.
inline std::unique_ptr<Cli> StartSource(const std::string& control, const std::string& mem,
                                        const std::string& backing, int seconds,
                                        std::vector<std::string> extra = {},
                                        std::vector<std::string> prefix = {}) {
  // On the software CPU the two vCPUs' fills can end seconds apart: random
  // writes long enough that both are writing at once (AwaitRandomWrites).
  if (!itest::OnKvm()) seconds = std::max(seconds, 4);
  std::vector<std::string> args = {"run",
                                   "--control",
                                   control,
                                   "--mem",
                                   mem,
                                   "--vcpus",
                                   "2",
                                   "--backing",
                                   backing,
                                   "--workload",
                                   "random,rate=64",
                                   "--duration",
                                   std::to_string(seconds),
                                   "--json",
                                   "--quiet",
                                   "--timeout",
                                   "120"};
  args.insert(args.end(), extra.begin(), extra.end());
  return std::make_unique<Cli>(args, FAULTLINE_CLI_PATH, std::move(prefix));
}

// A process's resident memory (VmRSS), in KiB; 0 once it is gone.
inline uint64_t RssKib(pid_t pid) {
  std::ifstream status(fmt::format("/proc/{}/status", pid));
  std::string line;
  while (std::getline(status, line)) {
    if (line.starts_with("VmRSS:")) return std::stoull(line.substr(6));
  }
  return 0;
}

// One control command through `faultline query`.
inline std::optional<nlohmann::json> Query(const std::string& control, const std::string& command) {
  Cli q({"query", "--control", control, command});
  if (q.Wait(30s) != 0) return std::nullopt;
  nlohmann::json j = q.Json();
  if (j.is_discarded()) return std::nullopt;
  return j;
}

// Waits until every vCPU of the source's guest has filled its memory and
// writes random pages (query-status), so that the migration meets a guest
// that dirties memory.
inline testing::AssertionResult AwaitRandomWrites(const std::string& control, Cli& source) {
  auto deadline = Clock::now() + 60s;
  while (Clock::now() < deadline) {
    if (!source.Running()) return testing::AssertionFailure() << source.Describe();
    std::optional<nlohmann::json> s = Query(control, "query-status");
    // The guest reports a phase when it ends: fill ended, random under way.
    if (s && (*s)["guest"].size() == 2 && (*s)["guest"][0]["phase"] == "fill" &&
        (*s)["guest"][1]["phase"] == "fill" && !(*s)["guest"][0]["done"].get<bool>() &&
        !(*s)["guest"][1]["done"].get<bool>()) {
      return testing::AssertionSuccess();
    }
    std::this_thread::sleep_for(50ms);
  }
  return testing::AssertionFailure() << "the guest never got to its random writes\n"
                                     << source.Describe();
}

// The source guest ran its workload to the end here and verified all of it.
inline void ExpectVerifiedHere(Cli& source) {
  ASSERT_EQ(source.Wait(), 0) << source.Describe();
  nlohmann::json j = source.Json();
  ASSERT_FALSE(j.is_discarded()) << source.Describe();
  ASSERT_FALSE(j.contains("migrated_to")) << source.Describe();
  EXPECT_TRUE(j["success"].get<bool>()) << source.Describe();
  EXPECT_EQ(j["bad_pages"].get<uint64_t>(), 0u);
  EXPECT_GT(j["pages_verified"].get<uint64_t>(), 0u);
  for (const auto& v : j["vcpus"]) {
    EXPECT_EQ(v["pages_verified"].get<uint64_t>(), v["pages"].get<uint64_t>()) << j.dump();
  }
}

// The guest ran to the end in `dest` (a destination) and verified all
// `written` pages the source's guest had written.
inline void ExpectVerifiedOn(Cli& dest, uint64_t written) {
  ASSERT_EQ(dest.Wait(), 0) << dest.Describe();
  nlohmann::json d = dest.Json();
  ASSERT_FALSE(d.is_discarded()) << dest.Describe();
  EXPECT_TRUE(d["success"].get<bool>()) << d.dump();
  EXPECT_EQ(d["bad_pages"].get<uint64_t>(), 0u) << d.dump();
  EXPECT_EQ(d["pages_verified"].get<uint64_t>(), written) << d.dump();
}

// faultline_hostile_peer (hostile_peer.cc) against a destination on
// 127.0.0.1:`port`, expected to end with `expected_exit`: its report.
inline nlohmann::json Hostile(uint16_t port, std::vector<std::string> args, int expected_exit = 0) {
  args.insert(args.begin(), {"--to", fmt::format("tcp:127.0.0.1:{}", port)});
  Cli peer(args, FAULTLINE_HOSTILE_PEER_PATH);
  EXPECT_EQ(peer.Wait(), expected_exit) << peer.Describe();
  fmt::print("hostile peer {}: {}", args[2], peer.out());
  return peer.Json();
}

}  // namespace faultline::clitest
