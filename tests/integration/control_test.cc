// `faultline migrate` and `faultline query`, the real binary, against a real
// ControlServer in this process. The migration engine behind the server is a
// test double that simulates progress over time, so that the CLI's progress,
// cancel and failure paths meet exact timings (migration_cli_test.cc runs
// the real engines); the socket, the protocol, argument checking and the
// CLI are real.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "src/control/args.h"
#include "src/control/migration.h"
#include "src/control/server.h"
#include "src/sys/mutex.h"
#include "tests/integration/test_accel.h"

extern char** environ;

namespace faultline::control {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// Simulates a migration of 1 GiB: setup for 50 ms, then pre-copy passes,
// a switchover for the last fifth, then completed (or failed). A cancel takes
// effect 100 ms later, as a real engine's would after a round trip.
class SimulatedMigration : public MigrationControl {
 public:
  static constexpr uint64_t kTotal = 1ull << 30;
  explicit SimulatedMigration(milliseconds duration, std::string fail_with = "")
      : duration_(duration), fail_with_(std::move(fail_with)) {}

  Status Start(const MigrateRequest& request) override {
    sys::MutexLock lock(mu_);
    if (started_ && !IsTerminal(StatusLocked().phase)) return WrongState("busy");
    started_ = true;
    start_ = Clock::now();
    cancel_at_.reset();
    request_ = request;
    return Status::Ok();
  }
  MigrationStatus Query() override {
    sys::MutexLock lock(mu_);
    ++queries_;
    return StatusLocked();
  }
  Status Cancel() override {
    sys::MutexLock lock(mu_);
    if (!IsActive(StatusLocked().phase)) return WrongState("no migration is active");
    if (!cancel_at_) cancel_at_ = Clock::now() + milliseconds(100);
    ++cancels_;
    return Status::Ok();
  }

  int queries() {
    sys::MutexLock lock(mu_);
    return queries_;
  }
  int cancels() {
    sys::MutexLock lock(mu_);
    return cancels_;
  }
  MigrateRequest request() {
    sys::MutexLock lock(mu_);
    return request_;
  }

 private:
  MigrationStatus StatusLocked() const REQUIRES(mu_) {
    MigrationStatus s;
    if (!started_) return s;
    auto now = Clock::now();
    double t = std::chrono::duration<double, std::milli>(now - start_).count();
    double d = static_cast<double>(duration_.count());
    s.mode = request_.mode;
    s.to = request_.to.ToString();
    s.bytes_total = kTotal;
    s.elapsed_ms = static_cast<uint64_t>(t);
    double fraction = std::min(1.0, t / d);
    s.pass = 1 + static_cast<uint32_t>(std::min(2.0, fraction * 3));
    s.bytes_sent = static_cast<uint64_t>(fraction * 1.5 * kTotal);
    s.pages_sent = s.bytes_sent / 4096;
    s.bytes_remaining = static_cast<uint64_t>((1 - fraction) * kTotal);
    s.bandwidth_bytes_per_sec = 800ull << 20;
    s.dirty_rate_bytes_per_sec = 40ull << 20;
    s.eta_ms = static_cast<uint64_t>(std::max(0.0, d - t));
    if (cancel_at_ && now >= *cancel_at_) {
      s.phase = MigrationPhase::kCancelled;
      s.error = "cancelled by the operator";
    } else if (t < 50) {
      s.phase = MigrationPhase::kSetup;
      s.pass = 0;
      s.eta_ms.reset();
    } else if (t < 0.8 * d) {
      s.phase = MigrationPhase::kPrecopy;
    } else if (t < d) {
      s.phase = MigrationPhase::kSwitchover;
    } else if (!fail_with_.empty()) {
      s.phase = MigrationPhase::kFailed;
      s.error = fail_with_;
    } else {
      s.phase = MigrationPhase::kCompleted;
      s.downtime_ms = 12;
    }
    return s;
  }

  const milliseconds duration_;
  const std::string fail_with_;
  sys::Mutex mu_;
  bool started_ GUARDED_BY(mu_) = false;
  Clock::time_point start_ GUARDED_BY(mu_);
  std::optional<Clock::time_point> cancel_at_ GUARDED_BY(mu_);
  MigrateRequest request_ GUARDED_BY(mu_);
  int queries_ GUARDED_BY(mu_) = 0;
  int cancels_ GUARDED_BY(mu_) = 0;
};

std::string Slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// The CLI as a child process, killed if it outlives its deadline.
class Cli {
 public:
  Cli(std::string dir, std::vector<std::string> args) : out_(dir + "/out"), err_(dir + "/err") {
    static int counter = 0;
    out_ += std::to_string(++counter);
    err_ += std::to_string(counter);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, out_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&actions, 2, err_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    itest::AddAccelArgs(args);
    args.insert(args.begin(), FAULTLINE_CLI_PATH);
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (posix_spawn(&pid_, FAULTLINE_CLI_PATH, &actions, nullptr, argv.data(), environ) != 0) {
      pid_ = -1;
    }
    posix_spawn_file_actions_destroy(&actions);
  }
  ~Cli() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  void Signal(int sig) { kill(pid_, sig); }
  // The exit code, 128 + signal, or -1 if it had to be killed.
  int Wait(std::chrono::seconds timeout = std::chrono::seconds(30)) {
    if (pid_ <= 0) return -2;
    auto deadline = Clock::now() + timeout;
    int status = 0;
    while (waitpid(pid_, &status, WNOHANG) == 0) {
      if (Clock::now() > deadline) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
        pid_ = -1;
        return -1;
      }
      std::this_thread::sleep_for(milliseconds(10));
    }
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  std::string out() const { return Slurp(out_); }
  std::string err() const { return Slurp(err_); }

 private:
  std::string out_, err_;
  pid_t pid_ = -1;
};

class ControlCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = "/tmp/fl_control_cli_XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    path_ = dir_ + "/vmm.sock";
  }
  void TearDown() override {
    server_.reset();
    std::system(("rm -rf " + dir_).c_str());
  }
  void Serve(std::shared_ptr<MigrationControl> engine) {
    Result<std::unique_ptr<ControlServer>> server = ControlServer::Create(path_);
    ASSERT_TRUE(server.has_value()) << server.error().ToString();
    server_ = std::move(*server);
    RegisterMigrationCommands(*server_, std::move(engine));
    RegisterStatusCommand(*server_, [] {
      VmStatus s;
      s.state = VmState::kRunning;
      s.vcpus = 2;
      return s;
    });
    ASSERT_TRUE(server_->Start().ok());
  }
  // Runs the CLI to completion.
  int Run(std::vector<std::string> args, std::string* out, std::string* err) {
    Cli cli(dir_, std::move(args));
    int code = cli.Wait();
    *out = cli.out();
    *err = cli.err();
    return code;
  }
  std::vector<std::string> Migrate(std::vector<std::string> extra) {
    std::vector<std::string> args = {"migrate", "--control", path_, "--interval-ms", "50"};
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }

  std::string dir_, path_;
  std::unique_ptr<ControlServer> server_;
};

TEST_F(ControlCliTest, MigrateShowsProgressAndSucceeds) {
  auto engine = std::make_shared<SimulatedMigration>(milliseconds(800));
  Serve(engine);
  std::string out, err;
  int code = Run(Migrate({"--to", "tcp:127.0.0.1:4444", "--channels", "3"}), &out, &err);
  ASSERT_EQ(code, 0) << out << err;
  EXPECT_EQ(engine->request().channels, 3u);
  EXPECT_EQ(engine->request().to.port, 4444);
  // Not a terminal: plain lines, one per phase or pass change.
  EXPECT_THAT(out, Not(HasSubstr("\r")));
  EXPECT_THAT(out, HasSubstr("precopy    pass  1"));
  EXPECT_THAT(out, HasSubstr("precopy    pass  2"));
  EXPECT_THAT(out, HasSubstr("switchover"));
  EXPECT_THAT(out, HasSubstr("completed  pass  3 100.0%"));
  EXPECT_THAT(out, HasSubstr("ETA"));
  EXPECT_THAT(out, HasSubstr("MiB/s"));
  EXPECT_THAT(out, HasSubstr("migration to tcp:127.0.0.1:4444 completed in"));
  EXPECT_THAT(out, HasSubstr("downtime 12 ms"));
  EXPECT_EQ(err, "");
}

TEST_F(ControlCliTest, JsonOutputIsOneObjectWithTheFinalStatus) {
  auto engine = std::make_shared<SimulatedMigration>(milliseconds(300));
  Serve(engine);
  std::string out, err;
  int code = Run(Migrate({"--to", "tcp:[::1]:7000", "--mode", "postcopy", "--downtime-ms", "50",
                          "--bandwidth", "1G/s", "--json"}),
                 &out, &err);
  ASSERT_EQ(code, 0) << out << err;
  nlohmann::json j = nlohmann::json::parse(out);  // nothing but the object
  EXPECT_EQ(j["result"], "completed");
  EXPECT_EQ(j["migration"]["phase"], "completed");
  EXPECT_EQ(j["migration"]["mode"], "postcopy");
  EXPECT_EQ(j["migration"]["to"], "tcp:[::1]:7000");
  EXPECT_EQ(j["migration"]["bytes_total"], SimulatedMigration::kTotal);
  EXPECT_EQ(j["migration"]["downtime_ms"], 12);
  EXPECT_GE(j["elapsed_ms"].get<double>(), 250.0);
  EXPECT_EQ(j["interrupted"], false);
  MigrateRequest r = engine->request();
  EXPECT_EQ(r.mode, MigrationMode::kPostcopy);
  EXPECT_EQ(r.downtime_ms, 50u);
  EXPECT_EQ(r.bandwidth_bytes_per_sec, 1ull << 30);
}

TEST_F(ControlCliTest, FailedMigrationExitsOneWithTheReason) {
  Serve(std::make_shared<SimulatedMigration>(milliseconds(300), "destination closed the link"));
  std::string out, err;
  EXPECT_EQ(Run(Migrate({"--to", "tcp:h:1"}), &out, &err), 1);
  EXPECT_THAT(err, HasSubstr("migration to tcp:h:1 failed: destination closed the link"));
  out.clear();
  EXPECT_EQ(Run(Migrate({"--to", "tcp:h:1", "--json"}), &out, &err), 1);
  EXPECT_EQ(nlohmann::json::parse(out)["result"], "failed");
}

TEST_F(ControlCliTest, InterruptCancelsAndWaitsForTheCancelledPhase) {
  auto engine = std::make_shared<SimulatedMigration>(milliseconds(60'000));
  Serve(engine);
  Cli cli(dir_, Migrate({"--to", "tcp:h:1", "--json"}));
  auto deadline = Clock::now() + std::chrono::seconds(20);
  while (engine->queries() < 3 && Clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(10));
  }
  ASSERT_GE(engine->queries(), 3) << cli.err();
  cli.Signal(SIGINT);
  EXPECT_EQ(cli.Wait(), 130) << cli.err();
  EXPECT_EQ(engine->cancels(), 1);
  EXPECT_THAT(cli.err(), HasSubstr("cancelling the migration"));
  EXPECT_THAT(cli.err(), HasSubstr("cancelled: cancelled by the operator"));
  nlohmann::json j = nlohmann::json::parse(cli.out());
  EXPECT_EQ(j["result"], "cancelled");
  EXPECT_EQ(j["interrupted"], true);
}

TEST_F(ControlCliTest, CancelFromAnotherProcess) {
  auto engine = std::make_shared<SimulatedMigration>(milliseconds(60'000));
  Serve(engine);
  Cli migrating(dir_, Migrate({"--to", "tcp:h:1"}));
  auto deadline = Clock::now() + std::chrono::seconds(20);
  while (engine->queries() < 2 && Clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(10));
  }
  std::string out, err;
  EXPECT_EQ(Run(Migrate({"--cancel"}), &out, &err), 0) << err;
  EXPECT_EQ(migrating.Wait(), 1);
  EXPECT_THAT(migrating.err(), HasSubstr("cancelled"));
  // Nothing left to cancel now.
  EXPECT_EQ(Run(Migrate({"--cancel"}), &out, &err), 1);
  EXPECT_THAT(err, HasSubstr("no migration is active"));
}

TEST_F(ControlCliTest, RefusedRequestsExplainThemselves) {
  Serve(std::make_shared<SimulatedMigration>(milliseconds(60'000)));
  struct Case {
    std::vector<std::string> args;
    std::string message;
  } cases[] = {
      {{"--to", "tcp:h:1", "--channels", "0"}, "argument 'channels' is 0: must be 1 to 16"},
      {{"--to", "h:1"}, "--to: 'h:1' is not a migration target"},
      {{"--to", "tcp:h:1", "--mode", "sideways"}, "--mode: unknown migration mode"},
      {{"--to", "tcp:h:1", "--bandwidth", "fast"}, "--bandwidth: 'fast' is not a size"},
      {{"--resume"}, "migrate-resume is not supported yet"},
      {{"--start-postcopy"}, "migrate-start-postcopy is not supported yet"},
      {{"--watch"}, "no migration is active"},
      {{}, "say what to do"},
      {{"--to", "tcp:h:1", "--cancel"}, "say what to do"},
  };
  for (const Case& c : cases) {
    std::string out, err;
    EXPECT_EQ(Run(Migrate(c.args), &out, &err), 1) << c.message;
    EXPECT_THAT(err, HasSubstr(c.message));
  }
}

TEST_F(ControlCliTest, SecondMigrateIsRefusedWhileOneIsActive) {
  Serve(std::make_shared<SimulatedMigration>(milliseconds(60'000)));
  std::string out, err;
  EXPECT_EQ(
      Run({"query", "--control", path_, "migrate", "--args", R"({"to": "tcp:a:1"})"}, &out, &err),
      0)
      << err;
  EXPECT_EQ(Run(Migrate({"--to", "tcp:b:1"}), &out, &err), 1);
  EXPECT_THAT(err, HasSubstr("already active (phase"));
}

TEST_F(ControlCliTest, NobodyListening) {
  std::string out, err;
  EXPECT_EQ(Run(Migrate({"--to", "tcp:h:1"}), &out, &err), 1);
  EXPECT_THAT(err, HasSubstr("no VMM is listening on " + path_ +
                             " — start one with `faultline run --control " + path_));
  EXPECT_EQ(Run({"query", "--control", path_}, &out, &err), 1);
  EXPECT_THAT(err, HasSubstr("no VMM is listening"));
}

TEST_F(ControlCliTest, VmmGoingAwayMidMigrationIsAnError) {
  Serve(std::make_shared<SimulatedMigration>(milliseconds(60'000)));
  Cli cli(dir_, Migrate({"--to", "tcp:h:1"}));
  std::this_thread::sleep_for(milliseconds(500));
  server_.reset();
  EXPECT_EQ(cli.Wait(std::chrono::seconds(20)), 1);
  EXPECT_THAT(cli.err(), HasSubstr("closed the connection"));
}

TEST_F(ControlCliTest, QueryPrintsJson) {
  Serve(std::make_shared<SimulatedMigration>(milliseconds(100)));
  std::string out, err;
  ASSERT_EQ(Run({"query", "--control", path_}, &out, &err), 0) << err;
  EXPECT_EQ(nlohmann::json::parse(out)["state"], "running");
  ASSERT_EQ(Run({"query", "--control", path_, "query-migrate"}, &out, &err), 0) << err;
  EXPECT_EQ(nlohmann::json::parse(out)["phase"], "none");
  EXPECT_EQ(Run({"query", "--control", path_, "self-destruct"}, &out, &err), 1);
  EXPECT_THAT(err, HasSubstr("unknown command 'self-destruct'"));
  EXPECT_EQ(Run({"query", "--control", path_, "query-status", "--args", "[]"}, &out, &err), 1);
  EXPECT_THAT(err, HasSubstr("not a JSON object"));
}

}  // namespace
}  // namespace faultline::control
