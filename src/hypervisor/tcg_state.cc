#include "src/hypervisor/tcg_state.h"

#include <cstring>
#include <iterator>
#include <utility>

#include <fmt/format.h>

namespace faultline::hv {
namespace {

// The MSRs a software vCPU's state carries (those libunicorn emulates and
// a 64-bit guest sets up).
constexpr uint32_t kStateMsrs[] = {
    kMsrTsc,
    0x174 /* SYSENTER_CS */,
    0x175 /* SYSENTER_ESP */,
    0x176 /* SYSENTER_EIP */,
    0x277 /* PAT */,
    0xc0000081 /* STAR */,
    0xc0000082 /* LSTAR */,
    0xc0000083 /* CSTAR */,
    0xc0000084 /* SFMASK */,
    kMsrKernelGsBase,
};

// The engine's registers for VcpuState::gpr, in its order.
constexpr int kGprRegs[kGprCount] = {
    UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RBX, UC_X86_REG_RSP, UC_X86_REG_RBP,
    UC_X86_REG_RSI, UC_X86_REG_RDI, UC_X86_REG_R8,  UC_X86_REG_R9,  UC_X86_REG_R10, UC_X86_REG_R11,
    UC_X86_REG_R12, UC_X86_REG_R13, UC_X86_REG_R14, UC_X86_REG_R15};

// Segment hidden parts: libunicorn gives only selectors (and the FS/GS
// bases), so they are decoded from the descriptor table in guest memory,
// which is where the CPU loaded them from.
Segment DecodeDescriptor(uint16_t selector, uint64_t low, uint64_t high, bool system) {
  Segment s;
  s.selector = selector;
  s.limit = static_cast<uint32_t>((low & 0xffff) | ((low >> 32) & 0xf0000));
  s.base = ((low >> 16) & 0xffffff) | (((low >> 56) & 0xff) << 24);
  if (system) s.base |= (high & 0xffffffff) << 32;
  s.type = (low >> 40) & 0xf;
  s.s = (low >> 44) & 1;
  s.dpl = (low >> 45) & 3;
  s.present = (low >> 47) & 1;
  s.avl = (low >> 52) & 1;
  s.l = (low >> 53) & 1;
  s.db = (low >> 54) & 1;
  s.g = (low >> 55) & 1;
  if (s.g) s.limit = (s.limit << 12) | 0xfff;
  return s;
}

}  // namespace

Status UcError(uc_err err, std::string_view what) {
  return Error("{}: {} (libunicorn)", what, uc_strerror(err));
}

Result<VcpuState> ReadTcgState(uc_engine* uc, uint32_t index, std::array<Segment, 6>& known,
                               const GuestReader& read_guest) {
  VcpuState s;
  s.index = index;
  for (int i = 0; i < kGprCount; ++i) uc_reg_read(uc, kGprRegs[i], &s.gpr[i]);
  uc_reg_read(uc, UC_X86_REG_RIP, &s.rip);
  uc_reg_read(uc, UC_X86_REG_RFLAGS, &s.rflags);
  uc_reg_read(uc, UC_X86_REG_CR0, &s.cr0);
  uc_reg_read(uc, UC_X86_REG_CR2, &s.cr2);
  uc_reg_read(uc, UC_X86_REG_CR3, &s.cr3);
  uc_reg_read(uc, UC_X86_REG_CR4, &s.cr4);
  uc_reg_read(uc, UC_X86_REG_CR8, &s.cr8);
  uc_x86_msr efer{kMsrEfer, 0};
  uc_reg_read(uc, UC_X86_REG_MSR, &efer);
  s.efer = efer.value;
  uc_x86_mmr gdtr{}, idtr{}, tr{}, ldtr{};
  uc_reg_read(uc, UC_X86_REG_GDTR, &gdtr);
  uc_reg_read(uc, UC_X86_REG_IDTR, &idtr);
  uc_reg_read(uc, UC_X86_REG_TR, &tr);
  uc_reg_read(uc, UC_X86_REG_LDTR, &ldtr);
  s.gdt = {gdtr.base, static_cast<uint16_t>(gdtr.limit)};
  s.idt = {idtr.base, static_cast<uint16_t>(idtr.limit)};
  auto descriptor = [&](uint16_t selector, bool system) -> Segment {
    const uint64_t at = s.gdt.base + (selector & ~7u);
    uint64_t words[2] = {0, 0};
    if ((selector & ~3u) != 0 && (selector | 7u) <= s.gdt.limit) (void)read_guest(at, words);
    Segment seg = DecodeDescriptor(selector, words[0], words[1], system);
    if ((selector & ~3u) == 0) seg.unusable = 1;
    return seg;
  };
  const std::pair<Segment*, int> segs[] = {{&s.cs, UC_X86_REG_CS}, {&s.ss, UC_X86_REG_SS},
                                           {&s.ds, UC_X86_REG_DS}, {&s.es, UC_X86_REG_ES},
                                           {&s.fs, UC_X86_REG_FS}, {&s.gs, UC_X86_REG_GS}};
  for (size_t i = 0; i < std::size(segs); ++i) {
    const auto& [seg, reg] = segs[i];
    uint64_t selector = 0;
    uc_reg_read(uc, reg, &selector);
    Segment& cached = known[i];
    if (cached.selector != selector || cached.present == 0) {
      cached = descriptor(static_cast<uint16_t>(selector), false);
    }
    *seg = cached;
  }
  uc_reg_read(uc, UC_X86_REG_FS_BASE, &s.fs.base);
  uc_reg_read(uc, UC_X86_REG_GS_BASE, &s.gs.base);
  // TR and LDTR come with their hidden parts (flags in descriptor layout).
  auto system_segment = [](const uc_x86_mmr& m) {
    Segment seg = DecodeDescriptor(m.selector, uint64_t{m.flags} << 32, 0, true);
    seg.base = m.base;
    seg.limit = m.limit;
    if ((m.selector & ~3u) == 0 && seg.present == 0) seg.unusable = 1;
    return seg;
  };
  s.tr = system_segment(tr);
  s.ldt = system_segment(ldtr);
  // x87 and SSE.
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) uc_reg_read(uc, UC_X86_REG_ST0 + i, s.fpu.st[i].data());
  uc_reg_read(uc, UC_X86_REG_FPCW, &v);
  s.fpu.fcw = static_cast<uint16_t>(v);
  uc_reg_read(uc, UC_X86_REG_FPSW, &v);
  s.fpu.fsw = static_cast<uint16_t>(v);
  uc_reg_read(uc, UC_X86_REG_FPTAG, &v);
  s.fpu.ftw = static_cast<uint8_t>(v);
  uint32_t mxcsr = 0;
  uc_reg_read(uc, UC_X86_REG_MXCSR, &mxcsr);
  s.fpu.mxcsr = mxcsr;
  for (int i = 0; i < 16; ++i) uc_reg_read(uc, UC_X86_REG_XMM0 + i, s.fpu.xmm[i].data());
  for (uint32_t index : kStateMsrs) {
    uc_x86_msr msr{index, 0};
    if (uc_reg_read(uc, UC_X86_REG_MSR, &msr) == UC_ERR_OK) s.msrs.push_back({index, msr.value});
  }
  return s;
}

Status WriteTcgState(uc_engine* uc, uint32_t index, const VcpuState& s,
                     std::array<Segment, 6>& known) {
  auto write = [&](int reg, const void* value, const char* name) -> Status {
    uc_err err = uc_reg_write(uc, reg, value);
    return err == UC_ERR_OK ? Status::Ok()
                            : UcError(err, fmt::format("vcpu {}: setting {}", index, name));
  };
  // Modes before what depends on them: CR0/CR4/EFER, then the tables, then
  // the segments (CS first: its DPL is the privilege level the others are
  // loaded at), then the rest.
  uc_x86_msr efer{kMsrEfer, s.efer};
  RETURN_IF_ERROR(write(UC_X86_REG_CR4, &s.cr4, "CR4"));
  RETURN_IF_ERROR(write(UC_X86_REG_MSR, &efer, "EFER"));
  RETURN_IF_ERROR(write(UC_X86_REG_CR3, &s.cr3, "CR3"));
  RETURN_IF_ERROR(write(UC_X86_REG_CR0, &s.cr0, "CR0"));
  RETURN_IF_ERROR(write(UC_X86_REG_CR2, &s.cr2, "CR2"));
  uc_x86_mmr gdtr{0, s.gdt.base, s.gdt.limit, 0};
  uc_x86_mmr idtr{0, s.idt.base, s.idt.limit, 0};
  RETURN_IF_ERROR(write(UC_X86_REG_GDTR, &gdtr, "GDTR"));
  RETURN_IF_ERROR(write(UC_X86_REG_IDTR, &idtr, "IDTR"));
  const std::pair<const Segment*, int> segs[] = {{&s.cs, UC_X86_REG_CS}, {&s.ss, UC_X86_REG_SS},
                                                 {&s.ds, UC_X86_REG_DS}, {&s.es, UC_X86_REG_ES},
                                                 {&s.fs, UC_X86_REG_FS}, {&s.gs, UC_X86_REG_GS}};
  const bool protected_mode = (s.cr0 & 1) != 0;
  known = {s.cs, s.ss, s.ds, s.es, s.fs, s.gs};
  for (const auto& [seg, reg] : segs) {
    uint64_t selector = seg->selector;
    if (!protected_mode || (selector & ~3u) != 0 || reg != UC_X86_REG_CS) {
      RETURN_IF_ERROR(write(reg, &selector, "a segment register"));
    }
  }
  RETURN_IF_ERROR(write(UC_X86_REG_FS_BASE, &s.fs.base, "FS base"));
  RETURN_IF_ERROR(write(UC_X86_REG_GS_BASE, &s.gs.base, "GS base"));
  const uint32_t tr_flags = (uint32_t{s.tr.type} << 8) | (uint32_t{s.tr.present} << 15);
  uc_x86_mmr tr{s.tr.selector, s.tr.base, s.tr.limit, tr_flags};
  RETURN_IF_ERROR(write(UC_X86_REG_TR, &tr, "TR"));
  if (!s.ldt.unusable) {
    const uint32_t ldt_flags = (uint32_t{s.ldt.type} << 8) | (uint32_t{s.ldt.present} << 15);
    uc_x86_mmr ldtr{s.ldt.selector, s.ldt.base, s.ldt.limit, ldt_flags};
    RETURN_IF_ERROR(write(UC_X86_REG_LDTR, &ldtr, "LDTR"));
  }
  for (int i = 0; i < kGprCount; ++i) RETURN_IF_ERROR(write(kGprRegs[i], &s.gpr[i], "a GPR"));
  RETURN_IF_ERROR(write(UC_X86_REG_RFLAGS, &s.rflags, "RFLAGS"));
  RETURN_IF_ERROR(write(UC_X86_REG_RIP, &s.rip, "RIP"));
  uint64_t v = s.fpu.fcw;
  RETURN_IF_ERROR(write(UC_X86_REG_FPCW, &v, "FPCW"));
  v = s.fpu.fsw;
  RETURN_IF_ERROR(write(UC_X86_REG_FPSW, &v, "FPSW"));
  v = s.fpu.ftw;
  RETURN_IF_ERROR(write(UC_X86_REG_FPTAG, &v, "FPTAG"));
  for (int i = 0; i < 8; ++i) RETURN_IF_ERROR(write(UC_X86_REG_ST0 + i, s.fpu.st[i].data(), "ST"));
  uint32_t mxcsr = s.fpu.mxcsr;
  RETURN_IF_ERROR(write(UC_X86_REG_MXCSR, &mxcsr, "MXCSR"));
  for (int i = 0; i < 16; ++i) {
    RETURN_IF_ERROR(write(UC_X86_REG_XMM0 + i, s.fpu.xmm[i].data(), "XMM"));
  }
  for (const Msr& m : s.msrs) {
    // RDTSC reads the host TSC on this engine: the TSC is not written.
    if (m.index == kMsrTsc) continue;
    uc_x86_msr msr{m.index, m.value};
    RETURN_IF_ERROR(write(UC_X86_REG_MSR, &msr, fmt::format("MSR {:#x}", m.index).c_str()));
  }
  return Status::Ok();
}

}  // namespace faultline::hv
