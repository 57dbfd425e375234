#include "src/hypervisor/vcpu_state.h"

#include <gtest/gtest.h>

namespace faultline::hv {
namespace {

VcpuState Sample() {
  VcpuState s;
  s.index = 3;
  for (int i = 0; i < kGprCount; ++i) s.gpr[i] = 0x1000 + i;
  s.rip = 0x100123;
  s.rflags = 0x3202;
  s.cs = {0, 0xffffffff, 0x23, 0xb, 1, 3, 0, 1, 1, 1, 0, 0};
  s.ss = {0, 0xffffffff, 0x1b, 0x3, 1, 3, 1, 1, 0, 1, 0, 0};
  s.tr = {0x123000, 0x67, 0x28, 0xb, 1, 0, 0, 0, 0, 0, 0, 0};
  s.ldt.unusable = 1;
  s.gdt = {0x1000, 0x57};
  s.idt = {0x2000, 0x1ff};
  s.cr0 = 0x80050033;
  s.cr3 = 0x10000;
  s.cr4 = 0x620;
  s.efer = 0x500;
  s.fpu.st[2][0] = 7;
  s.fpu.xmm[15][15] = 9;
  s.fpu.mxcsr = 0x1f81;
  s.msrs = {{kMsrTsc, 123456789}, {kMsrKernelGsBase, 0xffff8000}};
  s.xsave = std::vector<uint8_t>(4096, 0x5a);
  s.has_xcr0 = true;
  s.xcr0 = 7;
  s.lapic = std::vector<uint8_t>(1024, 1);
  s.events = {1, 2, 3};
  s.mp_state = {0, 0, 0, 0};
  return s;
}

void ExpectSame(const VcpuState& a, const VcpuState& b) {
  EXPECT_EQ(a.index, b.index);
  EXPECT_EQ(a.gpr, b.gpr);
  EXPECT_EQ(a.rip, b.rip);
  EXPECT_EQ(a.rflags, b.rflags);
  EXPECT_EQ(a.cs, b.cs);
  EXPECT_EQ(a.ss, b.ss);
  EXPECT_EQ(a.tr, b.tr);
  EXPECT_EQ(a.ldt, b.ldt);
  EXPECT_EQ(a.gdt, b.gdt);
  EXPECT_EQ(a.idt, b.idt);
  EXPECT_EQ(a.cr0, b.cr0);
  EXPECT_EQ(a.cr3, b.cr3);
  EXPECT_EQ(a.cr4, b.cr4);
  EXPECT_EQ(a.efer, b.efer);
  EXPECT_EQ(a.fpu, b.fpu);
  EXPECT_EQ(a.msrs, b.msrs);
  EXPECT_EQ(a.xsave, b.xsave);
  EXPECT_EQ(a.has_xcr0, b.has_xcr0);
  EXPECT_EQ(a.xcr0, b.xcr0);
  EXPECT_EQ(a.lapic, b.lapic);
  EXPECT_EQ(a.events, b.events);
  EXPECT_EQ(a.mp_state, b.mp_state);
}

TEST(VcpuStateTest, RoundTripsEveryField) {
  const VcpuState s = Sample();
  Result<VcpuState> back = VcpuState::Deserialize(s.Serialize());
  ASSERT_TRUE(back.has_value()) << back.error().ToString();
  ExpectSame(s, *back);
}

TEST(VcpuStateTest, SoftwareCpuStateHasNoKvmSections) {
  VcpuState s = Sample();
  s.xsave.clear();
  s.has_xcr0 = false;
  s.xcr0 = 0;
  s.lapic.clear();
  s.events.clear();
  s.mp_state.clear();
  Result<VcpuState> back = VcpuState::Deserialize(s.Serialize());
  ASSERT_TRUE(back.has_value()) << back.error().ToString();
  ExpectSame(s, *back);
}

TEST(VcpuStateTest, EveryTruncationIsAnError) {
  const std::vector<uint8_t> bytes = Sample().Serialize();
  for (size_t n = 0; n < bytes.size(); ++n) {
    Result<VcpuState> s = VcpuState::Deserialize({bytes.data(), n});
    EXPECT_FALSE(s.has_value()) << "accepted " << n << " of " << bytes.size() << " bytes";
  }
}

TEST(VcpuStateTest, RejectsOtherVersionsAndBadSections) {
  std::vector<uint8_t> bytes = Sample().Serialize();
  std::vector<uint8_t> version = bytes;
  version[4] = 1;  // version 1: the KVM-struct dump this format replaced
  Result<VcpuState> s = VcpuState::Deserialize(version);
  ASSERT_FALSE(s.has_value());
  EXPECT_NE(s.error().ToString().find("version 1"), std::string::npos) << s.error().ToString();
  std::vector<uint8_t> magic = bytes;
  magic[0] ^= 0xff;
  EXPECT_FALSE(VcpuState::Deserialize(magic).has_value());
  // A section longer than its contents.
  std::vector<uint8_t> length = bytes;
  length[16] += 1;  // the core section's length
  EXPECT_FALSE(VcpuState::Deserialize(length).has_value());
}

TEST(VcpuStateTest, MsrLookup) {
  VcpuState s;
  EXPECT_EQ(s.GetMsr(kMsrTsc, 42), 42u);
  s.SetMsr(kMsrTsc, 7);
  s.SetMsr(kMsrTsc, 8);
  EXPECT_EQ(s.msrs.size(), 1u);
  EXPECT_EQ(s.GetMsr(kMsrTsc), 8u);
}

}  // namespace
}  // namespace faultline::hv
