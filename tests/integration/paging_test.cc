// Demand paging on the real /dev/kvm with the test guest. VM A boots, fills
// its memory and starts rewriting pages at random; it is paused and its
// vCPU state and RAM become the source. VM B starts from that state with
// none (or part) of its memory present: every other page it touches comes
// from the source through the installer under test, and the guest's final
// verify checks every page against its ledger.
#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iostream>
#include <optional>
#include <random>
#include <string>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "guest/abi.h"
#include "src/paging/fault_injecting_page_source.h"
#include "src/paging/guest_pager.h"
#include "src/paging/snapshot_page_source.h"
#include "src/sys/mapping.h"
#include "src/vmm/vm.h"
#include "tests/integration/huge_pages.h"
#include "tests/integration/test_accel.h"

namespace faultline::paging {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;

constexpr char kWorkload[] = "workload=fill,random,verify until_command=1 quiet=1";

// The small snapshot's guest skips two pages of vCPU 0's region: both vCPUs
// read the first (probe=, zeros) in their random phase, so that both fault
// on it; nobody touches the second (the lost page of the poison tests).
// The small snapshot's size (128 MiB on the software CPU: kProbe must stay
// in vCPU 0's half).
uint64_t SmallMem() { return itest::Mem(256ull << 20, 128ull << 20); }
constexpr Gpa kProbe{32ull << 20};
constexpr Gpa kUntouched{kProbe.value + kPageSize};

using ::faultline::integration::HugePages;

// Reserves the huge pages a hugetlb VM of `mem` needs; nullopt and a reason
// if the machine cannot give them.
std::optional<std::string> ReserveHugePages(std::optional<HugePages>& huge, uint64_t mem) {
  const uint64_t need = mem / kHugePageSize;
  huge.emplace(need);
  const uint64_t free = HugePages::Free();
  if (free < need) {
    return fmt::format(
        "hugetlb: {} free 2 MiB huge pages after raising /proc/sys/vm/nr_hugepages by {}, need "
        "{} (run as root on a machine with {} MiB of unfragmented memory)",
        free, need, need, mem >> 20);
  }
  return std::nullopt;
}

// VM A's state at the pause: what VM B continues from.
struct Snapshot {
  uint64_t mem = 0;
  uint32_t vcpus = 0;
  std::vector<hv::VcpuState> states;
  std::shared_ptr<sys::Mapping> ram;  // VM A's RAM at the pause
  GuestReport report;                 // VM A's, at the pause

  // A fresh source over the snapshot (its own fetch counts), block id 0.
  std::shared_ptr<SnapshotPageSource> Source(std::chrono::nanoseconds delay = {},
                                             uint32_t threads = 1) const {
    auto source = std::make_shared<SnapshotPageSource>(
        SnapshotPageSource::Options{.delay = delay, .delay_threads = threads});
    source->AddMemory("ram0", {ram->data(), mem}, ram);
    return source;
  }
};

// Boots VM A, lets every vCPU finish its fill and start its random phase,
// pauses it and takes the snapshot.
Snapshot TakeSnapshot(uint64_t mem, uint32_t vcpus, std::string extra_args = "") {
  Snapshot snap;
  snap.mem = mem;
  snap.vcpus = vcpus;
  std::atomic<uint32_t> filled{0};
  vmm::VmConfig config;
  config.accel = itest::TestAccelChoice();
  config.mem_size = mem;
  config.vcpus = vcpus;
  config.guest_args = std::string(kWorkload) + extra_args;
  // On huge pages if the machine has them: KVM then maps VM A's memory
  // 2 MiB at a time, and its fill takes a fraction of the time. Where the
  // snapshot comes from does not matter to VM B.
  std::optional<HugePages> huge;
  if (!ReserveHugePages(huge, mem)) {
    config.backing = Backing::kHugetlb;
  } else {
    huge.reset();
  }
  config.on_event = [&](const GuestEvent& e) {
    if (e.kind == GuestEvent::Kind::kPhase && e.phase->phase == FL_PHASE_FILL) ++filled;
  };
  auto vm = vmm::Vm::Create(config);
  EXPECT_TRUE(vm.has_value()) << vm.error().ToString();
  if (!vm.has_value()) return snap;
  EXPECT_TRUE((*vm)->Start().ok());
  for (int i = 0; i < 6000 && filled.load() < vcpus; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_EQ(filled.load(), vcpus) << "VM A did not finish its fill";
  std::this_thread::sleep_for(100ms);  // well into the random phase
  (*vm)->Pause();
  auto states = (*vm)->SaveVcpus();
  EXPECT_TRUE(states.has_value()) << states.error().ToString();
  if (states.has_value()) snap.states = *states;
  snap.report = (*vm)->report();
  auto ram = sys::Mapping::Anonymous(mem, "VM A snapshot");
  EXPECT_TRUE(ram.has_value());
  if (!ram.has_value()) return snap;
  std::memcpy(ram->data(), (*vm)->ram().data(), mem);
  snap.ram = std::make_shared<sys::Mapping>(std::move(*ram));
  (*vm)->Stop();
  return snap;
}

Snapshot TakeSmallSnapshot() {
  return TakeSnapshot(SmallMem(), 2,
                      fmt::format(" skip={:#x}:{:#x} probe={:#x} probe_gen=0", kProbe.value,
                                  2 * kPageSize, kProbe.value));
}

struct RunOptions {
  GuestPagingOptions paging;
  // Block pages (in the block's page size) VM B has before paging starts,
  // copied from the snapshot.
  PresentMap present;
  bool enable_mce = false;
  // Read through the VMM (GuestMemory, so through the pager) once the guest
  // has ended; by default the first poisoned page, if any.
  std::optional<Gpa> vmm_read;
};

struct RunResult {
  Result<GuestReport> report = Error("not run");
  PagingStats stats;
  uint64_t unit = 0;  // VM B's RAM page size
  std::vector<GuestMemoryError> errors;
  std::vector<PoisonedUnit> poisoned;  // after the VMM's read
  std::optional<Status> vmm_read;      // the VMM's read, if one was made
};

// VM B: `backing`, only `options.present` present, paged by `installer`
// from `source`.
RunResult RunPaged(const Snapshot& snap, Backing backing, InstallerKind installer,
                   std::shared_ptr<PageSource> source, RunOptions options = {}) {
  RunResult out;
  vmm::VmConfig config;
  config.accel = itest::TestAccelChoice();
  config.mem_size = snap.mem;
  config.vcpus = snap.vcpus;
  config.backing = backing;
  config.boot = false;
  auto vm = vmm::Vm::Create(config);
  if (!vm.has_value()) {
    out.report = vm.error();
    return out;
  }
  const RamBlock& block = *(*vm)->ram_block();
  out.unit = block.page_size();
  // What pre-copy would have delivered: into the page cache (the alias) for
  // memfd and hugetlb, into the mapping itself otherwise.
  uint8_t* dest = block.alias() != nullptr ? block.alias() : block.host();
  for (const PageRun& run : options.present.runs()) {
    std::memcpy(dest + run.first * out.unit, snap.ram->data() + run.first * out.unit,
                run.count * out.unit);
  }
  options.paging.installer = installer;
  auto pager = GuestPager::Create((*vm)->memory(), source,
                                  {{(*vm)->ram_block(), 0, options.present}}, options.paging);
  if (!pager.has_value()) {
    out.report = pager.error();
    return out;
  }
  (*vm)->AttachPager(pager->get());
  Status s = (*vm)->LoadVcpus(snap.states);
  for (uint32_t i = 0; s.ok() && i < snap.vcpus; ++i) {
    s = (*pager)->PrepareVcpu((*vm)->vcpus().vcpu(i));
    if (s.ok() && options.enable_mce) {
      auto state = (*vm)->vcpus().vcpu(i).GetState();
      if (!state.has_value()) {
        s = state.error();
        break;
      }
      state->cr4 |= 1u << 6;  // as a guest OS that handles machine checks would
      s = (*vm)->vcpus().vcpu(i).SetState(*state);
    }
  }
  if (s.ok()) s = (*pager)->Start();
  if (s.ok()) s = (*vm)->Start();
  if (!s.ok()) {
    (*vm)->Stop();
    (*vm)->AttachPager(nullptr);
    out.report = s;
    return out;
  }
  std::this_thread::sleep_for(300ms);
  (*vm)->SetGuestCommand(FL_CMD_STOP);
  out.report = (*vm)->Wait(240s);
  out.stats = (*pager)->stats();
  out.errors = (*pager)->memory_errors();
  std::optional<Gpa> read = options.vmm_read;
  if (!read) {
    std::vector<PoisonedUnit> poisoned = (*pager)->poisoned();
    if (!poisoned.empty()) read = Gpa(poisoned[0].offset);
  }
  if (read) {
    uint64_t word = 0;
    out.vmm_read = (*vm)->ReadGuest(*read, {reinterpret_cast<uint8_t*>(&word), 8});
  }
  out.poisoned = (*pager)->poisoned();
  (*vm)->Stop();
  (*vm)->AttachPager(nullptr);
  return out;
}

struct Combo {
  InstallerKind installer;
  Backing backing;
};
void PrintTo(const Combo& c, std::ostream* os) {
  *os << InstallerName(c.installer) << " on " << BackingName(c.backing);
}

// Every installer on every backing it supports.
std::vector<Combo> Combos() {
  return {
      {InstallerKind::kCopy, Backing::kAnonymous}, {InstallerKind::kCopy, Backing::kMemfd},
      {InstallerKind::kCopy, Backing::kHugetlb},   {InstallerKind::kMove, Backing::kAnonymous},
      {InstallerKind::kContinue, Backing::kMemfd}, {InstallerKind::kContinue, Backing::kHugetlb},
      {InstallerKind::kHole, Backing::kAnonymous}, {InstallerKind::kHole, Backing::kMemfd},
      {InstallerKind::kHole, Backing::kHugetlb},   {InstallerKind::kHole, Backing::kGuestMemfd}};
}
std::string ComboName(const ::testing::TestParamInfo<Combo>& info) {
  return std::string(InstallerName(info.param.installer)) + "_" + BackingName(info.param.backing);
}

// Each suite takes its snapshot in the first test's SetUp, after the checks
// that may skip it: a skipped test boots no VM.
class PagedVmTest : public ::testing::TestWithParam<Combo> {
 protected:
  void SetUp() override {
    if (GetParam().backing == Backing::kGuestMemfd) FAULTLINE_SKIP_UNLESS_GUEST_MEMFD();
    if (snapshot_ == nullptr) {
      snapshot_ = new Snapshot(TakeSnapshot(itest::Mem(1ull << 30, 128ull << 20), 2));
    }
  }
  static void TearDownTestSuite() {
    delete snapshot_;
    snapshot_ = nullptr;
  }
  static Snapshot* snapshot_;
};
Snapshot* PagedVmTest::snapshot_ = nullptr;

// Acceptance: 2 vCPUs, 1 GiB (128 MiB on the software CPU), nothing present; every page from the
// source, once, through the installer; the guest verifies every page.
TEST_P(PagedVmTest, GuestVerifiesEveryPageFromTheSource) {
  const Combo c = GetParam();
  if (c.backing == Backing::kGuestMemfd) FAULTLINE_SKIP_UNLESS_GUEST_MEMFD();
  std::optional<HugePages> huge;
  if (c.backing == Backing::kHugetlb) {
    if (auto why = ReserveHugePages(huge, snapshot_->mem)) GTEST_SKIP() << *why;
  }
  ASSERT_FALSE(snapshot_->states.empty());
  auto source = snapshot_->Source();
  RunResult r = RunPaged(*snapshot_, c.backing, c.installer, source);
  ASSERT_TRUE(r.report.has_value()) << r.report.error().ToString();
  SCOPED_TRACE(r.stats.ToString());
  EXPECT_TRUE(r.report->success());
  EXPECT_EQ(r.report->bad_page_count(), 0u);
  for (uint32_t i = 0; i < 2; ++i) {
    EXPECT_EQ(r.report->vcpus[i].pages_verified, snapshot_->report.vcpus[i].pages) << "vcpu " << i;
  }
  // The backing is what was asked for: 2 MiB pages on hugetlb.
  EXPECT_EQ(r.unit, c.backing == Backing::kHugetlb ? kHugePageSize : kPageSize);
  // Both vCPUs faulted; every page the guest used came from the source,
  // none twice, and went in through the installer, in its units.
  ASSERT_GE(r.stats.vcpu_faults.size(), 2u);
  EXPECT_GT(r.stats.vcpu_faults[0], 0u);
  EXPECT_GT(r.stats.vcpu_faults[1], 0u);
  EXPECT_GT(source->bytes_served(), snapshot_->mem * 9 / 10);
  EXPECT_EQ(source->refetched_pages(0), 0u);
  EXPECT_GT(r.stats.bytes_installed, snapshot_->mem * 9 / 10);
  const uint64_t install_unit =
      c.installer == InstallerKind::kHole ? GuestPagingOptions{}.hole_chunk : r.unit;
  EXPECT_EQ(r.stats.bytes_installed, r.stats.units_installed * install_unit);
  EXPECT_EQ(r.stats.zero_installs, 0u);
  EXPECT_EQ(r.stats.bytes_copied_per_page(), c.installer == InstallerKind::kCopy ? 4096.0 : 0.0);
  EXPECT_EQ(r.stats.poisoned, 0u);
  EXPECT_EQ(r.stats.errors, 0u);
}

INSTANTIATE_TEST_SUITE_P(Installers, PagedVmTest, ::testing::ValuesIn(Combos()), ComboName);

// Tests on the small snapshot (see kProbe).
class SmallPagedVmTest : public ::testing::Test {
 protected:
  static void TearDownTestSuite() {
    delete snapshot_;
    snapshot_ = nullptr;
  }
  void SetUp() override {
    if (snapshot_ == nullptr) snapshot_ = new Snapshot(TakeSmallSnapshot());
    ASSERT_FALSE(snapshot_->states.empty());
    const GuestVcpuReport& v0 = snapshot_->report.vcpus[0];
    ASSERT_TRUE(kProbe >= v0.first_page && kUntouched < v0.region_end)
        << "the skip window must lie in vCPU 0's workload pages";
  }
  static Snapshot* snapshot_;
};
Snapshot* SmallPagedVmTest::snapshot_ = nullptr;

class PresentMapVmTest : public SmallPagedVmTest, public ::testing::WithParamInterface<Combo> {
 protected:
  void SetUp() override {
    if (GetParam().backing == Backing::kGuestMemfd) FAULTLINE_SKIP_UNLESS_GUEST_MEMFD();
    SmallPagedVmTest::SetUp();
  }
};

// About half of `units` in runs of 1..max_run units, alternating present
// and missing; the same for a given seed.
PresentMap HalfPresent(uint64_t units, uint64_t max_run, uint64_t scale, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<PageRun> runs;
  bool present = rng() % 2 == 0;
  for (uint64_t u = 0; u < units;) {
    const uint64_t n = std::min<uint64_t>(1 + rng() % max_run, units - u);
    if (present) runs.push_back({u * scale, n * scale});
    present = !present;
    u += n;
  }
  return *PresentMap::FromRuns(std::move(runs));
}

// Acceptance: with half of the pages present beforehand (sparse runs),
// those pages cause no fault and no fetch; the rest come from the source.
TEST_P(PresentMapVmTest, PresentPagesNeverFault) {
  const Combo c = GetParam();
  if (c.backing == Backing::kGuestMemfd) FAULTLINE_SKIP_UNLESS_GUEST_MEMFD();
  std::optional<HugePages> huge;
  if (c.backing == Backing::kHugetlb) {
    if (auto why = ReserveHugePages(huge, snapshot_->mem)) GTEST_SKIP() << *why;
  }
  // The hole installer maps whole chunks: runs of whole chunks for it (a
  // page present in a chunk that is not is still behind the chunk's hole).
  const uint64_t block_page = c.backing == Backing::kHugetlb ? kHugePageSize : kPageSize;
  const uint64_t run_unit =
      c.installer == InstallerKind::kHole ? GuestPagingOptions{}.hole_chunk : block_page;
  const uint64_t max_run = run_unit == kPageSize ? 64 : 4;
  RunOptions options;
  options.present = HalfPresent(snapshot_->mem / run_unit, max_run, run_unit / block_page,
                                42 + static_cast<uint32_t>(c.backing));
  const uint64_t pages = snapshot_->mem / block_page;
  ASSERT_GT(options.present.present_pages(), pages * 2 / 5);
  ASSERT_LT(options.present.present_pages(), pages * 3 / 5);
  auto source = snapshot_->Source();
  RunResult r = RunPaged(*snapshot_, c.backing, c.installer, source, options);
  ASSERT_TRUE(r.report.has_value()) << r.report.error().ToString();
  SCOPED_TRACE(r.stats.ToString());
  EXPECT_TRUE(r.report->success());
  EXPECT_EQ(r.report->bad_page_count(), 0u);
  EXPECT_GT(r.stats.faults, 0u);
  EXPECT_EQ(r.stats.faults_on_present, 0u);
  uint64_t fetched_present = 0, missing_not_fetched = 0;
  for (uint64_t p = 0; p < snapshot_->mem / kPageSize; ++p) {
    const bool present = options.present.Contains(p * kPageSize / block_page);
    const uint32_t fetched = source->fetch_count(0, p);
    fetched_present += present && fetched != 0;
    missing_not_fetched += !present && fetched == 0;
  }
  EXPECT_EQ(fetched_present, 0u);
  // The guest verifies every page of its regions: only a few pages below
  // them (unused image and boot memory) may stay missing.
  EXPECT_LT(missing_not_fetched, (2ull << 20) / kPageSize);
  EXPECT_EQ(source->refetched_pages(0), 0u);
  EXPECT_EQ(r.stats.errors, 0u);
}

INSTANTIATE_TEST_SUITE_P(Installers, PresentMapVmTest, ::testing::ValuesIn(Combos()), ComboName);

// Both vCPUs resume at once and fault on the same pages: the guest's code,
// page tables and data below 2 MiB, and the probe page both read. Everything
// else is present, and the source is slow, so that the second vCPU's fault
// finds the first one's fetch under way. Each page is still fetched once.
TEST_F(SmallPagedVmTest, SharedPagesAreFetchedOnce) {
  for (auto [installer, backing] : {std::pair{InstallerKind::kMove, Backing::kAnonymous},
                                    std::pair{InstallerKind::kContinue, Backing::kMemfd},
                                    std::pair{InstallerKind::kHole, itest::HoleBacking()}}) {
    SCOPED_TRACE(InstallerName(installer));
    // Missing: [0, 2 MiB) and the probe's page (the hole installer: its
    // 2 MiB chunk); the rest present.
    const uint64_t probe_unit = installer == InstallerKind::kHole ? 2ull << 20 : kPageSize;
    const uint64_t probe_first = AlignDown(kProbe.value, probe_unit) / kPageSize;
    const uint64_t low = (2ull << 20) / kPageSize;
    RunOptions options;
    options.present = *PresentMap::FromRuns(
        {{low, probe_first - low},
         {probe_first + probe_unit / kPageSize,
          snapshot_->mem / kPageSize - probe_first - probe_unit / kPageSize}});
    // The hole route has one page both vCPUs fault on, after starting: a
    // longer window, so that a late thread start still meets the fetch.
    auto source = snapshot_->Source(installer == InstallerKind::kHole ? 100ms : 20ms, 4);
    RunResult r = RunPaged(*snapshot_, backing, installer, source, options);
    ASSERT_TRUE(r.report.has_value()) << r.report.error().ToString();
    SCOPED_TRACE(r.stats.ToString());
    EXPECT_TRUE(r.report->success());
    EXPECT_EQ(r.report->bad_page_count(), 0u);
    for (uint32_t i = 0; i < 2; ++i) {
      uint64_t probes = 0;
      for (const GuestPhase& p : r.report->vcpus[i].phases) probes += p.probe_ram;
      EXPECT_GT(probes, 0u) << "vcpu " << i << " never read the probe page";
    }
    ASSERT_GE(r.stats.vcpu_faults.size(), 2u);
    EXPECT_GT(r.stats.vcpu_faults[0], 0u);
    EXPECT_GT(r.stats.vcpu_faults[1], 0u);
    EXPECT_GT(r.stats.faults_joined, 0u) << "the vCPUs never waited on the same fetch";
    EXPECT_EQ(source->fetch_count(0, kProbe.value / kPageSize), 1u);
    EXPECT_EQ(source->refetched_pages(0), 0u);
    EXPECT_EQ(r.stats.errors, 0u);
  }
}

// A page the source cannot supply, touched by the guest: the VM stops with
// an error naming its guest-physical address, the process carries on, and
// the VMM's own read of the page is refused rather than faulting.
TEST_F(SmallPagedVmTest, TouchedLostPageStopsTheVmWithItsGpa) {
  const Gpa lost = snapshot_->report.vcpus[1].first_page + 100 * kPageSize;
  for (auto [installer, backing] : {std::pair{InstallerKind::kMove, Backing::kAnonymous},
                                    std::pair{InstallerKind::kCopy, Backing::kMemfd},
                                    std::pair{InstallerKind::kContinue, Backing::kMemfd},
                                    std::pair{InstallerKind::kHole, itest::HoleBacking()}}) {
    SCOPED_TRACE(InstallerName(installer));
    auto faulty = std::make_shared<FaultInjectingPageSource>(snapshot_->Source());
    faulty->MakeUnavailable(0, lost.value, kPageSize);
    RunResult r = RunPaged(*snapshot_, backing, installer, faulty);
    ASSERT_FALSE(r.report.has_value()) << "the guest should not have finished";
    EXPECT_THAT(r.report.error().ToString(), HasSubstr("poisoned"));
    ASSERT_EQ(r.errors.size(), 1u);
    // The hole route loses the whole chunk around the page; the others
    // exactly the page.
    const uint64_t unit = installer == InstallerKind::kHole ? 2ull << 20 : kPageSize;
    EXPECT_EQ(AlignDown(r.errors[0].gpa.value, unit), AlignDown(lost.value, unit));
    EXPECT_EQ(r.errors[0].vcpu, 1u);
    EXPECT_THAT(r.report.error().ToString(),
                HasSubstr(fmt::format("guest-physical {:#x}", r.errors[0].gpa.value)));
    EXPECT_FALSE(r.errors[0].mce_injected);
    ASSERT_EQ(r.poisoned.size(), 1u);
    EXPECT_EQ(r.poisoned[0].offset, AlignDown(lost.value, unit));
    ASSERT_TRUE(r.vmm_read.has_value());
    EXPECT_THAT(r.vmm_read->ToString(), HasSubstr("poisoned"));
  }
}

// The same with machine checks enabled in the guest: KVM injects a #MC,
// which the test guest reports as a CPU exception (vector 18).
class SmallPagedMceTest : public SmallPagedVmTest {
 protected:
  void SetUp() override {
    // On the software CPU the policy stops the VM naming the page instead
    // (SmallPagedVmTest.TouchedLostPageStopsTheVmWithItsGpa).
    FAULTLINE_SKIP_UNLESS_KVM("#MC injection");
    SmallPagedVmTest::SetUp();
  }
};

TEST_F(SmallPagedMceTest, LostPageBecomesAMachineCheckWhenTheGuestTakesThem) {
  const Gpa lost = snapshot_->report.vcpus[1].first_page + 7 * kPageSize;
  auto faulty = std::make_shared<FaultInjectingPageSource>(snapshot_->Source());
  faulty->MakeUnavailable(0, lost.value, kPageSize);
  RunOptions options;
  options.enable_mce = true;
  RunResult r = RunPaged(*snapshot_, Backing::kAnonymous, InstallerKind::kMove, faulty, options);
  ASSERT_EQ(r.errors.size(), 1u) << (r.report ? "" : r.report.error().ToString());
  EXPECT_EQ(AlignDown(r.errors[0].gpa.value, kPageSize), lost.value);
  EXPECT_TRUE(r.errors[0].mce_injected);
  ASSERT_TRUE(r.report.has_value()) << r.report.error().ToString();
  ASSERT_TRUE(r.report->vcpus[1].panic.has_value());
  EXPECT_THAT(*r.report->vcpus[1].panic, HasSubstr("CPU exception 18"));
}

// A lost page the guest never touches (in its skip window): the guest
// verifies every other page, and only the VMM's own read of the lost one,
// which fetches it, fails.
TEST_F(SmallPagedVmTest, EveryOtherPageIsRight) {
  for (auto [installer, backing] : {std::pair{InstallerKind::kMove, Backing::kAnonymous},
                                    std::pair{InstallerKind::kContinue, Backing::kMemfd}}) {
    SCOPED_TRACE(InstallerName(installer));
    auto faulty = std::make_shared<FaultInjectingPageSource>(snapshot_->Source());
    faulty->MakeUnavailable(0, kUntouched.value, kPageSize);
    RunOptions options;
    options.vmm_read = kUntouched;
    RunResult r = RunPaged(*snapshot_, backing, installer, faulty, options);
    ASSERT_TRUE(r.report.has_value()) << r.report.error().ToString();
    EXPECT_TRUE(r.report->success());
    EXPECT_EQ(r.report->bad_page_count(), 0u);
    EXPECT_TRUE(r.errors.empty()) << "no vCPU touched it";
    ASSERT_TRUE(r.vmm_read.has_value());
    EXPECT_THAT(r.vmm_read->ToString(), HasSubstr("poisoned"));
    ASSERT_EQ(r.poisoned.size(), 1u) << "the VMM's read fetched it";
    EXPECT_EQ(r.poisoned[0].offset, kUntouched.value);
    EXPECT_EQ(faulty->injected_unavailable(), 1u);
  }
}

// Installers that cannot page a backing say so, and what to use instead,
// before anything is registered or punched.
TEST(PagedVmErrorsTest, UnsupportedCombinationsAreRefused) {
  struct Case {
    InstallerKind installer;
    Backing backing;
    const char* says;
  };
  for (Case c : {Case{InstallerKind::kMove, Backing::kMemfd, "use continue"},
                 Case{InstallerKind::kMove, Backing::kHugetlb, "use continue"},
                 Case{InstallerKind::kContinue, Backing::kAnonymous, "use move"},
                 Case{InstallerKind::kCopy, Backing::kGuestMemfd, "--installer hole"},
                 Case{InstallerKind::kMove, Backing::kGuestMemfd, "--installer hole"},
                 Case{InstallerKind::kContinue, Backing::kGuestMemfd, "--installer hole"},
                 Case{InstallerKind::kZero, Backing::kGuestMemfd, "--installer hole"}}) {
    SCOPED_TRACE(fmt::format("{} on {}", InstallerName(c.installer), BackingName(c.backing)));
    if (c.backing == Backing::kGuestMemfd && !itest::GuestMemfdUsable()) {
      std::cout << "skipped: " << *itest::NoGuestMemfdReason() << "\n";
      continue;
    }
    std::optional<HugePages> huge;
    if (c.backing == Backing::kHugetlb) {
      if (auto why = ReserveHugePages(huge, 64ull << 20)) {
        std::cout << "skipped: " << *why << "\n";
        continue;
      }
    }
    vmm::VmConfig config;
    config.accel = itest::TestAccelChoice();
    config.mem_size = 64ull << 20;
    config.backing = c.backing;
    config.boot = false;
    auto vm = vmm::Vm::Create(config);
    ASSERT_TRUE(vm.has_value()) << vm.error().ToString();
    const uint64_t slots_before = (*vm)->memory().memslots().size();
    GuestPagingOptions options;
    options.installer = c.installer;
    auto pager = GuestPager::Create((*vm)->memory(), std::make_shared<SnapshotPageSource>(),
                                    {{(*vm)->ram_block(), 0, PresentMap()}}, options);
    ASSERT_FALSE(pager.has_value());
    EXPECT_THAT(pager.error().ToString(), HasSubstr(c.says));
    EXPECT_THAT(pager.error().ToString(), HasSubstr(BackingName(c.backing)));
    EXPECT_EQ((*vm)->memory().memslots().size(), slots_before);
  }
}

}  // namespace
}  // namespace faultline::paging
