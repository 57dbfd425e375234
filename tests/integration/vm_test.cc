// The reference VMM on the real /dev/kvm with the test guest.
#include "src/vmm/vm.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "guest/abi.h"
#include "tests/integration/test_accel.h"

namespace faultline::vmm {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;

VmConfig Config(uint64_t mem, uint32_t vcpus, std::string args) {
  VmConfig c;
  c.accel = itest::TestAccelChoice();
  c.mem_size = mem;
  c.vcpus = vcpus;
  c.guest_args = std::move(args) + " quiet=1";
  return c;
}

std::unique_ptr<Vm> MustCreate(VmConfig config) {
  Result<std::unique_ptr<Vm>> vm = Vm::Create(std::move(config));
  EXPECT_TRUE(vm.has_value()) << vm.error().ToString();
  return vm.has_value() ? std::move(*vm) : nullptr;
}

GuestReport MustRun(Vm& vm) {
  EXPECT_TRUE(vm.Start().ok());
  Result<GuestReport> report = vm.Wait(240s);
  EXPECT_TRUE(report.has_value()) << report.error().ToString();
  return report.has_value() ? *report : GuestReport{};
}

TEST(VmTest, FillsAndVerifiesAllMemoryWithTwoVcpus) {
  const uint64_t mem = itest::Mem(1ull << 30, 256ull << 20);
  auto vm = MustCreate(Config(mem, 2, "workload=fill,verify"));
  ASSERT_NE(vm, nullptr);
  GuestReport report = MustRun(*vm);
  ASSERT_TRUE(report.success()) << report.bad_page_count() << " bad pages";
  ASSERT_EQ(report.vcpus.size(), 2u);
  uint64_t pages = 0;
  for (const GuestVcpuReport& v : report.vcpus) {
    pages += v.pages;
    ASSERT_EQ(v.phases.size(), 2u);
    EXPECT_EQ(v.phases[0].ops, v.pages);             // fill wrote every page
    EXPECT_EQ(v.phases[1].pages_verified, v.pages);  // verify checked every page
  }
  EXPECT_EQ(report.pages_verified(), pages);
  // Everything but the image, boot structures and ledgers is workload.
  EXPECT_GT(pages, mem / kPageSize * 99 / 100);
  EXPECT_EQ(report.bad_page_count(), 0u);
}

// The check must be able to fail: corrupt one word of one page between the
// guest's fill and its verify, and the guest must name exactly that page.
TEST(VmTest, ReportsExactlyTheCorruptedPage) {
  Vm* vm_ptr = nullptr;
  std::atomic<uint64_t> corrupted{0};
  VmConfig config = Config(256ull << 20, 2, "workload=fill,verify");
  config.on_event = [&](const GuestEvent& e) {
    // Runs on vCPU 1's thread between its fill and its verify.
    if (e.kind != GuestEvent::Kind::kPhase || e.vcpu != 1 || e.phase->phase != FL_PHASE_FILL) {
      return;
    }
    GuestVcpuReport v = vm_ptr->report().vcpus[1];
    Gpa page = v.first_page + 1234 * kPageSize;
    uint64_t word = 0;
    ASSERT_TRUE(vm_ptr->ReadGuest(page + 8 * 77, {reinterpret_cast<uint8_t*>(&word), 8}).ok());
    word ^= 1;  // a single bit
    ASSERT_TRUE(vm_ptr->WriteGuest(page + 8 * 77, {reinterpret_cast<uint8_t*>(&word), 8}).ok());
    corrupted = page.value;
  };
  auto vm = MustCreate(config);
  ASSERT_NE(vm, nullptr);
  vm_ptr = vm.get();
  GuestReport report = MustRun(*vm);
  ASSERT_NE(corrupted.load(), 0u);
  EXPECT_FALSE(report.success());
  EXPECT_EQ(report.bad_page_count(), 1u);
  EXPECT_EQ(report.vcpus[0].bad_pages, 0u);
  EXPECT_EQ(report.vcpus[1].bad_pages, 1u);
  ASSERT_EQ(report.bad_pages.size(), 1u);
  EXPECT_EQ(report.bad_pages[0].gpa.value, corrupted.load());
  EXPECT_EQ(report.bad_pages[0].word_index, 77u);
  EXPECT_EQ(report.bad_pages[0].found_word ^ report.bad_pages[0].expected_word, 1u);
}

// Kick-and-hold: while held, no vCPU changes guest memory; after release the
// guest carries on and verifies.
TEST(VmTest, HoldKeepsEveryVcpuOutOfTheGuest) {
  auto vm = MustCreate(Config(128ull << 20, 2, "workload=fill,random,verify until_command=1"));
  ASSERT_NE(vm, nullptr);
  ASSERT_TRUE(vm->Start().ok());
  auto hash = [&] {
    uint64_t h = 0;
    std::span<uint8_t> ram = vm->ram();
    const uint64_t* words = reinterpret_cast<const uint64_t*>(ram.data());
    for (size_t i = 0; i < ram.size() / 8; i += 7) h = h * 31 + words[i];
    return h;
  };
  std::this_thread::sleep_for(300ms);  // let the random phase start
  int changed_while_running = 0;
  for (int i = 0; i < 20; ++i) {
    vm->Pause();
    uint64_t before = hash();
    std::this_thread::sleep_for(5ms);
    EXPECT_EQ(hash(), before) << "guest memory changed while every vCPU was held";
    vm->Resume();
    std::this_thread::sleep_for(20ms);
    if (hash() != before) ++changed_while_running;
  }
  EXPECT_GT(changed_while_running, 0) << "the guest never ran between holds";
  vm->SetGuestCommand(FL_CMD_STOP);
  Result<GuestReport> report = vm->Wait(120s);
  ASSERT_TRUE(report.has_value()) << report.error().ToString();
  EXPECT_TRUE(report->success());
}

// A guest paused mid-workload, captured, serialised and restored into a fresh
// VM continues and finishes its workload correctly.
TEST(VmTest, VcpuStateRoundTripIntoFreshVm) {
  VmConfig config = Config(256ull << 20, 2, "workload=fill,random,verify until_command=1");
  auto source = MustCreate(config);
  ASSERT_NE(source, nullptr);
  ASSERT_TRUE(source->Start().ok());
  std::this_thread::sleep_for(500ms);
  source->Pause();
  Result<std::vector<hv::VcpuState>> states = source->SaveVcpus();
  ASSERT_TRUE(states.has_value()) << states.error().ToString();
  std::vector<hv::VcpuState> restored;
  for (const hv::VcpuState& s : *states) {
    Result<hv::VcpuState> r = hv::VcpuState::Deserialize(s.Serialize());
    ASSERT_TRUE(r.has_value()) << r.error().ToString();
    restored.push_back(*r);
  }
  GuestReport before = source->report();

  VmConfig dest_config = config;
  dest_config.boot = false;
  auto dest = MustCreate(dest_config);
  ASSERT_NE(dest, nullptr);
  std::memcpy(dest->ram().data(), source->ram().data(), source->ram().size());
  source->Stop();
  source.reset();

  ASSERT_TRUE(dest->LoadVcpus(restored).ok());
  ASSERT_TRUE(dest->Start().ok());
  std::this_thread::sleep_for(200ms);
  dest->SetGuestCommand(FL_CMD_STOP);
  Result<GuestReport> report = dest->Wait(120s);
  ASSERT_TRUE(report.has_value()) << report.error().ToString();
  EXPECT_TRUE(report->success());
  for (uint32_t i = 0; i < 2; ++i) {
    EXPECT_TRUE(before.vcpus[i].booted);
    EXPECT_FALSE(before.vcpus[i].done);
    EXPECT_TRUE(report->vcpus[i].done);
    EXPECT_EQ(report->vcpus[i].bad_pages, 0u);
    EXPECT_EQ(report->vcpus[i].pages_verified, before.vcpus[i].pages);
    // A TSC that went backwards across the restore would show as a stall of
    // ~2^64 cycles; the pause itself lasted well under ten seconds.
    EXPECT_LT(report->CyclesToUs(report->vcpus[i].max_stall_cycles), 10e6);
  }
}

TEST(VmTest, TripleFaultIsAClearError) {
  auto vm = MustCreate(Config(64ull << 20, 1, "workload=triplefault"));
  ASSERT_NE(vm, nullptr);
  ASSERT_TRUE(vm->Start().ok());
  Result<GuestReport> report = vm->Wait(60s);
  ASSERT_FALSE(report.has_value());
  EXPECT_THAT(report.error().ToString(), HasSubstr("triple-fault"));
  EXPECT_THAT(report.error().ToString(), HasSubstr("rip="));
}

TEST(VmTest, BadConfigurationsAreRejected) {
  auto error = [](VmConfig c) {
    Result<std::unique_ptr<Vm>> vm = Vm::Create(std::move(c));
    return vm.has_value() ? std::string("created") : vm.error().ToString();
  };
  VmConfig c = Config(64ull << 20, 1, "workload=fill");
  c.mem_size = 0;
  EXPECT_THAT(error(c), HasSubstr("zero"));
  c.mem_size = (64ull << 20) + 4096;
  EXPECT_THAT(error(c), HasSubstr("not a multiple of 2 MiB"));
  c.mem_size = 64ull << 20;
  c.vcpus = 9;
  EXPECT_THAT(error(c), HasSubstr("1 to 8"));
  c.vcpus = 0;
  EXPECT_THAT(error(c), HasSubstr("1 to 8"));
  c.vcpus = 1;
  c.guest_path = "/nonexistent/guest.elf";
  EXPECT_THAT(error(c), HasSubstr("No such file"));
  c.guest_path = "/proc/self/status";  // exists, not ELF
  EXPECT_THAT(error(c), HasSubstr("not an ELF file"));
  c.guest_path = "/bin/true";  // ELF, not a multiboot guest
  EXPECT_THAT(error(c), HasSubstr("not"));
}

}  // namespace
}  // namespace faultline::vmm
