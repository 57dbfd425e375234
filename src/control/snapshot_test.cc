// The "snapshot" command: its arguments, and a real snapshot of a fake-vCPU
// VM (real RAM and dirty tracking) through the control server, refused when
// the VMM says not now.
#include "src/control/snapshot.h"

#include <unistd.h>

#include <filesystem>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/control/args.h"
#include "src/migration/memory_vm_fakes.h"

namespace faultline::control {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

TEST(SnapshotRequestTest, DefaultsAreLiveAndResume) {
  Result<SnapshotRequest> r = ParseSnapshotRequest({{"dir", "/tmp/x"}});
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_EQ(r->dir, "/tmp/x");
  EXPECT_TRUE(r->live);
  EXPECT_TRUE(r->resume);
  r = ParseSnapshotRequest({{"dir", "/tmp/x"}, {"live", false}, {"resume", false}});
  ASSERT_TRUE(r.has_value());
  EXPECT_FALSE(r->live);
  EXPECT_FALSE(r->resume);
  EXPECT_EQ(nlohmann::json(*r),
            nlohmann::json({{"dir", "/tmp/x"}, {"live", false}, {"resume", false}}));
}

TEST(SnapshotRequestTest, BadArgumentsNameTheMember) {
  EXPECT_THAT(ParseSnapshotRequest(nlohmann::json::object()).error().message(), HasSubstr("'dir'"));
  EXPECT_THAT(ParseSnapshotRequest({{"dir", ""}}).error().message(), HasSubstr("empty"));
  EXPECT_THAT(ParseSnapshotRequest({{"dir", "/x"}, {"live", "yes"}}).error().message(),
              HasSubstr("'live'"));
  EXPECT_THAT(ParseSnapshotRequest({{"dir", "/x"}, {"to", "file:/x"}}).error().message(),
              HasSubstr("'to'"));
}

class SnapshotCommandTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/faultline-control-snapshot-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    auto server = ControlServer::Create(root_ + "/control.sock");
    ASSERT_TRUE(server.has_value()) << server.error().ToString();
    server_ = std::move(*server);
  }
  void TearDown() override { fs::remove_all(root_); }

  nlohmann::json Call(const nlohmann::json& args) {
    nlohmann::json request = {{"execute", "snapshot"}, {"arguments", args}};
    return nlohmann::json::parse(server_->HandleLine(request.dump()));
  }

  std::string root_;
  std::unique_ptr<ControlServer> server_;
};

TEST_F(SnapshotCommandTest, WritesTheVmAndRepliesWithItsFigures) {
  migration::testing::Memory memory(Backing::kAnonymous, 4ull << 20);
  migration::testing::Record record;
  std::memset(memory.host(), 0x5a, 1ull << 20);  // 256 data pages, the rest zero
  auto vm = migration::MakeMemorySource(
      *memory.memory,
      std::make_unique<migration::testing::FakeControl>(record, memory.host(), memory.size()));
  int started = 0, ended = 0;
  RegisterSnapshotCommand(
      *server_, *vm,
      [&] {
        ++started;
        return Status::Ok();
      },
      [&] { ++ended; });
  const std::string dir = root_ + "/snap";
  nlohmann::json reply = Call({{"dir", dir}, {"live", false}});
  ASSERT_TRUE(reply.contains("return")) << reply.dump();
  EXPECT_EQ(reply["return"]["dir"], dir);
  EXPECT_EQ(reply["return"]["data_pages"], 256);
  EXPECT_EQ(reply["return"]["zero_pages"], 768);
  EXPECT_TRUE(fs::exists(dir + "/manifest.json"));
  EXPECT_FALSE(record.IsPaused());  // resumed afterwards
  EXPECT_EQ(started, 1);
  EXPECT_EQ(ended, 1);

  // The same directory again: an error, and the snapshot there is kept.
  reply = Call({{"dir", dir}});
  ASSERT_TRUE(reply.contains("error")) << reply.dump();
  EXPECT_THAT(reply["error"]["desc"].get<std::string>(), HasSubstr("exists already"));
  EXPECT_TRUE(fs::exists(dir + "/manifest.json"));
  EXPECT_EQ(ended, 2);
}

TEST_F(SnapshotCommandTest, RefusedWhileTheVmmSaysNotNow) {
  migration::testing::Memory memory(Backing::kAnonymous, 4ull << 20);
  migration::testing::Record record;
  auto vm = migration::MakeMemorySource(
      *memory.memory,
      std::make_unique<migration::testing::FakeControl>(record, memory.host(), memory.size()));
  bool ended = false;
  RegisterSnapshotCommand(
      *server_, *vm, [] { return WrongState("a migration is running"); }, [&] { ended = true; });
  nlohmann::json reply = Call({{"dir", root_ + "/snap"}});
  ASSERT_TRUE(reply.contains("error")) << reply.dump();
  EXPECT_EQ(reply["error"]["class"], "WrongState");
  EXPECT_FALSE(fs::exists(root_ + "/snap"));
  EXPECT_FALSE(ended);
  EXPECT_FALSE(record.IsPaused());
}

}  // namespace
}  // namespace faultline::control
