// Snapshots of a GuestMemory VM (fake vCPUs and devices, real RAM blocks and
// dirty tracking), restored eagerly and lazily (the real pager), and the
// damaged snapshots a restore must refuse before it changes anything.
#include "src/migration/snapshot.h"

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "src/migration/memory_vm_fakes.h"

namespace faultline::migration {
namespace {

using testing::FakeControl;
using ::testing::HasSubstr;
using testing::Memory;
using testing::Record;
using testing::Writer;
namespace fs = std::filesystem;

constexpr uint64_t kBytes = 8ull << 20;

class SnapshotTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/faultline-snapshot-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    dir_ = root_ + "/snap";
  }
  void TearDown() override { fs::remove_all(root_); }

  // A snapshot of `from` (paused or live) into dir_; the source stays paused.
  SnapshotStats Take(Memory& from, Record& record, bool live) {
    auto vm = MakeMemorySource(*from.memory,
                               std::make_unique<FakeControl>(record, from.host(), from.size()));
    SnapshotOptions options;
    options.live = live;
    options.resume = false;
    options.stop_below_pages = 64;
    Result<SnapshotStats> stats = WriteSnapshot(*vm, dir_, options);
    EXPECT_TRUE(stats.has_value()) << stats.error().ToString();
    return stats.value_or(SnapshotStats{});
  }

  // An eager restore into fresh memory of `bytes`; its memory and record.
  Status RestoreInto(Memory& to, Record& record) {
    auto vm = MakeMemoryDestination(*to.memory,
                                    std::make_unique<FakeControl>(record, to.host(), to.size()));
    Result<SnapshotReader> reader = SnapshotReader::Open(dir_);
    if (!reader) return reader.error();
    return RestoreEager(*reader, *vm);
  }

  std::string root_, dir_;
};

bool AllZero(const Memory& m) {
  for (uint64_t i = 0; i < m.size(); ++i) {
    if (m.host()[i] != 0) return false;
  }
  return true;
}

TEST_F(SnapshotTest, LiveSnapshotRestoresEagerlyToTheMemoryAtThePause) {
  Memory from(Backing::kAnonymous, kBytes);
  Record record;
  Writer writer(from, record);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const SnapshotStats stats = Take(from, record, /*live=*/true);
  writer.Stop();
  EXPECT_GE(stats.passes, 2u);
  EXPECT_FALSE(fs::exists(dir_ + ".tmp-" + std::to_string(::getpid())));

  Memory to(Backing::kAnonymous, kBytes);
  Record restored;
  ASSERT_TRUE(RestoreInto(to, restored).ok());
  EXPECT_EQ(std::memcmp(from.host(), to.host(), kBytes), 0);
  EXPECT_EQ(restored.vcpus_loaded, (std::vector<std::vector<uint8_t>>{{0xc0, 0}, {0xc0, 1}}));
  ASSERT_EQ(restored.devices_loaded.size(), 2u);
  EXPECT_EQ(restored.devices_loaded[0].name, "uart");
  EXPECT_EQ(restored.devices_loaded[1].state, std::vector<uint8_t>{4});
}

class LazyRestoreTest : public SnapshotTest, public ::testing::WithParamInterface<Backing> {};

// The guest starts at once; its vCPU reads every page in a random order,
// each a fault until the page is read from the snapshot; the rest is
// fetched in the background. Zero pages (holes) are never fetched.
TEST_P(LazyRestoreTest, GuestRunsAtOnceAndEveryPageArrives) {
  Memory from(GetParam(), kBytes);
  Record record;
  Writer writer(from, record);
  writer.Stop();
  const SnapshotStats written = Take(from, record, /*live=*/false);
  // Stopped at once, the writer left every third page zero: holes.
  EXPECT_GT(written.zero_pages, 0u);
  struct stat st = {};
  ASSERT_EQ(::stat((dir_ + "/block-0.mem").c_str(), &st), 0);
  EXPECT_LT(static_cast<uint64_t>(st.st_blocks) * 512, kBytes);

  Memory to(GetParam(), kBytes);
  Record restored;
  auto vm = MakeMemoryPostcopyDestination(
      *to.memory, std::make_unique<FakeControl>(restored, to.host(), to.size()));
  Result<SnapshotReader> reader = SnapshotReader::Open(dir_);
  ASSERT_TRUE(reader.has_value()) << reader.error().ToString();
  Status started = StartLazyRestore(*reader, *vm);
  ASSERT_TRUE(started.ok()) << started.ToString();
  EXPECT_TRUE(restored.started);
  const Status fetched = vm->FetchMissing();
  ASSERT_TRUE(fetched.ok()) << fetched.ToString();
  const Status finished = vm->FinishPaging();
  ASSERT_TRUE(finished.ok()) << finished.ToString();
  EXPECT_EQ(std::memcmp(from.host(), to.host(), kBytes), 0);
  auto data = reader->DataPages();
  ASSERT_TRUE(data.has_value());
  const paging::PagingStats stats = vm->paging_stats();
  EXPECT_GT(stats.fetches, 0u);
  EXPECT_LE(stats.fetches, (*data)[0].Count()) << "a zero page was fetched";
  EXPECT_EQ(restored.vcpus_loaded.size(), 2u);
}

INSTANTIATE_TEST_SUITE_P(Backings, LazyRestoreTest,
                         ::testing::Values(Backing::kAnonymous, Backing::kMemfd),
                         [](const auto& info) { return std::string(BackingName(info.param)); });

// Each damage is refused with one clear error, before anything is loaded.
TEST_F(SnapshotTest, DamagedSnapshotsAreRefusedBeforeAnythingChanges) {
  Memory from(Backing::kAnonymous, kBytes);
  Record record;
  Writer writer(from, record);
  writer.Stop();
  Take(from, record, /*live=*/false);
  const std::string block = dir_ + "/block-0.mem";
  const std::string manifest = dir_ + "/manifest.json";
  auto refused = [&](const std::string& why) {
    Memory to(Backing::kAnonymous, kBytes);
    Record restored;
    Status s = RestoreInto(to, restored);
    EXPECT_FALSE(s.ok());
    EXPECT_THAT(s.ToString(), HasSubstr(why));
    EXPECT_TRUE(AllZero(to)) << "memory was changed";
    EXPECT_TRUE(restored.vcpus_loaded.empty()) << "state was loaded";
  };
  {
    SCOPED_TRACE("a flipped byte");
    std::fstream f(block, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(4096 + 100);
    f.put(static_cast<char>(0x5a));
    f.close();
    refused("do not match their checksum");
  }
  {
    SCOPED_TRACE("a truncated memory file");
    fs::resize_file(block, kBytes - 4096);
    refused("truncated");
    fs::resize_file(block, kBytes);
  }
  nlohmann::json original;
  std::ifstream(manifest) >> original;
  auto rewrite = [&](nlohmann::json j) { std::ofstream(manifest) << j.dump(); };
  {
    SCOPED_TRACE("another format version");
    nlohmann::json j = original;
    j["version"] = 2;
    rewrite(j);
    refused("format version 2");
  }
  {
    SCOPED_TRACE("a block-size mismatch");
    rewrite(original);
    Memory small(Backing::kAnonymous, kBytes / 2);
    Record restored;
    auto vm = MakeMemoryDestination(
        *small.memory, std::make_unique<FakeControl>(restored, small.host(), small.size()));
    Result<SnapshotReader> reader = SnapshotReader::Open(dir_);
    ASSERT_TRUE(reader.has_value());
    Status s = RestoreEager(*reader, *vm);
    EXPECT_THAT(s.ToString(), HasSubstr("restore into a VM of the snapshot's layout"));
    EXPECT_TRUE(restored.vcpus_loaded.empty());
  }
}

TEST_F(SnapshotTest, ASnapshotIsNeverWrittenOverAnotherNorLeftHalfWritten) {
  Memory from(Backing::kAnonymous, kBytes);
  Record record;
  Writer writer(from, record);
  writer.Stop();
  fs::create_directory(dir_);
  auto vm = MakeMemorySource(*from.memory,
                             std::make_unique<FakeControl>(record, from.host(), from.size()));
  Result<SnapshotStats> stats = WriteSnapshot(*vm, dir_);
  ASSERT_FALSE(stats.has_value());
  EXPECT_THAT(stats.error().ToString(), HasSubstr("exists already"));
  EXPECT_TRUE(fs::is_empty(dir_));
  // What a crash mid-write leaves (the temporary directory, no manifest) is
  // not a snapshot.
  const std::string partial = root_ + "/partial";
  fs::create_directory(partial);
  std::ofstream(partial + "/block-0.mem") << "x";
  Result<SnapshotReader> reader = SnapshotReader::Open(partial);
  ASSERT_FALSE(reader.has_value());
  EXPECT_THAT(reader.error().ToString(), HasSubstr("no snapshot manifest"));
}

}  // namespace
}  // namespace faultline::migration

namespace faultline::migration {
namespace {

// A manifest of one 4 MiB block and one vCPU, edited by each case.
nlohmann::json SmallManifest() {
  return nlohmann::json::parse(R"({"format": "faultline-snapshot", "version": 1,
    "accelerator": 1, "chunk": 2097152, "devices": [],
    "blocks": [{"name": "ram0", "size": 4194304, "page_size": 4096, "backing": "anon",
                "file": "block-0.mem", "chunks": ["a", "b"]}],
    "vcpus": [{"name": "0", "file": "vcpu-0.bin", "size": 10, "sha256": "c"}]})");
}

// Found by the snapshot_manifest fuzz target, or guarded because of it: a
// hostile manifest gets one error, never undefined behaviour, a read
// outside the snapshot directory or a page size the restore cannot use.
TEST(ParseSnapshotManifestTest, RefusesWhatTheReaderCannotTrust) {
  ASSERT_TRUE(ParseSnapshotManifest(SmallManifest().dump()).has_value());
  struct Case {
    const char* what;
    std::function<void(nlohmann::json&)> edit;
    const char* error;
  };
  const std::vector<Case> cases = {
      {"float accelerator", [](auto& m) { m["accelerator"] = 7.7e111; }, "not an unsigned"},
      {"negative size", [](auto& m) { m["blocks"][0]["size"] = -4096; }, "not an unsigned"},
      {"float version", [](auto& m) { m["version"] = 1.5; }, "not an unsigned"},
      {"page size 0", [](auto& m) { m["blocks"][0]["page_size"] = 0; }, "page size 0"},
      {"page size 8192", [](auto& m) { m["blocks"][0]["page_size"] = 8192; }, "page size 8192"},
      {"block file ../x", [](auto& m) { m["blocks"][0]["file"] = "../x"; }, "not a file of"},
      {"vcpu file /etc", [](auto& m) { m["vcpus"][0]["file"] = "/etc/passwd"; }, "not a file of"},
      {"huge chunk", [](auto& m) { m["chunk"] = 1ull << 40; }, "bad chunk size"},
      {"size overflow",
       [](auto& m) {
         m["blocks"][0]["size"] = 0xfffffffffffff000ull;
         m["chunk"] = 4096;
       },
       "chunk checksums"},
  };
  for (const Case& c : cases) {
    nlohmann::json m = SmallManifest();
    c.edit(m);
    auto parsed = ParseSnapshotManifest(m.dump());
    ASSERT_FALSE(parsed.has_value()) << c.what;
    EXPECT_THAT(parsed.error().ToString(), ::testing::HasSubstr(c.error)) << c.what;
  }
  EXPECT_FALSE(ParseSnapshotManifest("{\"version\": 1e999}").has_value());
}

}  // namespace
}  // namespace faultline::migration
