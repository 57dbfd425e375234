// Working sets: the file format, and a record-then-prefetch pair of lazy
// restores of a real snapshot (real pager, fake vCPUs that read every page).
#include "src/migration/working_set.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/migration/memory_vm.h"
#include "src/migration/memory_vm_fakes.h"

namespace faultline::migration {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

class WorkingSetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/faultline-ws-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    root_ = tmpl;
  }
  void TearDown() override { fs::remove_all(root_); }
  std::string Write(const std::string& text) {
    const std::string path = root_ + "/ws";
    std::ofstream(path) << text;
    return path;
  }
  std::string root_;
};

TEST_F(WorkingSetTest, RecordsInOrderMergingNeighboursAcrossBlocks) {
  SnapshotManifest m;
  m.blocks.resize(2);
  m.blocks[0].size = 1 << 20;
  m.blocks[1].size = 1 << 20;
  WorkingSetRecorder ws(m);
  ws.Record(1, 8192, 4096);
  ws.Record(1, 12288, 4096);  // continues the one before
  ws.Record(0, 0, 4096);
  ws.Record(1, 0, 4096);
  EXPECT_THAT(ws.ranges(), ElementsAre(MemoryRange{(1 << 20) + 8192, 8192}, MemoryRange{0, 4096},
                                       MemoryRange{1 << 20, 4096}));
  EXPECT_EQ(ws.bytes(), 16384u);

  const std::string path = root_ + "/saved";
  ASSERT_TRUE(SaveWorkingSet(path, ws.ranges()).ok());
  Result<std::vector<MemoryRange>> loaded = LoadWorkingSet(path, 2 << 20);
  ASSERT_TRUE(loaded.has_value()) << loaded.error().ToString();
  EXPECT_EQ(*loaded, ws.ranges());
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

TEST_F(WorkingSetTest, LoadRefusesWhatIsNotAWorkingSetOfThisMemory) {
  const std::string header = "# faultline working set v1\n";
  EXPECT_THAT(
      LoadWorkingSet(Write("# faultline working set v2\n0 4096\n"), 1 << 20).error().message(),
      HasSubstr("this Faultline reads"));
  EXPECT_THAT(LoadWorkingSet(Write(header + "0 4096 7\n"), 1 << 20).error().message(),
              HasSubstr("line 2"));
  EXPECT_THAT(LoadWorkingSet(Write(header + "# a comment\nten 4096\n"), 1 << 20).error().message(),
              HasSubstr("line 3"));
  EXPECT_THAT(LoadWorkingSet(Write(header + "100 4096\n"), 1 << 20).error().message(),
              HasSubstr("page-aligned"));
  EXPECT_THAT(LoadWorkingSet(Write(header + "1044480 8192\n"), 1 << 20).error().message(),
              HasSubstr("another snapshot"));
  EXPECT_THAT(LoadWorkingSet(root_ + "/none", 1 << 20).error().message(), HasSubstr("cannot open"));
  Result<std::vector<MemoryRange>> ok = LoadWorkingSet(Write(header + "\n4096 4096\n"), 1 << 20);
  ASSERT_TRUE(ok.has_value()) << ok.error().ToString();
  EXPECT_THAT(*ok, ElementsAre(MemoryRange{4096, 4096}));
  // Hand-written: no first line, hexadecimal, comments after a range.
  ok = LoadWorkingSet(Write("0x2000 0x1000  # the hot page\n  8192 4096\n"), 1 << 20);
  ASSERT_TRUE(ok.has_value()) << ok.error().ToString();
  EXPECT_THAT(*ok, ElementsAre(MemoryRange{0x2000, 0x1000}, MemoryRange{8192, 4096}));
}

// A snapshot of 8 MiB whose pages hold data except every third one, the
// fake guest reading every page in a random order after each restore.
TEST_F(WorkingSetTest, APrefetchedRestoreFaultsOnNothingTheRecordSaw) {
  constexpr uint64_t kBytes = 8ull << 20;
  testing::Memory from(Backing::kAnonymous, kBytes);
  testing::Record record;
  testing::Writer writer(from, record);
  writer.Stop();
  auto source = MakeMemorySource(
      *from.memory, std::make_unique<testing::FakeControl>(record, from.host(), from.size()));
  const std::string dir = root_ + "/snap";
  ASSERT_TRUE(WriteSnapshot(*source, dir, {.live = false, .resume = false}).has_value());
  Result<SnapshotReader> reader = SnapshotReader::Open(dir);
  ASSERT_TRUE(reader.has_value()) << reader.error().ToString();
  const uint64_t data_pages = (*reader->DataPages())[0].Count();

  // The record: demand paging only; every data page faults once.
  WorkingSetRecorder ws(reader->manifest());
  PostcopyVmOptions options;
  options.pager.on_demand_fetch = [&ws](uint32_t b, uint64_t off, uint64_t len) {
    ws.Record(b, off, len);
  };
  {
    testing::Memory to(Backing::kAnonymous, kBytes);
    testing::Record restored;
    auto vm = MakeMemoryPostcopyDestination(
        *to.memory, std::make_unique<testing::FakeControl>(restored, to.host(), kBytes), options);
    ASSERT_TRUE(StartLazyRestore(*reader, *vm).ok());
    while (!vm->paging_complete()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    EXPECT_EQ(vm->paging_stats().fetches, data_pages);
  }
  EXPECT_EQ(ws.bytes(), data_pages * kWirePageSize);

  // The prefetch brings every page in; the guest faults only on pages it
  // reached first, and no page is read twice.
  testing::Memory to(Backing::kAnonymous, kBytes);
  testing::Record restored;
  auto vm = MakeMemoryPostcopyDestination(
      *to.memory, std::make_unique<testing::FakeControl>(restored, to.host(), kBytes));
  ASSERT_TRUE(StartLazyRestore(*reader, *vm).ok());
  std::atomic<bool> stop{false};
  Result<PrefetchStats> prefetched = Prefetch(*reader, *vm, ws.ranges(), stop);
  ASSERT_TRUE(prefetched.has_value()) << prefetched.error().ToString();
  ASSERT_TRUE(vm->FetchMissing().ok());
  ASSERT_TRUE(vm->FinishPaging().ok());
  // Every data page was fetched once (claims count as fetches), most by
  // the prefetch.
  EXPECT_EQ(vm->paging_stats().fetches, data_pages);
  EXPECT_GT(prefetched->units, 0u);
  EXPECT_LE(prefetched->units, data_pages);
  EXPECT_EQ(std::memcmp(from.host(), to.host(), kBytes), 0);
}

}  // namespace
}  // namespace faultline::migration
