// Boots the test guest under QEMU (TCG, multiboot through -kernel): proves
// that the image is a valid multiboot kernel, that the 32-bit boot path,
// the CPL3 workload and the exit port work, and that failures are visible
// in the exit status. No /dev/kvm needed.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "src/vmm/qemu_command.h"

extern char** environ;

namespace {

constexpr auto kTimeout = std::chrono::seconds(120);

// The isa-debug-exit device turns the guest's exit code c into (c << 1) | 1.
int QemuStatus(int guest_code) { return (guest_code << 1) | 1; }

std::optional<std::string> FindInPath(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path ? path : "/usr/bin:/bin");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    std::string candidate = (dir.empty() ? "." : dir) + "/" + name;
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return std::nullopt;
}

std::string ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

struct QemuRun {
  bool timed_out = false;
  int exit_status = -1;  // when it exited normally
  std::string serial;
  std::string stderr_text;
};

class QemuBootTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::optional<std::string> qemu = FindInPath("qemu-system-x86_64");
    if (!qemu) {
      GTEST_SKIP() << "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86); "
                      "skipping the QEMU boot test";
    }
    qemu_ = *qemu;
    guest_ = FAULTLINE_DEFAULT_GUEST;
    ASSERT_TRUE(std::filesystem::exists(guest_))
        << guest_ << " is missing: build the faultline_guest target";
    std::string pattern = (std::filesystem::temp_directory_path() / "fl-qemu-XXXXXX").string();
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }

  void TearDown() override {
    if (!dir_.empty()) {
      std::error_code ignored;
      std::filesystem::remove_all(dir_, ignored);
    }
  }

  // Runs QEMU to completion (or kills it after kTimeout).
  QemuRun Run(const std::string& append, int memory_mib = 128) {
    std::filesystem::path serial = dir_ / "serial.txt", err = dir_ / "stderr.txt";
    std::vector<std::string> args =
        ::faultline::vmm::QemuTcgCommand(qemu_, guest_, append, memory_mib, serial.string());
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);

    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    pid_t pid = -1;
    int rc = posix_spawn(&pid, qemu_.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    QemuRun run;
    if (rc != 0) {
      ADD_FAILURE() << "cannot start " << qemu_ << ": " << std::strerror(rc);
      return run;
    }

    int status = 0;
    auto deadline = std::chrono::steady_clock::now() + kTimeout;
    for (;;) {
      pid_t done = waitpid(pid, &status, WNOHANG);
      if (done == pid) break;
      if (done < 0 && errno != EINTR) {
        ADD_FAILURE() << "waitpid: " << std::strerror(errno);
        return run;
      }
      if (std::chrono::steady_clock::now() > deadline) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        run.timed_out = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (!run.timed_out && WIFEXITED(status)) run.exit_status = WEXITSTATUS(status);
    run.serial = ReadFile(serial);
    run.stderr_text = ReadFile(err);
    return run;
  }

  std::string qemu_, guest_;
  std::filesystem::path dir_;
};

// The decimal number right after `key` in `line`.
std::optional<uint64_t> NumberAfter(const std::string& line, const std::string& key) {
  std::string::size_type at = line.find(key);
  if (at == std::string::npos) return std::nullopt;
  const char* first = line.data() + at + key.size();
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(first, line.data() + line.size(), value);
  if (ec != std::errc() || end == first) return std::nullopt;
  return value;
}

// The guest's final line, "[vcpu0] done: status=S verified=V bad=B".
struct DoneLine {
  uint64_t status = 0, verified = 0, bad = 0;
};

std::optional<DoneLine> FindDoneLine(const std::string& serial) {
  std::string::size_type at = serial.find("[vcpu0] done: ");
  if (at == std::string::npos) return std::nullopt;
  std::string line = serial.substr(at, serial.find('\n', at) - at);
  std::optional<uint64_t> status = NumberAfter(line, " status="),
                          verified = NumberAfter(line, " verified="),
                          bad = NumberAfter(line, " bad=");
  if (!status || !verified || !bad) return std::nullopt;
  return DoneLine{*status, *verified, *bad};
}

std::string Describe(const QemuRun& run) {
  return "serial output:\n" + run.serial + "\nqemu stderr:\n" + run.stderr_text;
}

TEST_F(QemuBootTest, FillVerifySucceeds) {
  QemuRun run = Run("workload=fill,verify");
  ASSERT_FALSE(run.timed_out) << Describe(run);
  EXPECT_EQ(run.exit_status, QemuStatus(0)) << Describe(run);
  std::optional<DoneLine> done = FindDoneLine(run.serial);
  ASSERT_TRUE(done) << Describe(run);
  EXPECT_EQ(done->status, 0u) << Describe(run);
  EXPECT_EQ(done->bad, 0u) << Describe(run);
  // 128 MiB less the low 2 MiB and the ledger: tens of thousands of pages.
  EXPECT_GT(done->verified, 30000u) << Describe(run);
  EXPECT_NE(run.serial.find("[vcpu0] fill: "), std::string::npos) << Describe(run);
}

TEST_F(QemuBootTest, RandomWritesKeepTheLedgerAroundASkippedWindow) {
  QemuRun run =
      Run("workload=fill,random,hotset,verify,touch ops=3000 hot_pages=16 seed=5 "
          "skip=0x1000000:0x200000");
  ASSERT_FALSE(run.timed_out) << Describe(run);
  EXPECT_EQ(run.exit_status, QemuStatus(0)) << Describe(run);
  EXPECT_NE(run.serial.find("(512 excluded)"), std::string::npos) << Describe(run);
  EXPECT_NE(run.serial.find("random: 3000 pages"), std::string::npos) << Describe(run);
  std::optional<DoneLine> done = FindDoneLine(run.serial);
  ASSERT_TRUE(done) << Describe(run);
  EXPECT_EQ(done->status, 0u) << Describe(run);
  EXPECT_EQ(done->bad, 0u) << Describe(run);
  EXPECT_GT(done->verified, 0u) << Describe(run);
}

TEST_F(QemuBootTest, BadParameterExitsWithCodeTwo) {
  QemuRun run = Run("workload=fill,nonsense");
  ASSERT_FALSE(run.timed_out) << Describe(run);
  EXPECT_EQ(run.exit_status, QemuStatus(2)) << Describe(run);
  EXPECT_NE(run.serial.find("unknown phase 'nonsense'"), std::string::npos) << Describe(run);
  std::optional<DoneLine> done = FindDoneLine(run.serial);
  ASSERT_TRUE(done) << Describe(run);
  EXPECT_EQ(done->status, 2u) << Describe(run);
}

TEST_F(QemuBootTest, TripleFaultShutsTheMachineDown) {
  // With -no-reboot a shutdown ends QEMU with status 0, which the debug-exit
  // device (always odd) cannot produce.
  QemuRun run = Run("workload=triplefault");
  ASSERT_FALSE(run.timed_out) << Describe(run);
  EXPECT_EQ(run.exit_status, 0) << Describe(run);
  EXPECT_NE(run.serial.find("triplefault:"), std::string::npos) << Describe(run);
  EXPECT_EQ(run.serial.find("done:"), std::string::npos) << Describe(run);
}

}  // namespace
