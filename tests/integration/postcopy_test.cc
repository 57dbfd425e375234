// Post-copy live migration between two reference VMs in this process over
// loopback TCP. The test guest fills its memory and then writes random pages
// (keeping its ledger) on the source; after one pre-copy pass (or none) the
// VM switches over, runs on the destination at once with its missing memory
// demand-paged over the network while the rest is pushed, and finally
// verifies every page there.
//
// Tests:
//   PostcopyInstallerTest/<installer>_<backing>_<passes>pass: every installer
//     on every backing it supports (paging_test.cc's PagedVmTest pairs),
//     chosen explicitly on the destination, 128 MiB, with one pre-copy pass
//     and without: the guest verifies every page, the installer asked for is
//     the one that paged, and pages were both demanded and pushed.
//   PostcopyRefusalTest: every other installer-backing pair is refused at the
//     source's Hello, before any page moves, naming the installer, the
//     backing and what to use instead; the source's guest runs on.
//   PostcopyTwoGiBTest/<backing>_run<k>: the acceptance, the 2 GiB
//     random-write guest with the default installer of each backing (move
//     anon, continue memfd and hugetlb, hole gmem). One run per backing by
//     default; FAULTLINE_POSTCOPY_RUNS=5 makes it the acceptance's five
//     (one ctest test per run), e.g.
//       FAULTLINE_POSTCOPY_RUNS=5 build/dev/faultline_integration_tests
//           --gtest_filter='PostcopyTwoGiBTest*'
//   PostcopyRecoveryTest: a link cut at three points of one post-copy, each
//     resumed over a new session.
//   PostcopySourceTest: an out-of-range page request is rejected and logged.
//
// The source's guest is migrated once it has filled its memory (its fill
// phase report), not after a fixed sleep.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <optional>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "guest/abi.h"
#include "src/migration/fault_transport.h"
#include "src/migration/handshake.h"
#include "src/migration/postcopy_destination.h"
#include "src/migration/postcopy_session.h"
#include "src/migration/postcopy_source.h"
#include "src/migration/socket_transport.h"
#include "src/vmm/vm.h"
#include "src/vmm/vm_adapter.h"
#include "tests/integration/huge_pages.h"
#include "tests/integration/test_accel.h"

namespace faultline::migration {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;
using paging::InstallerKind;
using paging::InstallerName;

using ::faultline::integration::HugePages;
using Clock = std::chrono::steady_clock;

double MsSince(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

constexpr uint32_t kVcpus = 2;

// Counts the vCPUs that reported the end of their fill phase.
struct FillSignal {
  std::atomic<uint32_t> filled{0};
  std::atomic<bool> ended{false};  // a vCPU finished or panicked before
};

vmm::VmConfig GuestConfig(uint64_t mem, Backing backing, FillSignal* fill = nullptr) {
  vmm::VmConfig c;
  c.accel = itest::TestAccelChoice();
  c.mem_size = mem;
  c.vcpus = kVcpus;
  c.backing = backing;
  c.guest_args = "workload=fill,random,verify until_command=1 rate=64 quiet=1";
  if (fill != nullptr) {
    c.on_event = [fill](const GuestEvent& e) {
      if (e.kind == GuestEvent::Kind::kPhase && e.phase->phase == FL_PHASE_FILL) {
        fill->filled.fetch_add(1);
      } else if (e.kind == GuestEvent::Kind::kDone || e.kind == GuestEvent::Kind::kPanic) {
        fill->ended.store(true);
      }
    };
  }
  return c;
}

// Waits for every vCPU's fill report: the guest's memory is all written and
// its random writes are under way.
Status WaitForFill(const FillSignal& fill, std::chrono::seconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (fill.filled.load() < kVcpus) {
    if (fill.ended.load()) return Error("the source's guest ended before it filled its memory");
    if (Clock::now() > deadline) {
      return Error("the source's guest did not fill its memory within {} s ({} of {} vCPUs)",
                   timeout.count(), fill.filled.load(), kVcpus);
    }
    std::this_thread::sleep_for(1ms);
  }
  return Status::Ok();
}

struct Outcome {
  Status source = Error("not run");
  Status destination = Error("not run");
  PostcopySourceStats source_stats;
  PostcopyDestinationStats destination_stats;
  InstallerKind installer = InstallerKind::kZero;  // what the destination used
  Result<GuestReport> report = Error("not run");
  GuestReport before;
  uint32_t resumes = 0;
  // Where the run's time went (ms).
  double create_ms = 0, fill_ms = 0, migrate_ms = 0, verify_ms = 0, total_ms = 0;
};

struct Plan {
  uint64_t mem = 256ull << 20;
  Backing backing = Backing::kAnonymous;
  // The destination's installer; unset: the default for the backing.
  std::optional<InstallerKind> installer;
  uint32_t precopy_passes = 1;
  // Cut the link when this share of the post-copy push is done (one per
  // session; each cut is resumed over a new session).
  std::vector<double> cuts;
};

Outcome RunPostcopy(const Plan& plan) {
  Outcome out;
  const auto start = Clock::now();
  // KVM keeps no dirty log for guest_memfd memslots, so a guest_memfd
  // source cannot run pre-copy passes: the source is anonymous memory then
  // (block backings may differ between the ends), the destination keeps
  // guest_memfd and its hole installer.
  FillSignal fill;
  const vmm::VmConfig config = GuestConfig(
      plan.mem,
      plan.backing == Backing::kGuestMemfd && plan.precopy_passes > 0 ? Backing::kAnonymous
                                                                      : plan.backing,
      &fill);
  auto from = vmm::Vm::Create(config);
  if (!from) {
    out.source = from.error();
    return out;
  }
  vmm::VmConfig incoming = GuestConfig(plan.mem, plan.backing);
  incoming.boot = false;
  auto to = vmm::Vm::Create(incoming);
  if (!to) {
    out.destination = to.error();
    return out;
  }
  out.create_ms = MsSince(start);
  auto phase_start = Clock::now();
  if (Status s = (*from)->Start(); !s.ok()) {
    out.source = s;
    return out;
  }
  if (Status s = WaitForFill(fill, 240s); !s.ok()) {
    out.source = s;
    return out;
  }
  out.before = (*from)->report();
  out.fill_ms = MsSince(phase_start);
  phase_start = Clock::now();

  auto listener = SocketListener::Listen(Address{"tcp", "127.0.0.1", 0}, {});
  if (!listener) {
    out.source = listener.error();
    return out;
  }
  const Address address{"tcp", "127.0.0.1", (*listener)->port()};
  auto source_vm = vmm::MakeSourceVm(**from);
  PostcopyVmOptions vm_options;
  vm_options.installer = plan.installer;
  auto destination_vm = vmm::MakePostcopyDestinationVm(**to, vm_options);
  out.installer = destination_vm->installer();
  PostcopySourceOptions options;
  options.base.page_channels = 2;
  options.precopy_passes = plan.precopy_passes;
  PostcopySource source(*source_vm, options);
  PostcopyDestination destination(*destination_vm, {});

  std::thread receiver([&] {
    Result<PostcopyDestinationStats> r = destination.Run(**listener);
    while (!r && destination.phase() == PostcopyPhase::kPaused) {
      fmt::print(stderr, "destination paused: {}\n", r.error().ToString());
      r = destination.Resume(**listener);
    }
    out.destination = r ? Status::Ok() : r.error();
    if (!r) fmt::print(stderr, "destination: {}\n", r.error().ToString());
    if (r) out.destination_stats = *r;
  });

  // One link per session; a cut breaks all of its connections.
  size_t next_cut = 0;
  std::shared_ptr<FaultController> link;
  auto connector = [&]() -> std::unique_ptr<Connector> {
    std::atomic_store(&link, FaultController::Create());
    return std::make_unique<FaultyConnector>(
        std::make_unique<SocketConnector>(address, TransportOptions{}), std::atomic_load(&link));
  };
  std::atomic<bool> done{false};
  std::atomic<uint32_t> resumes{0};
  std::thread cutter([&] {
    while (!done.load() && next_cut < plan.cuts.size()) {
      const PostcopyProgress p = source.progress();
      const uint64_t total = plan.mem / kWirePageSize;
      if (p.phase == PostcopyPhase::kPostcopy &&
          static_cast<double>(total - p.pages_remaining) >= plan.cuts[next_cut] * total) {
        ++next_cut;
        const uint32_t before = resumes.load();
        std::atomic_load(&link)->Cut();
        // The next cut is for the next session.
        while (!done.load() && resumes.load() == before) std::this_thread::sleep_for(1ms);
      }
      std::this_thread::sleep_for(200us);
    }
  });
  auto c = connector();
  Result<PostcopySourceStats> r = source.Run(*c);
  while (!r && source.phase() == PostcopyPhase::kPaused && out.resumes < 10) {
    fmt::print(stderr, "source paused: {}\n", r.error().ToString());
    ++out.resumes;
    c = connector();
    resumes.store(out.resumes);
    r = source.Resume(*c);
  }
  done.store(true);
  cutter.join();
  out.source = r ? Status::Ok() : r.error();
  if (r) out.source_stats = *r;
  receiver.join();
  out.migrate_ms = MsSince(phase_start);
  phase_start = Clock::now();
  (*from)->Stop();
  from->reset();
  if (out.source.ok() && out.destination.ok()) {
    // The guest writes on for a moment after paging ended (memslots merged,
    // userfaultfds idle) before it verifies.
    std::this_thread::sleep_for(100ms);
    (*to)->SetGuestCommand(FL_CMD_STOP);
    out.report = (*to)->Wait(240s);
  }
  (*to)->Stop();
  out.verify_ms = MsSince(phase_start);
  out.total_ms = MsSince(start);
  return out;
}

void ExpectVerified(const Outcome& o) {
  ASSERT_TRUE(o.source.ok()) << o.source.ToString();
  ASSERT_TRUE(o.destination.ok()) << o.destination.ToString();
  ASSERT_TRUE(o.report.has_value()) << o.report.error().ToString();
  EXPECT_TRUE(o.report->success());
  EXPECT_EQ(o.report->bad_page_count(), 0u);
  for (const GuestBadPage& b : o.report->bad_pages) {
    ADD_FAILURE() << fmt::format(
        "vCPU {}: page {:#x} (huge page {:#x}) generation {} expected, word {} is {:#x}, not "
        "{:#x}",
        b.vcpu, b.gpa.value, b.gpa.value & ~(kHugePageSize - 1), b.expected_generation,
        b.word_index, b.found_word, b.expected_word);
  }
  for (uint32_t i = 0; i < kVcpus; ++i) {
    EXPECT_TRUE(o.before.vcpus[i].booted);
    EXPECT_TRUE(o.report->vcpus[i].done);
    EXPECT_EQ(o.report->vcpus[i].bad_pages, 0u);
    EXPECT_EQ(o.report->vcpus[i].pages_verified, o.before.vcpus[i].pages);
  }
  const PostcopyDestinationStats& d = o.destination_stats;
  const paging::PagingStats& p = d.paging;
  fmt::print(
      "post-copy ({} installer): {} pre-copy passes, {} pages present at the start, {} dirty; "
      "vCPUs ran {:.2f} ms after the Switchover arrived (state {:.2f}, channels {:.2f}, paging "
      "{:.2f}); {} pages demanded, {} pushed, fault p50 {:.0f} us p99 {:.0f} us; {} sessions\n"
      "  paging: {} faults, {} units installed ({} bytes, {} copied), {} pushes\n"
      "  time: {:.0f} ms (create {:.0f}, fill {:.0f}, migrate {:.0f}, verify {:.0f}); {} pages "
      "verified, {} bad\n",
      InstallerName(o.installer), d.passes, d.present_at_start, d.dirty_at_switchover,
      d.start_vm.count() / 1e3, d.state_wait.count() / 1e3, d.channels_wait.count() / 1e3,
      d.start_paging.count() / 1e3, d.network.pages_demanded, d.network.pages_pushed,
      d.network.fault_latency.p50_us, d.network.fault_latency.p99_us, d.sessions, p.faults,
      p.units_installed, p.bytes_installed, p.bytes_copied, p.pushes, o.total_ms, o.create_ms,
      o.fill_ms, o.migrate_ms, o.verify_ms, o.report->pages_verified(), o.report->bad_page_count());
  const PostcopySourceStats& s = o.source_stats;
  std::string passes;
  for (const PassStats& pass : s.passes) {
    passes += fmt::format(" [{} data + {} zero pages in {:.0f} ms, {} dirty after]",
                          pass.data_pages, pass.zero_pages, pass.seconds * 1e3, pass.dirty_after);
  }
  fmt::print(
      "  source: passes{}; switchover sent in {:.2f} ms; post-copy {:.0f} ms ({} pushed, {} "
      "requested); total {:.0f} ms; destination post-copy {:.0f} ms, {} fetches inline\n",
      passes, s.switchover_send.count() / 1e3, s.postcopy.count() / 1e3, s.pages_pushed,
      s.pages_requested, s.total.count() / 1e3, d.postcopy.count() / 1e3, d.network.fetches_inline);
}

// Huge pages for two VMs of `mem` (source and destination), or why not.
std::optional<std::string> ReserveHugePages(std::optional<HugePages>& huge, uint64_t mem) {
  const uint64_t need = 2 * mem / kHugePageSize;
  huge.emplace(need);
  if (const uint64_t free = HugePages::Free(); free < need) {
    return fmt::format(
        "hugetlb: {} free 2 MiB huge pages after raising /proc/sys/vm/nr_hugepages by {}, need "
        "{} (run as root on a machine with {} MiB of unfragmented memory)",
        free, need, need, 2 * mem >> 20);
  }
  return std::nullopt;
}

// ---- Every installer across the network -------------------------------------

struct Combo {
  InstallerKind installer;
  Backing backing;
  uint32_t precopy_passes;
};
void PrintTo(const Combo& c, std::ostream* os) {
  *os << InstallerName(c.installer) << " on " << BackingName(c.backing) << ", " << c.precopy_passes
      << " pre-copy passes";
}

// Every installer on every backing it supports (as paging_test.cc's
// PagedVmTest), each with one pre-copy pass and without.
std::vector<Combo> SupportedCombos() {
  const std::pair<InstallerKind, Backing> pairs[] = {
      {InstallerKind::kCopy, Backing::kAnonymous}, {InstallerKind::kCopy, Backing::kMemfd},
      {InstallerKind::kCopy, Backing::kHugetlb},   {InstallerKind::kMove, Backing::kAnonymous},
      {InstallerKind::kContinue, Backing::kMemfd}, {InstallerKind::kContinue, Backing::kHugetlb},
      {InstallerKind::kHole, Backing::kAnonymous}, {InstallerKind::kHole, Backing::kMemfd},
      {InstallerKind::kHole, Backing::kHugetlb},   {InstallerKind::kHole, Backing::kGuestMemfd}};
  std::vector<Combo> combos;
  for (auto [installer, backing] : pairs) {
    for (uint32_t passes : {1u, 0u}) combos.push_back({installer, backing, passes});
  }
  return combos;
}

class PostcopyInstallerTest : public ::testing::TestWithParam<Combo> {};

TEST_P(PostcopyInstallerTest, GuestVerifiesEveryPageOnTheDestination) {
  const uint64_t kMem = itest::Mem(128ull << 20, 64ull << 20);
  const Combo c = GetParam();
  if (c.backing == Backing::kGuestMemfd) FAULTLINE_SKIP_UNLESS_GUEST_MEMFD();
  std::optional<HugePages> huge;
  if (c.backing == Backing::kHugetlb) {
    if (auto why = ReserveHugePages(huge, kMem)) GTEST_SKIP() << *why;
  }
  ASSERT_TRUE(paging::CheckInstaller(c.installer, c.backing).ok());
  Outcome o = RunPostcopy({.mem = kMem,
                           .backing = c.backing,
                           .installer = c.installer,
                           .precopy_passes = c.precopy_passes,
                           .cuts = {}});
  ExpectVerified(o);
  const PostcopyDestinationStats& d = o.destination_stats;
  EXPECT_EQ(d.sessions, 1u);
  EXPECT_EQ(d.passes, c.precopy_passes);
  EXPECT_EQ(o.source_stats.requests_rejected, 0u);
  // The installer asked for is the one that paged, in its own units.
  EXPECT_EQ(o.installer, c.installer);
  const paging::PagingStats& p = d.paging;
  EXPECT_EQ(p.errors, 0u);
  EXPECT_EQ(p.poisoned, 0u);
  EXPECT_GT(p.units_installed, 0u);
  const uint64_t unit = c.installer == InstallerKind::kHole ? PostcopyVmOptions{}.hole_chunk
                        : c.backing == Backing::kHugetlb    ? kHugePageSize
                                                            : kPageSize;
  EXPECT_EQ(p.bytes_installed, p.units_installed * unit);
  // copy: UFFDIO_COPY copies each page again; the others receive in place.
  EXPECT_EQ(p.bytes_copied_per_page(), c.installer == InstallerKind::kCopy ? 4096.0 : 0.0);
  // Faults arrive on the userfaultfd installers' fault queues (one
  // userfaultfd each), or, with holes, only as the vCPUs' own exits.
  EXPECT_EQ(p.queue_faults.size(),
            c.installer == InstallerKind::kHole ? 1u : PostcopyVmOptions{}.pager.queues_per_block);
  // It really paged: the rest was pushed, and the guest's accesses demanded
  // pages. Without a pre-copy pass its first instructions demand. After one,
  // only the pages dirtied during it are missing (a few hundred), and on the
  // software CPU, whose guest writes about 3,000 random pages/s, the push
  // often brings them all before a vCPU touches one: there the demand path
  // is checked by the 0-pass runs.
  EXPECT_GT(d.network.pages_pushed, 0u);
  EXPECT_GT(o.source_stats.pages_pushed, 0u);
  if (c.precopy_passes == 0 || itest::OnKvm()) {
    EXPECT_GT(d.network.pages_demanded, 0u);
    EXPECT_GT(o.source_stats.pages_requested, 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(Installers, PostcopyInstallerTest, ::testing::ValuesIn(SupportedCombos()),
                         [](const auto& info) {
                           return fmt::format("{}_{}_{}pass", InstallerName(info.param.installer),
                                              BackingName(info.param.backing),
                                              info.param.precopy_passes);
                         });

// Every installer-backing pair not in SupportedCombos(), asked of the
// destination: refused at the source's Hello, before any page moves, with
// an error that names the installer, the backing and what to use instead,
// on both sides; the source's guest runs on and verifies every page.
TEST(PostcopyRefusalTest, UnsupportedInstallerIsRefusedAndTheSourceRunsOn) {
  constexpr uint64_t kMem = 64ull << 20;
  FillSignal fill;
  auto from = vmm::Vm::Create(GuestConfig(kMem, Backing::kAnonymous, &fill));
  ASSERT_TRUE(from.has_value()) << from.error().ToString();
  ASSERT_TRUE((*from)->Start().ok());
  ASSERT_TRUE(WaitForFill(fill, 120s).ok());
  const std::vector<Combo> supported = SupportedCombos();
  uint32_t refused = 0;
  for (InstallerKind installer :
       {InstallerKind::kCopy, InstallerKind::kMove, InstallerKind::kContinue, InstallerKind::kZero,
        InstallerKind::kHole}) {
    for (Backing backing :
         {Backing::kAnonymous, Backing::kMemfd, Backing::kHugetlb, Backing::kGuestMemfd}) {
      if (std::ranges::any_of(supported, [&](const Combo& c) {
            return c.installer == installer && c.backing == backing;
          })) {
        continue;
      }
      if (backing == Backing::kGuestMemfd && !itest::GuestMemfdUsable()) continue;
      SCOPED_TRACE(fmt::format("{} on {}", InstallerName(installer), BackingName(backing)));
      std::optional<HugePages> huge;
      if (backing == Backing::kHugetlb) huge.emplace(kMem / kHugePageSize);
      vmm::VmConfig incoming = GuestConfig(kMem, backing);
      incoming.boot = false;
      auto to = vmm::Vm::Create(incoming);
      ASSERT_TRUE(to.has_value()) << to.error().ToString();
      auto listener = SocketListener::Listen(Address{"tcp", "127.0.0.1", 0}, {});
      ASSERT_TRUE(listener.has_value());
      SocketConnector connector(Address{"tcp", "127.0.0.1", (*listener)->port()}, {});
      auto source_vm = vmm::MakeSourceVm(**from);
      PostcopyVmOptions vm_options;
      vm_options.installer = installer;
      auto destination_vm = vmm::MakePostcopyDestinationVm(**to, vm_options);
      ASSERT_FALSE(destination_vm->CheckPaging().ok());
      PostcopySourceOptions options;
      options.base.page_channels = 2;
      options.precopy_passes = 1;
      PostcopySource source(*source_vm, options);
      PostcopyDestination destination(*destination_vm, {});
      Result<PostcopyDestinationStats> received = Error("not run");
      std::thread receiver([&] { received = destination.Run(**listener); });
      Result<PostcopySourceStats> sent = source.Run(connector);
      receiver.join();
      ++refused;

      ASSERT_FALSE(received.has_value());
      ASSERT_FALSE(sent.has_value());
      const std::string use = fmt::format("use {}", InstallerName(paging::BestInstaller(backing)));
      for (const std::string& said : {received.error().ToString(), sent.error().ToString()}) {
        EXPECT_THAT(said, HasSubstr(fmt::format("'{}'", InstallerName(installer))));
        EXPECT_THAT(said, HasSubstr(BackingName(backing)));
        EXPECT_THAT(said, ::testing::AnyOf(HasSubstr(use), HasSubstr("--installer hole")));
      }
      EXPECT_EQ(destination.phase(), PostcopyPhase::kFailed);
      EXPECT_EQ(destination.stats().passes, 0u);
      EXPECT_EQ(source.phase(), PostcopyPhase::kFailed);
      EXPECT_EQ(source.progress().pages_sent, 0u) << "refused before any page moved";
      (*to)->Stop();
    }
  }
  // copy, move, continue and zero on gmem; move on memfd and hugetlb;
  // continue and zero on anon; zero on memfd and hugetlb.
  // No guest_memfd pairs on tcg, or on a KVM without guest_memfd.
  EXPECT_EQ(refused, itest::GuestMemfdUsable() ? 10u : 6u);
  // The source's guest never stopped: it ends its random writes and
  // verifies every page.
  (*from)->SetGuestCommand(FL_CMD_STOP);
  Result<GuestReport> report = (*from)->Wait(120s);
  ASSERT_TRUE(report.has_value()) << report.error().ToString();
  EXPECT_TRUE(report->success());
  EXPECT_EQ(report->bad_page_count(), 0u);
  EXPECT_GT(report->pages_verified(), 0u);
}

// ---- The 2 GiB acceptance ---------------------------------------------------

// FAULTLINE_POSTCOPY_RUNS (default 1): runs per backing.
uint32_t TwoGiBRunCount() {
  const char* env = std::getenv("FAULTLINE_POSTCOPY_RUNS");
  if (env == nullptr || *env == '\0') return 1;
  const long n = std::strtol(env, nullptr, 10);
  return n > 0 && n <= 100 ? static_cast<uint32_t>(n) : 1;
}

struct TwoGiBRun {
  Backing backing;
  uint32_t run;
};
void PrintTo(const TwoGiBRun& r, std::ostream* os) {
  *os << BackingName(r.backing) << " run " << r.run;
}

std::vector<TwoGiBRun> TwoGiBRuns() {
  std::vector<TwoGiBRun> runs;
  for (Backing backing :
       {Backing::kAnonymous, Backing::kMemfd, Backing::kHugetlb, Backing::kGuestMemfd}) {
    for (uint32_t run = 0; run < TwoGiBRunCount(); ++run) runs.push_back({backing, run});
  }
  return runs;
}

class PostcopyTwoGiBTest : public ::testing::TestWithParam<TwoGiBRun> {};

// Acceptance: post-copy of the 2 GiB random-write guest (256 MiB on the
// software CPU, see itest::Mem) with 2 vCPUs, the
// default installer of its backing, completes with 0 wrong pages. One
// pre-copy pass first, except on guest_memfd: KVM keeps no dirty log for
// its memslots, and this run keeps guest_memfd on both ends, so every page
// comes by request or push.
TEST_P(PostcopyTwoGiBTest, GuestVerifiesEveryPage) {
  const uint64_t kMem = itest::Mem(2ull << 30, 256ull << 20);
  const Backing backing = GetParam().backing;
  if (backing == Backing::kGuestMemfd) FAULTLINE_SKIP_UNLESS_GUEST_MEMFD();
  std::optional<HugePages> huge;
  if (backing == Backing::kHugetlb) {
    if (auto why = ReserveHugePages(huge, kMem)) GTEST_SKIP() << *why;
  }
  Outcome o = RunPostcopy({.mem = kMem,
                           .backing = backing,
                           .installer = std::nullopt,
                           .precopy_passes = backing == Backing::kGuestMemfd ? 0u : 1u,
                           .cuts = {}});
  ExpectVerified(o);
  EXPECT_EQ(o.installer, paging::BestInstaller(backing));
  EXPECT_EQ(o.destination_stats.paging.errors, 0u);
  EXPECT_EQ(o.source_stats.requests_rejected, 0u);
}

INSTANTIATE_TEST_SUITE_P(Backings, PostcopyTwoGiBTest, ::testing::ValuesIn(TwoGiBRuns()),
                         [](const auto& info) {
                           return fmt::format("{}_run{}", BackingName(info.param.backing),
                                              info.param.run);
                         });

// ---- Recovery and a hostile destination --------------------------------------

TEST(PostcopyRecoveryTest, LinkCutThreeTimesResumesAndCompletes) {
  for (Backing backing : {Backing::kAnonymous, Backing::kMemfd}) {
    SCOPED_TRACE(BackingName(backing));
    Outcome o = RunPostcopy({.mem = itest::Mem(256ull << 20, 128ull << 20),
                             .backing = backing,
                             .installer = std::nullopt,
                             .precopy_passes = 0,
                             .cuts = {0.05, 0.4, 0.8}});
    ExpectVerified(o);
    EXPECT_EQ(o.resumes, 3u);
    EXPECT_EQ(o.destination_stats.sessions, 4u);
  }
}

// A destination that sends a page request for an index past the end of the
// block: the source rejects and logs it, and answers the next request.
TEST(PostcopySourceTest, OutOfRangePageRequestIsRejectedAndLogged) {
  FillSignal fill;
  const vmm::VmConfig config = GuestConfig(64ull << 20, Backing::kAnonymous, &fill);
  auto from = vmm::Vm::Create(config);
  ASSERT_TRUE(from.has_value()) << from.error().ToString();
  ASSERT_TRUE((*from)->Start().ok());
  ASSERT_TRUE(WaitForFill(fill, 120s).ok());
  auto listener = SocketListener::Listen(Address{"tcp", "127.0.0.1", 0}, {});
  ASSERT_TRUE(listener.has_value());
  SocketConnector connector(Address{"tcp", "127.0.0.1", (*listener)->port()}, TransportOptions{});
  auto source_vm = vmm::MakeSourceVm(**from);
  PostcopySourceOptions options;
  options.base.page_channels = 1;
  options.precopy_passes = 0;
  std::mutex log_mu;
  std::vector<std::string> log;
  options.log = [&](std::string_view line) {
    std::lock_guard lock(log_mu);
    log.emplace_back(line);
  };
  PostcopySource source(*source_vm, options);
  Result<PostcopySourceStats> result = Error("not run");
  std::thread sender([&] { result = source.Run(connector); });

  // The hostile destination.
  ReceiverConfig rc;
  for (const auto& b : (*from)->memory().blocks()) rc.blocks.push_back(DescribeBlock(*b));
  rc.features_supported = kFeatureAuth | kFeaturePostcopy | kFeatureRecovery;
  SessionReceiver receiver(rc, *RandomNonce());
  auto session = AcceptSession(**listener, receiver);
  ASSERT_TRUE(session.has_value()) << session.error().ToString();
  auto priority = AcceptPriorityChannel(**listener, *session, {}, 10s);
  ASSERT_TRUE(priority.has_value()) << priority.error().ToString();
  for (uint32_t seen = 0; seen < 2;) {  // Switchover, then one VcpuState each
    Result<Message> m = session->main->reader().Read();
    ASSERT_TRUE(m.has_value()) << m.error().ToString();
    seen += std::holds_alternative<VcpuStateMessage>(*m);
  }
  const uint32_t pages = static_cast<uint32_t>((64ull << 20) / kWirePageSize);
  // The encoder checks nothing: a hostile peer can send any index.
  Channel& raw = (*priority)->channel();
  ASSERT_TRUE(raw.Send(EncodeFrame(PageRequest{0, 1, {pages + 5}}, 1)).ok());
  ASSERT_TRUE(raw.Send(EncodeFrame(PageRequest{0, 2, {7}}, 2)).ok());
  // The answer to the good request comes back (seq 0 was the ChannelHello).
  std::vector<uint8_t> page(kWirePageSize);
  Result<Message> reply = (*priority)->reader().Read();
  ASSERT_TRUE(reply.has_value()) << reply.error().ToString();
  const auto* header = std::get_if<PagesHeader>(&*reply);
  ASSERT_NE(header, nullptr);
  EXPECT_EQ(header->pages, std::vector<uint32_t>{7});
  ASSERT_TRUE((*priority)->reader().ReceivePageData({{MutableBuffer(page)}}).ok());
  EXPECT_EQ(
      0, std::memcmp(page.data(), (*from)->ram_block()->host() + 7 * kWirePageSize, kWirePageSize));
  // Hang up: the source pauses (it cannot know whether this destination runs the guest).
  session->Shutdown();
  (*priority)->channel().Shutdown();
  sender.join();
  ASSERT_FALSE(result.has_value());
  EXPECT_EQ(source.phase(), PostcopyPhase::kPaused);
  std::lock_guard lock(log_mu);
  ASSERT_EQ(log.size(), 1u);
  EXPECT_THAT(log[0], HasSubstr("rejected a page request"));
  EXPECT_THAT(log[0], HasSubstr("out of range"));
  (*from)->Stop();
}

}  // namespace
}  // namespace faultline::migration
