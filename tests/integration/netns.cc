#include "tests/integration/netns.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <sstream>

#include <fmt/format.h>
#include <fmt/ranges.h>

extern char** environ;

namespace faultline::integration {
namespace {

// The output of `command` (stdout and stderr) and its exit status; -1 if it
// could not be started.
int Capture(const std::vector<std::string>& command, std::string& output) {
  int pipe_fds[2];
  if (pipe2(pipe_fds, O_CLOEXEC) != 0) return -1;
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, pipe_fds[1], 1);
  posix_spawn_file_actions_adddup2(&actions, pipe_fds[1], 2);
  std::vector<std::string> args = command;
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  const int spawned = posix_spawnp(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(pipe_fds[1]);
  char buffer[512];
  for (ssize_t n;
       (n = read(pipe_fds[0], buffer, sizeof buffer)) > 0 || (n < 0 && errno == EINTR);) {
    if (n > 0) output.append(buffer, static_cast<size_t>(n));
  }
  close(pipe_fds[0]);
  if (spawned != 0) {
    output = fmt::format("cannot run {}: {}", command[0], std::strerror(spawned));
    return -1;
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

bool Found(const std::string& program) {
  std::string ignored;
  return Capture({program, "-V"}, ignored) == 0;
}

}  // namespace

NetnsPair::NetnsPair(const std::string& rate) : rate_(rate) {
  const std::string prefix = fmt::format("fl{}", getpid());
  a_ = {prefix + "a", "va", "10.77.0.1"};
  b_ = {prefix + "b", "vb", "10.77.0.2"};
  if (geteuid() != 0) {
    error_ = "not root: network namespaces, veth and tc need CAP_SYS_ADMIN and CAP_NET_ADMIN";
    return;
  }
  if (!Found("ip") || !Found("tc")) {
    error_ = "no `ip` or `tc` in PATH: install iproute2 (scripts/install-deps.sh does)";
    return;
  }
  RemoveStale();
  error_ = Make();
}

NetnsPair::~NetnsPair() {
  if (made_a_) (void)Run({"ip", "netns", "del", a_.ns});
  if (made_b_) (void)Run({"ip", "netns", "del", b_.ns});
}

std::string NetnsPair::Make() {
  std::string failed = Run({"ip", "netns", "add", a_.ns});
  made_a_ = failed.empty();
  if (made_a_) failed = Run({"ip", "netns", "add", b_.ns});
  made_b_ = made_a_ && failed.empty();
  if (!failed.empty()) return "cannot make a network namespace: " + failed;
  // The pair is made inside a's namespace, its peer moved to b's at once:
  // no device of the test ever exists in the host's namespace.
  // A bucket of 1 ms at the rate, at least 256 KiB (a GSO packet is up to
  // 64 KiB); 20 ms of queue before tbf drops.
  const std::string burst = fmt::format(
      "{}", std::max<uint64_t>(256 << 10, static_cast<uint64_t>(bytes_per_second() / 1000)));
  const std::vector<std::vector<std::string>> steps = {
      {"ip", "-n", a_.ns, "link", "add", a_.device, "type", "veth", "peer", "name", b_.device,
       "netns", b_.ns},
      {"ip", "-n", a_.ns, "addr", "add", a_.address + "/24", "dev", a_.device},
      {"ip", "-n", b_.ns, "addr", "add", b_.address + "/24", "dev", b_.device},
      {"ip", "-n", a_.ns, "link", "set", "lo", "up"},
      {"ip", "-n", b_.ns, "link", "set", "lo", "up"},
      {"ip", "-n", a_.ns, "link", "set", a_.device, "up"},
      {"ip", "-n", b_.ns, "link", "set", b_.device, "up"},
      {"tc", "-n", a_.ns, "qdisc", "add", "dev", a_.device, "root", "tbf", "rate", rate_, "burst",
       burst, "latency", "20ms"},
      {"tc", "-n", b_.ns, "qdisc", "add", "dev", b_.device, "root", "tbf", "rate", rate_, "burst",
       burst, "latency", "20ms"},
  };
  for (const auto& step : steps) {
    failed = Run(step);
    if (!failed.empty()) return "cannot set up the link between the namespaces: " + failed;
  }
  return "";
}

double NetnsPair::bytes_per_second() const {
  // tc's "<digits>[kmg]bit" (std::regex is avoided: GCC 12 warns inside it).
  size_t digits = 0;
  while (digits < rate_.size() && std::isdigit(static_cast<unsigned char>(rate_[digits]))) {
    ++digits;
  }
  const std::string unit = rate_.substr(digits);
  const double scale = unit == "kbit" ? 1e3 : unit == "mbit" ? 1e6 : unit == "gbit" ? 1e9 : 1;
  if (digits == 0 || (scale == 1 && unit != "bit")) return 0;
  return std::stod(rate_.substr(0, digits)) * scale / 8;
}

std::string NetnsPair::LinkDown() {
  return Run({"ip", "-n", a_.ns, "link", "set", a_.device, "down"});
}

std::string NetnsPair::LinkUp() { return Run({"ip", "-n", a_.ns, "link", "set", a_.device, "up"}); }

std::string NetnsPair::Run(const std::vector<std::string>& command) {
  std::string output;
  const int status = Capture(command, output);
  if (status == 0) return "";
  return fmt::format("`{}` exited {}: {}", fmt::join(command, " "), status, output);
}

void NetnsPair::RemoveStale() {
  std::string list;
  if (Capture({"ip", "netns", "list"}, list) != 0) return;
  // "fl1234a (id: 3)" or "fl1234a"
  std::istringstream lines(list);
  for (std::string line; std::getline(lines, line);) {
    const std::string name = line.substr(0, line.find(' '));
    const size_t digits = name.size() - 3;  // "fl", the pid, then "a" or "b"
    if (name.size() < 4 || name.compare(0, 2, "fl") != 0 ||
        (name.back() != 'a' && name.back() != 'b') ||
        name.find_first_not_of("0123456789", 2) != name.size() - 1) {
      continue;
    }
    const pid_t pid = static_cast<pid_t>(std::stol(name.substr(2, digits)));
    if (pid == getpid() || kill(pid, 0) == 0 || errno != ESRCH) continue;
    (void)Run({"ip", "netns", "del", name});
  }
}

}  // namespace faultline::integration
