// GuestMemory on the real /dev/kvm with the test guest: every backing, layout
// changes racing running vCPUs, dirty tracking across layout changes.
#include "src/memory/guest_memory.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "guest/abi.h"
#include "src/vmm/vm.h"
#include "tests/integration/huge_pages.h"
#include "tests/integration/test_accel.h"

namespace faultline {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;

using ::faultline::integration::HugePages;

vmm::VmConfig Config(uint64_t mem, uint32_t vcpus, std::string args) {
  vmm::VmConfig c;
  c.accel = itest::TestAccelChoice();
  c.mem_size = mem;
  c.vcpus = vcpus;
  c.guest_args = std::move(args) + " quiet=1";
  return c;
}

std::unique_ptr<vmm::Vm> MustCreate(vmm::VmConfig config) {
  Result<std::unique_ptr<vmm::Vm>> vm = vmm::Vm::Create(std::move(config));
  EXPECT_TRUE(vm.has_value()) << vm.error().ToString();
  return vm.has_value() ? std::move(*vm) : nullptr;
}

class BackingTest : public ::testing::TestWithParam<Backing> {};

TEST_P(BackingTest, FillsAndVerifiesAllMemory) {
  if (GetParam() == Backing::kGuestMemfd) FAULTLINE_SKIP_UNLESS_GUEST_MEMFD();
  const uint64_t kMem = itest::Mem(512ull << 20, 128ull << 20);
  std::optional<HugePages> huge;
  if (GetParam() == Backing::kHugetlb) huge.emplace(kMem / kHugePageSize);
  uint64_t free_before = HugePages::Free();
  vmm::VmConfig config = Config(kMem, 2, "workload=fill,verify");
  config.backing = GetParam();
  auto vm = MustCreate(config);
  ASSERT_NE(vm, nullptr);
  ASSERT_TRUE(vm->Start().ok());
  Result<GuestReport> report = vm->Wait(240s);
  ASSERT_TRUE(report.has_value()) << report.error().ToString();
  EXPECT_TRUE(report->success());
  EXPECT_GT(report->pages_verified(), kMem / kPageSize * 98 / 100);
  if (GetParam() == Backing::kHugetlb) {
    // Every 2 MiB of guest RAM the guest touched is one huge page.
    EXPECT_GE(free_before - HugePages::Free(), kMem / kHugePageSize * 98 / 100);
    std::ifstream smaps("/proc/self/smaps");
    std::stringstream text;
    text << smaps.rdbuf();
    EXPECT_THAT(text.str(), HasSubstr("KernelPageSize:     2048 kB"));
  }
}

INSTANTIATE_TEST_SUITE_P(AllBackings, BackingTest,
                         ::testing::Values(Backing::kAnonymous, Backing::kMemfd, Backing::kHugetlb,
                                           Backing::kGuestMemfd),
                         [](const auto& info) { return std::string(BackingName(info.param)); });

// Two vCPUs write and verify memory outside a 2 MiB window and probe the
// window while the VMM punches and fills a hole there 10,000 times (3,000 on
// the software CPU, where each change re-maps every vCPU's engine).
TEST(GuestMemoryTest, HoleRaceWithRunningVcpus) {
  constexpr uint64_t kWindow = 0x6000000, kWindowSize = 2ull << 20;
  constexpr uint32_t kProbeGen = 7;
  std::atomic<int> fills_done{0};
  vmm::VmConfig config =
      Config(256ull << 20, 2,
             fmt::format("workload=fill,random,verify until_command=1 skip={:#x}:{:#x} probe={:#x} "
                         "probe_gen={}",
                         kWindow, kWindowSize, kWindow, kProbeGen));
  config.on_event = [&](const GuestEvent& e) {
    if (e.kind == GuestEvent::Kind::kPhase && e.phase->phase == FL_PHASE_FILL) ++fills_done;
  };
  auto vm = MustCreate(config);
  ASSERT_NE(vm, nullptr);
  uint64_t words[512];
  for (uint32_t i = 0; i < 512; ++i) words[i] = fl_page_word(kWindow, kProbeGen, i);
  ASSERT_TRUE(vm->WriteGuest(Gpa(kWindow), {reinterpret_cast<uint8_t*>(words), 4096}).ok());
  ASSERT_TRUE(vm->Start().ok());
  while (fills_done < 2) std::this_thread::sleep_for(10ms);

  GuestMemory& memory = vm->memory();
  const uint64_t generation = memory.map()->generation();
  const size_t slots = memory.memslots().size();
  const int changes = itest::OnKvm() ? 10000 : 3000;
  for (int i = 0; i < changes; ++i) {
    ASSERT_TRUE(memory.PunchHole(Gpa(kWindow), kWindowSize).ok());
    ASSERT_TRUE(memory.FillHole(Gpa(kWindow), kWindowSize).ok());
  }
  EXPECT_EQ(memory.map()->generation(), generation + 2 * changes);
  EXPECT_EQ(memory.memslots().size(), slots) << "the slots were not merged back";
  vm->SetGuestCommand(FL_CMD_STOP);
  Result<GuestReport> report = vm->Wait(120s);
  ASSERT_TRUE(report.has_value()) << report.error().ToString();  // no unexpected exit
  EXPECT_TRUE(report->success());
  uint64_t ram = 0, hole = 0, bad = 0;
  for (const GuestVcpuReport& v : report->vcpus) {
    for (const GuestPhase& p : v.phases) {
      ram += p.probe_ram;
      hole += p.probe_hole;
      bad += p.probe_bad;
    }
  }
  EXPECT_EQ(bad, 0u);
  EXPECT_GT(hole, 0u) << "no vCPU touched the window while it was a hole";
  EXPECT_GT(ram, 0u) << "no vCPU read the window's original data";
  // libunicorn splits an 8-byte access to MMIO into two 4-byte ones, each
  // an exit of its own; KVM exits once.
  EXPECT_EQ(vm->hole_accesses(), itest::OnKvm() ? hole : 2 * hole);
}

// The guest rewrites a known set of pages; a layout change elsewhere in the
// same block must not lose or add a dirty bit.
void DirtyBitsSurviveLayoutChange(DirtyLogMode mode) {
  constexpr uint64_t kMem = 256ull << 20, kHotPages = 100;
  constexpr uint64_t kWindow = 200ull << 20, kVmmPage = 220ull << 20;
  std::atomic<int> fills_done{0};
  vmm::VmConfig config = Config(
      kMem, 2, fmt::format("workload=fill,hotset,verify until_command=1 hot_pages={}", kHotPages));
  config.dirty_mode = mode;
  config.on_event = [&](const GuestEvent& e) {
    if (e.kind == GuestEvent::Kind::kPhase && e.phase->phase == FL_PHASE_FILL) ++fills_done;
  };
  auto vm = MustCreate(config);
  ASSERT_NE(vm, nullptr);
  ASSERT_TRUE(vm->Start().ok());
  while (fills_done < 2) std::this_thread::sleep_for(10ms);

  GuestMemory& memory = vm->memory();
  ASSERT_TRUE(memory.StartDirtyTracking().ok());
  std::this_thread::sleep_for(100ms);
  const size_t slots = memory.memslots().size();
  ASSERT_TRUE(memory.PunchHole(Gpa(kWindow), 2ull << 20).ok());
  EXPECT_EQ(memory.memslots().size(), slots + 1);
  std::this_thread::sleep_for(50ms);
  ASSERT_TRUE(memory.FillHole(Gpa(kWindow), 2ull << 20).ok());
  // The VMM's own write (same bytes back) counts as dirty too.
  std::vector<uint8_t> page(kPageSize);
  ASSERT_TRUE(vm->ReadGuest(Gpa(kVmmPage), page).ok());
  ASSERT_TRUE(vm->WriteGuest(Gpa(kVmmPage), page).ok());
  std::this_thread::sleep_for(50ms);
  vm->Pause();
  ASSERT_TRUE(memory.HarvestDirty().ok());
  DirtyBitmap dirty;
  ASSERT_TRUE(memory.TakeDirty("ram0", dirty).ok());
  GuestReport running = vm->report();
  vm->Resume();
  vm->SetGuestCommand(FL_CMD_STOP);
  Result<GuestReport> report = vm->Wait(120s);
  ASSERT_TRUE(report.has_value()) << report.error().ToString();
  EXPECT_TRUE(report->success());

  // Above 2 MiB (below is the guest's image, stacks and page tables) exactly
  // the hot pages, the ledger page that records them, and the VMM's page.
  std::set<uint64_t> expected{kVmmPage / kPageSize};
  for (const GuestVcpuReport& v : running.vcpus) {
    expected.insert(v.region_start.value / kPageSize);
    for (uint64_t i = 0; i < kHotPages; ++i) expected.insert(v.first_page.value / kPageSize + i);
  }
  std::set<uint64_t> found;
  dirty.ForEachSet([&](uint64_t page) {
    if (page >= kHugePageSize / kPageSize) found.insert(page);
  });
  EXPECT_EQ(found, expected);
}

TEST(GuestMemoryTest, DirtyBitmapSurvivesLayoutChange) {
  FAULTLINE_SKIP_UNLESS_KVM("KVM's dirty log");
  DirtyBitsSurviveLayoutChange(DirtyLogMode::kBitmap);
}

TEST(GuestMemoryTest, DirtyRingSurvivesLayoutChange) {
  FAULTLINE_SKIP_UNLESS_KVM("KVM's dirty ring");
  DirtyBitsSurviveLayoutChange(DirtyLogMode::kRing);
}

// Any accelerator: userfaultfd write-protect on the block's host memory.
TEST(GuestMemoryTest, DirtyUffdWpSurvivesLayoutChange) {
  DirtyBitsSurviveLayoutChange(DirtyLogMode::kUffdWp);
}

// Discarding guest_memfd pages makes the guest read zeros there.
TEST(GuestMemoryTest, GuestMemfdDiscardReadsZeros) {
  FAULTLINE_SKIP_UNLESS_GUEST_MEMFD();
  vmm::Vm* vm_ptr = nullptr;
  Gpa discarded;
  vmm::VmConfig config = Config(128ull << 20, 1, "workload=fill,verify");
  config.backing = Backing::kGuestMemfd;
  config.on_event = [&](const GuestEvent& e) {
    if (e.kind != GuestEvent::Kind::kPhase || e.phase->phase != FL_PHASE_FILL) return;
    discarded = vm_ptr->report().vcpus[0].first_page + 10 * kPageSize;
    ASSERT_TRUE(vm_ptr->ram_block()->Discard(discarded.value, 3 * kPageSize).ok());
  };
  auto vm = MustCreate(config);
  ASSERT_NE(vm, nullptr);
  vm_ptr = vm.get();
  ASSERT_TRUE(vm->Start().ok());
  Result<GuestReport> report = vm->Wait(120s);
  ASSERT_TRUE(report.has_value()) << report.error().ToString();
  EXPECT_EQ(report->bad_page_count(), 3u);
  ASSERT_EQ(report->bad_pages.size(), 3u);
  for (uint64_t i = 0; i < 3; ++i) {
    EXPECT_EQ(report->bad_pages[i].gpa, discarded + i * kPageSize);
    EXPECT_EQ(report->bad_pages[i].found_word, 0u);
    EXPECT_EQ(report->bad_pages[i].word_index, 0u);
  }
}

TEST(GuestMemoryTest, BadLayoutChangesLeaveEverythingUnchanged) {
  auto vm = MustCreate(Config(128ull << 20, 1, "workload=fill"));
  ASSERT_NE(vm, nullptr);
  GuestMemory& memory = vm->memory();
  auto map_before = memory.map();
  auto slots_before = memory.memslots();
  auto unchanged = [&] {
    EXPECT_EQ(memory.map(), map_before);
    EXPECT_EQ(memory.memslots(), slots_before);
  };
  RamBlockOptions options{.name = "ram1", .size = 64ull << 20};
  auto block = RamBlock::Create(options);
  ASSERT_TRUE(block.has_value());
  EXPECT_THAT(memory.Place(*block, Gpa(64ull << 20)).ToString(), HasSubstr("overlaps 'ram0'"));
  unchanged();
  EXPECT_THAT(memory.PunchHole(Gpa(1ull << 30), 4096).ToString(), HasSubstr("0x40000000"));
  unchanged();
  EXPECT_FALSE(memory.PunchHole(Gpa(0x200100), 4096).ok());
  unchanged();
  EXPECT_FALSE(memory.PunchHole(Gpa(0x200000), 100).ok());
  unchanged();
  EXPECT_FALSE(memory.FillHole(Gpa(0x200000), 4096).ok());
  unchanged();
  // A second block placed properly becomes a second slot.
  ASSERT_TRUE(memory.Place(*block, Gpa(1ull << 30)).ok());
  EXPECT_EQ(memory.memslots().size(), slots_before.size() + 4);  // 64 MiB in 16 MiB granules

  if (HugePages::Free() == 0) {
    RamBlockOptions huge{.name = "huge", .size = 64ull << 20, .backing = Backing::kHugetlb};
    Result<std::shared_ptr<RamBlock>> r = RamBlock::Create(huge);
    ASSERT_FALSE(r.has_value());
    EXPECT_THAT(r.error().ToString(), HasSubstr("nr_hugepages"));
  }
}

}  // namespace
}  // namespace faultline
