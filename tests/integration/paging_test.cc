// Demand paging on the real /dev/kvm with the test guest. VM A boots, fills
// its memory and starts rewriting pages at random; it is paused and its
// vCPU state and RAM become the source. VM B starts from that state with no
// memory present at all: every page it touches comes from the source
// through the installer under test, and the guest's final verify checks
// every page against its ledger.
#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <optional>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "guest/abi.h"
#include "src/paging/fault_injecting_page_source.h"
#include "src/paging/guest_pager.h"
#include "src/paging/snapshot_page_source.h"
#include "src/paging/vm_paging.h"
#include "src/sys/mapping.h"
#include "src/vmm/vm.h"

namespace faultline::paging {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;

constexpr char kWorkload[] = "workload=fill,random,verify until_command=1 quiet=1";

class HugePages {
 public:
  explicit HugePages(uint64_t extra) : before_(Read()) { Write(before_ + extra); }
  ~HugePages() { Write(before_); }
  static uint64_t Read() {
    std::ifstream in("/proc/sys/vm/nr_hugepages");
    uint64_t n = 0;
    in >> n;
    return n;
  }

 private:
  static void Write(uint64_t n) { std::ofstream("/proc/sys/vm/nr_hugepages") << n; }
  uint64_t before_;
};

// VM A's state at the pause: what VM B continues from.
struct Snapshot {
  uint64_t mem = 0;
  uint32_t vcpus = 0;
  std::vector<vmm::VcpuState> states;
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
  config.mem_size = mem;
  config.vcpus = vcpus;
  config.guest_args = std::string(kWorkload) + extra_args;
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

struct RunResult {
  Result<GuestReport> report = Error("not run");
  PagingStats stats;
  std::vector<GuestMemoryError> errors;
  std::vector<PoisonedUnit> poisoned;
  Status read_poisoned;  // the VMM's own read of the first poisoned page
};

// VM B: `backing`, nothing present, paged by `installer` from `source`.
RunResult RunPaged(const Snapshot& snap, Backing backing, InstallerKind installer,
                   std::shared_ptr<PageSource> source, GuestPagingOptions options = {},
                   bool enable_mce = false) {
  RunResult out;
  vmm::VmConfig config;
  config.mem_size = snap.mem;
  config.vcpus = snap.vcpus;
  config.backing = backing;
  config.boot = false;
  auto vm = vmm::Vm::Create(config);
  if (!vm.has_value()) {
    out.report = vm.error();
    return out;
  }
  options.installer = installer;
  auto pager =
      GuestPager::Create((*vm)->memory(), source, {{(*vm)->ram_block(), 0, PresentMap()}}, options);
  if (!pager.has_value()) {
    out.report = pager.error();
    return out;
  }
  AttachToVm(**pager, **vm);
  Status s = (*vm)->LoadVcpus(snap.states);
  for (uint32_t i = 0; s.ok() && i < snap.vcpus; ++i) {
    s = (*pager)->PrepareVcpu((*vm)->vcpus().vcpu(i));
    if (s.ok() && enable_mce) {
      auto sregs = (*vm)->vcpus().vcpu(i).GetSregs();
      sregs->cr4 |= 1u << 6;  // as a guest OS that handles machine checks would
      s = (*vm)->vcpus().vcpu(i).SetSregs(*sregs);
    }
  }
  if (s.ok()) s = (*pager)->Start();
  if (s.ok()) s = (*vm)->Start();
  if (!s.ok()) {
    out.report = s;
    return out;
  }
  std::this_thread::sleep_for(300ms);
  (*vm)->SetGuestCommand(FL_CMD_STOP);
  out.report = (*vm)->Wait(240s);
  out.stats = (*pager)->stats();
  out.errors = (*pager)->memory_errors();
  out.poisoned = (*pager)->poisoned();
  if (!out.poisoned.empty()) {
    uint64_t word = 0;
    out.read_poisoned =
        (*vm)->ReadGuest(Gpa(out.poisoned[0].offset), {reinterpret_cast<uint8_t*>(&word), 8});
  }
  (*vm)->Stop();
  DetachFromVm(**vm);
  return out;
}

struct Combo {
  InstallerKind installer;
  Backing backing;
};
void PrintTo(const Combo& c, std::ostream* os) {
  *os << InstallerName(c.installer) << " on " << BackingName(c.backing);
}

class PagedVmTest : public ::testing::TestWithParam<Combo> {
 protected:
  static void SetUpTestSuite() { snapshot_ = new Snapshot(TakeSnapshot(1ull << 30, 2)); }
  static void TearDownTestSuite() {
    delete snapshot_;
    snapshot_ = nullptr;
  }
  static Snapshot* snapshot_;
};
Snapshot* PagedVmTest::snapshot_ = nullptr;

// Acceptance: 2 vCPUs, 1 GiB, nothing present; every page from the source,
// once; the guest verifies every page.
TEST_P(PagedVmTest, GuestVerifiesEveryPageFromTheSource) {
  const Combo c = GetParam();
  std::optional<HugePages> huge;
  if (c.backing == Backing::kHugetlb) huge.emplace(520);
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
  // Both vCPUs faulted; every page the guest used came from the source,
  // none twice.
  ASSERT_GE(r.stats.vcpu_faults.size(), 2u);
  EXPECT_GT(r.stats.vcpu_faults[0], 0u);
  EXPECT_GT(r.stats.vcpu_faults[1], 0u);
  EXPECT_GT(source->bytes_served(), snapshot_->mem * 9 / 10);
  EXPECT_EQ(source->refetched_pages(0), 0u);
  EXPECT_EQ(r.stats.poisoned, 0u);
  EXPECT_EQ(r.stats.errors, 0u);
}

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
INSTANTIATE_TEST_SUITE_P(Installers, PagedVmTest, ::testing::ValuesIn(Combos()), ComboName);

// Both vCPUs resume at once and fault on the same pages (the code they run,
// their shared data); with a slow source they wait on the same fetches.
// Each page is still fetched exactly once.
TEST(PagedVmConcurrencyTest, SharedPagesAreFetchedOnce) {
  Snapshot snap = TakeSnapshot(256ull << 20, 2);
  ASSERT_FALSE(snap.states.empty());
  for (auto [installer, backing] : {std::pair{InstallerKind::kMove, Backing::kAnonymous},
                                    std::pair{InstallerKind::kHole, Backing::kGuestMemfd}}) {
    SCOPED_TRACE(InstallerName(installer));
    auto source = snap.Source(2ms, 4);
    RunResult r = RunPaged(snap, backing, installer, source);
    ASSERT_TRUE(r.report.has_value()) << r.report.error().ToString();
    EXPECT_TRUE(r.report->success()) << r.stats.ToString();
    EXPECT_GT(r.stats.faults_joined, 0u) << r.stats.ToString();
    EXPECT_EQ(source->refetched_pages(0), 0u);
  }
}

// A page the source cannot supply, touched by the guest: the VM stops with
// an error naming its guest-physical address, the process carries on, and
// the VMM's own read of the page is refused rather than faulting.
TEST(PagedVmPoisonTest, TouchedLostPageStopsTheVmWithItsGpa) {
  Snapshot snap = TakeSnapshot(256ull << 20, 2);
  ASSERT_FALSE(snap.states.empty());
  const Gpa lost = snap.report.vcpus[0].first_page + 100 * kPageSize;
  for (auto [installer, backing] : {std::pair{InstallerKind::kMove, Backing::kAnonymous},
                                    std::pair{InstallerKind::kContinue, Backing::kMemfd},
                                    std::pair{InstallerKind::kHole, Backing::kGuestMemfd}}) {
    SCOPED_TRACE(InstallerName(installer));
    auto faulty = std::make_shared<FaultInjectingPageSource>(snap.Source());
    faulty->MakeUnavailable(0, lost.value, kPageSize);
    RunResult r = RunPaged(snap, backing, installer, faulty);
    ASSERT_FALSE(r.report.has_value()) << "the guest should not have finished";
    EXPECT_THAT(r.report.error().ToString(), HasSubstr("poisoned"));
    ASSERT_EQ(r.errors.size(), 1u);
    // The hole route loses the whole chunk around the page; the others
    // exactly the page.
    const uint64_t unit = installer == InstallerKind::kHole ? 2ull << 20 : kPageSize;
    EXPECT_EQ(AlignDown(r.errors[0].gpa.value, unit), AlignDown(lost.value, unit));
    EXPECT_THAT(r.report.error().ToString(),
                HasSubstr(fmt::format("guest-physical {:#x}", r.errors[0].gpa.value)));
    EXPECT_FALSE(r.errors[0].mce_injected);
    ASSERT_EQ(r.poisoned.size(), 1u);
    EXPECT_THAT(r.read_poisoned.ToString(), HasSubstr("poisoned"));
  }
}

// The same with machine checks enabled in the guest: KVM injects a #MC,
// which the test guest reports as a CPU exception (vector 18).
TEST(PagedVmPoisonTest, LostPageBecomesAMachineCheckWhenTheGuestTakesThem) {
  Snapshot snap = TakeSnapshot(256ull << 20, 2);
  ASSERT_FALSE(snap.states.empty());
  const Gpa lost = snap.report.vcpus[1].first_page + 7 * kPageSize;
  auto faulty = std::make_shared<FaultInjectingPageSource>(snap.Source());
  faulty->MakeUnavailable(0, lost.value, kPageSize);
  RunResult r = RunPaged(snap, Backing::kAnonymous, InstallerKind::kMove, faulty, {},
                         /*enable_mce=*/true);
  ASSERT_EQ(r.errors.size(), 1u) << (r.report ? "" : r.report.error().ToString());
  EXPECT_EQ(AlignDown(r.errors[0].gpa.value, kPageSize), lost.value);
  EXPECT_TRUE(r.errors[0].mce_injected);
  ASSERT_TRUE(r.report.has_value()) << r.report.error().ToString();
  ASSERT_TRUE(r.report->vcpus[1].panic.has_value());
  EXPECT_THAT(*r.report->vcpus[1].panic, HasSubstr("CPU exception 18"));
}

// A lost page the guest never touches (its skip window): the guest verifies
// every other page, and only the VMM's own read of the lost one fails.
TEST(PagedVmPoisonTest, EveryOtherPageIsRight) {
  // Pick the page from a first boot's layout, then skip it in the real one.
  Snapshot probe = TakeSnapshot(256ull << 20, 2);
  ASSERT_FALSE(probe.states.empty());
  const Gpa lost = probe.report.vcpus[1].first_page + 4242 * kPageSize;
  Snapshot snap = TakeSnapshot(256ull << 20, 2, fmt::format(" skip={:#x}:4096", lost.value));
  ASSERT_FALSE(snap.states.empty());
  auto faulty = std::make_shared<FaultInjectingPageSource>(snap.Source());
  faulty->MakeUnavailable(0, lost.value, kPageSize);
  RunResult r = RunPaged(snap, Backing::kAnonymous, InstallerKind::kMove, faulty);
  ASSERT_TRUE(r.report.has_value()) << r.report.error().ToString();
  EXPECT_TRUE(r.report->success());
  EXPECT_EQ(r.report->bad_page_count(), 0u);
  ASSERT_EQ(r.poisoned.size(), 1u) << "the VMM's read fetches it";
  EXPECT_EQ(r.poisoned[0].offset, lost.value);
  EXPECT_THAT(r.read_poisoned.ToString(), HasSubstr("poisoned"));
}

}  // namespace
}  // namespace faultline::paging
