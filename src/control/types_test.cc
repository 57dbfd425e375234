// Control payloads, argument checking and the migration commands, through
// ControlServer::HandleLine (no sockets needed).
#include "src/control/types.h"

#include <unistd.h>

#include <memory>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/control/args.h"
#include "src/control/migration.h"
#include "src/control/server.h"
#include "src/sys/mutex.h"

namespace faultline::control {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

TEST(ControlTypesTest, MigrationTargets) {
  Result<MigrationTarget> t = ParseMigrationTarget("tcp:host-b.example:4444");
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->host, "host-b.example");
  EXPECT_EQ(t->port, 4444);
  EXPECT_EQ(t->ToString(), "tcp:host-b.example:4444");
  t = ParseMigrationTarget("tcp:[::1]:7");
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->host, "::1");
  EXPECT_EQ(t->ToString(), "tcp:[::1]:7");
  for (const char* bad : {"udp:h:1", "tcp:h", "tcp::1", "tcp:h:0", "tcp:h:65536", "tcp:h:12x",
                          "tcp:::1:5", "tcp:[h]:5", "tcp:a b:5", "h:5"}) {
    Result<MigrationTarget> r = ParseMigrationTarget(bad);
    ASSERT_FALSE(r.has_value()) << bad;
    EXPECT_THAT(r.error().message(), HasSubstr("use tcp:HOST:PORT")) << bad;
  }
  t = ParseMigrationTarget("unix:/run/vm.sock");
  ASSERT_TRUE(t.has_value());
  EXPECT_TRUE(t->is_unix());
  EXPECT_EQ(t->ToString(), "unix:/run/vm.sock");
  EXPECT_FALSE(ParseMigrationTarget("unix:").has_value());
}

TEST(ControlTypesTest, LocalUpdateRequestAndStatus) {
  Result<MigrateRequest> r =
      ParseMigrateRequest(json{{"to", "unix:/run/vm.sock"}, {"local", true}});
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_TRUE(r->local);
  EXPECT_EQ(json(*r)["local"], true);
  r = ParseMigrateRequest(json{{"to", "tcp:h:1"}, {"local", true}});
  ASSERT_FALSE(r.has_value());
  EXPECT_THAT(r.error().message(), HasSubstr("must be unix:PATH"));
  MigrationStatus s;
  s.phase = MigrationPhase::kCompleted;
  s.to = "unix:/run/vm.sock";
  s.local = true;
  s.local_memory = "fds";
  s.fds_passed = 1;
  s.downtime_us = 830;
  json j = s;
  EXPECT_EQ(j["pages_copied"], 0);
  EXPECT_EQ(j["memory"], "fds");
  Result<MigrationStatus> back = ParseMigrationStatus(j);
  ASSERT_TRUE(back.has_value()) << back.error().ToString();
  EXPECT_TRUE(back->local);
  EXPECT_EQ(back->fds_passed, 1u);
  EXPECT_EQ(back->downtime_us, 830u);
  EXPECT_FALSE(json(MigrationStatus{}).contains("local"));
}

TEST(ControlTypesTest, MigrateRequestDefaultsAndErrors) {
  Result<MigrateRequest> r = ParseMigrateRequest(json{{"to", "tcp:h:1"}});
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_EQ(r->mode, MigrationMode::kPrecopy);
  EXPECT_EQ(r->channels, 1u);
  EXPECT_EQ(r->downtime_ms, kDefaultDowntimeMs);
  EXPECT_EQ(r->bandwidth_bytes_per_sec, 0u);
  json full = {{"to", "tcp:h:1"},
               {"mode", "postcopy"},
               {"channels", 4},
               {"downtime_ms", 50},
               {"bandwidth_bytes_per_sec", 1 << 30},
               {"precopy_passes", 0},
               {"postcopy_on_command", true},
               {"postcopy_answers", "bulk"}};
  r = ParseMigrateRequest(full);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(json(*r), full);

  struct Case {
    json args;
    const char* message;
  } cases[] = {
      {json::object(), "missing argument 'to' (a string)"},
      {{{"to", 5}}, "argument 'to' must be a string, got number 5"},
      {{{"to", "tcp:h:1"}, {"mode", "sideways"}}, "unknown migration mode 'sideways'"},
      {{{"to", "tcp:h:1"}, {"channels", 0}}, "argument 'channels' is 0: must be 1 to 16"},
      {{{"to", "tcp:h:1"}, {"channels", -2}}, "must be an unsigned integer, got number -2"},
      {{{"to", "tcp:h:1"}, {"channels", 1.5}}, "must be an unsigned integer, got number 1.5"},
      {{{"to", "tcp:h:1"}, {"downtime_ms", "fast"}}, "argument 'downtime_ms' must be"},
      {{{"to", "tcp:h:1"}, {"speed", 1}}, "unexpected argument 'speed'"},
      {{{"to", "tcp:h:1"}, {"precopy_passes", 2}}, "apply to mode postcopy only"},
      {{{"to", "tcp:h:1"}, {"mode", "postcopy"}, {"precopy_passes", 1001}},
       "argument 'precopy_passes' is 1001"},
      {{{"to", "tcp:h:1"}, {"mode", "postcopy"}, {"postcopy_on_command", 1}},
       "argument 'postcopy_on_command' must be true or false"},
      {{{"to", "tcp:h:1"}, {"postcopy_answers", "bulk"}}, "apply to mode postcopy only"},
      {{{"to", "tcp:h:1"}, {"mode", "postcopy"}, {"postcopy_answers", "main"}},
       "postcopy_answers must be \"priority\" (the default) or \"bulk\""},
      {json::array(), "arguments must be a JSON object"},
  };
  for (const Case& c : cases) {
    Result<MigrateRequest> bad = ParseMigrateRequest(c.args);
    ASSERT_FALSE(bad.has_value()) << c.args;
    EXPECT_THAT(bad.error().message(), HasSubstr(c.message)) << c.args;
    EXPECT_EQ(ClassifyStatus(bad.error()), ControlErrorClass::kInvalidArgument) << c.args;
  }
}

TEST(ControlTypesTest, MigrationStatusRoundTrip) {
  MigrationStatus s;
  s.phase = MigrationPhase::kPrecopy;
  s.mode = MigrationMode::kPostcopy;
  s.to = "tcp:h:1";
  s.pass = 3;
  s.bytes_total = 1000;
  s.bytes_sent = 2500;
  s.bytes_remaining = 250;
  s.pages_sent = 7;
  s.dirty_rate_bytes_per_sec = 11;
  s.bandwidth_bytes_per_sec = 12;
  s.eta_ms = 13;
  s.elapsed_ms = 14;
  s.paused = true;
  s.pages_demanded = 15;
  s.pages_pushed = 16;
  s.requests_rejected = 3;
  s.sessions = 2;
  s.fault_p99_us = 17.5;
  json j = s;
  EXPECT_TRUE(j["fault_p50_us"].is_null());
  EXPECT_EQ(j["pages_demanded"], 15);
  EXPECT_EQ(j["requests_rejected"], 3);
  EXPECT_TRUE(j["downtime_ms"].is_null());
  EXPECT_FALSE(j.contains("error"));
  EXPECT_DOUBLE_EQ(s.Percent(), 75.0);
  Result<MigrationStatus> back = ParseMigrationStatus(j);
  ASSERT_TRUE(back.has_value()) << back.error().ToString();
  EXPECT_EQ(json(*back), j);
  j["future_field"] = "ignored";
  j["phase"] = "teleporting";
  EXPECT_THAT(ParseMigrationStatus(j).error().message(), HasSubstr("teleporting"));
  j.erase("phase");
  EXPECT_THAT(ParseMigrationStatus(j).error().message(), HasSubstr("missing field 'phase'"));
  for (int p = 0; p <= static_cast<int>(MigrationPhase::kCancelled); ++p) {
    auto phase = static_cast<MigrationPhase>(p);
    EXPECT_EQ(*ParseMigrationPhase(MigrationPhaseName(phase)), phase);
  }
}

TEST(ControlTypesTest, VmStatusJson) {
  VmStatus s;
  s.state = VmState::kRunning;
  s.vcpus = 2;
  s.mem_bytes = 1 << 30;
  s.backing = "memfd";
  s.guest = {{true, "fill", 1, 100, false}, {true, "verify", 1, 50, true}};
  json j = s;
  EXPECT_EQ(j["state"], "running");
  EXPECT_EQ(j["guest"][1]["phase"], "verify");
  EXPECT_EQ(j["guest"][1]["vcpu"], 1);
  EXPECT_EQ(j["migration"], "none");
}

// A scripted engine: records calls, reports what the test sets.
class FakeMigration : public MigrationControl {
 public:
  Status Start(const MigrateRequest& request) override {
    sys::MutexLock lock(mu_);
    last_request = request;
    status.phase = MigrationPhase::kSetup;
    status.to = request.to.ToString();
    return Status::Ok();
  }
  MigrationStatus Query() override {
    sys::MutexLock lock(mu_);
    return status;
  }
  Status Cancel() override {
    sys::MutexLock lock(mu_);
    if (!IsActive(status.phase)) return WrongState("no migration is active");
    status.phase = MigrationPhase::kCancelled;
    return Status::Ok();
  }
  MigrateRequest LastRequest() {
    sys::MutexLock lock(mu_);
    return last_request;
  }
  sys::Mutex mu_;
  MigrationStatus status GUARDED_BY(mu_);
  MigrateRequest last_request GUARDED_BY(mu_);
};

class MigrationCommandsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = "/tmp/fl_ctl_types_" + std::to_string(getpid()) + ".sock";
    Result<std::unique_ptr<ControlServer>> server = ControlServer::Create(path_);
    ASSERT_TRUE(server.has_value()) << server.error().ToString();
    server_ = std::move(*server);
    RegisterMigrationCommands(*server_, fake_);
  }
  json Call(const json& request) { return json::parse(server_->HandleLine(request.dump())); }

  std::string path_;
  std::shared_ptr<FakeMigration> fake_ = std::make_shared<FakeMigration>();
  std::unique_ptr<ControlServer> server_;
};

TEST_F(MigrationCommandsTest, MigrateQueryCancel) {
  EXPECT_EQ(Call({{"execute", "query-migrate"}})["return"]["phase"], "none");
  json r = Call({{"execute", "migrate"}, {"arguments", {{"to", "tcp:b:9"}, {"channels", 2}}}});
  EXPECT_EQ(r, json::parse(R"({"return": {}})"));
  EXPECT_EQ(fake_->LastRequest().channels, 2u);
  EXPECT_EQ(Call({{"execute", "query-migrate"}})["return"]["phase"], "setup");
  r = Call({{"execute", "migrate"}, {"arguments", {{"to", "tcp:c:9"}}}});
  EXPECT_EQ(r["error"]["class"], "WrongState");
  EXPECT_THAT(r["error"]["desc"].get<std::string>(), HasSubstr("already active"));
  EXPECT_EQ(Call({{"execute", "cancel"}}), json::parse(R"({"return": {}})"));
  EXPECT_EQ(Call({{"execute", "query-migrate"}})["return"]["phase"], "cancelled");
  r = Call({{"execute", "migrate-cancel"}});
  EXPECT_EQ(r["error"]["class"], "WrongState");
  r = Call({{"execute", "query-migrate"}, {"arguments", {{"verbose", true}}}});
  EXPECT_EQ(r["error"]["class"], "InvalidArgument");
}

TEST_F(MigrationCommandsTest, BadMigrateArgumentsNeverReachTheEngine) {
  json r = Call({{"execute", "migrate"}, {"arguments", {{"to", "tcp:b:9"}, {"channels", "2"}}}});
  EXPECT_EQ(r["error"]["class"], "InvalidArgument");
  EXPECT_EQ(r["error"]["desc"],
            "argument 'channels' must be an unsigned integer, got string \"2\"");
  EXPECT_EQ(fake_->Query().phase, MigrationPhase::kNone);
}

TEST_F(MigrationCommandsTest, ReservedCommandsSayNotSupported) {
  json r = Call({{"execute", "migrate-resume"}, {"arguments", {{"to", "tcp:b:9"}}}});
  EXPECT_EQ(r["error"]["class"], "NotSupported");
  EXPECT_THAT(r["error"]["desc"].get<std::string>(), HasSubstr("not supported yet"));
  r = Call({{"execute", "migrate-resume"}, {"arguments", {{"to", "nowhere"}}}});
  EXPECT_EQ(r["error"]["class"], "InvalidArgument");
  r = Call({{"execute", "migrate-start-postcopy"}});
  EXPECT_EQ(r["error"]["class"], "NotSupported");
}

TEST(ControlMigrationTest, UnavailableEngineAndStatus) {
  std::string path = "/tmp/fl_ctl_unavail_" + std::to_string(getpid()) + ".sock";
  Result<std::unique_ptr<ControlServer>> server = ControlServer::Create(path);
  ASSERT_TRUE(server.has_value());
  RegisterMigrationCommands(**server, MakeUnavailableMigrationControl());
  RegisterStatusCommand(**server, [] {
    VmStatus s;
    s.state = VmState::kPaused;
    return s;
  });
  json r =
      json::parse((*server)->HandleLine(R"({"execute":"migrate","arguments":{"to":"tcp:b:1"}})"));
  EXPECT_EQ(r["error"]["class"], "NotSupported");
  r = json::parse((*server)->HandleLine(R"({"execute":"query-status"})"));
  EXPECT_EQ(r["return"]["state"], "paused");
}

}  // namespace
}  // namespace faultline::control
