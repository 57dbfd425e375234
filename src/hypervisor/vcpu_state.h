// VcpuState: everything needed to continue an x86-64 vCPU elsewhere, as one
// explicit, versioned register set that both accelerators read and write:
// general registers, RIP and RFLAGS, segments with their hidden parts,
// descriptor tables, control registers and EFER, the MSRs the guest uses
// (the TSC among them), and the x87/SSE state. What only KVM has (the full
// XSAVE area and XCR0, the in-kernel local APIC, pending events, the MP
// state) rides in optional fields; a migration between accelerators is
// refused before any state is sent, so they never meet the other side.
//
// Serialises to a self-describing little-endian byte string ("FLVS", version
// 2): sections with a tag and a length, each read with bounds checks.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "faultline/status.h"

namespace faultline::hv {

struct Segment {
  uint64_t base = 0;
  uint32_t limit = 0;
  uint16_t selector = 0;
  uint8_t type = 0;  // descriptor type (4 bits)
  uint8_t present = 0, dpl = 0, db = 0, s = 0, l = 0, g = 0, avl = 0;
  uint8_t unusable = 0;
  friend bool operator==(const Segment&, const Segment&) = default;
};

struct DescriptorTable {
  uint64_t base = 0;
  uint16_t limit = 0;
  friend bool operator==(const DescriptorTable&, const DescriptorTable&) = default;
};

struct Msr {
  uint32_t index = 0;
  uint64_t value = 0;
  friend bool operator==(const Msr&, const Msr&) = default;
};

// The x87 and SSE state (the legacy FXSAVE area, field by field).
struct FpuState {
  std::array<std::array<uint8_t, 16>, 8> st{};  // ST0..ST7 (80 bits, padded)
  uint16_t fcw = 0x37f, fsw = 0;
  uint8_t ftw = 0;  // abridged tag word
  uint16_t last_opcode = 0;
  uint64_t last_ip = 0, last_dp = 0;
  std::array<std::array<uint8_t, 16>, 16> xmm{};
  uint32_t mxcsr = 0x1f80;
  friend bool operator==(const FpuState&, const FpuState&) = default;
};

// General registers in the x86 encoding order.
enum Gpr : int { kRax, kRcx, kRdx, kRbx, kRsp, kRbp, kRsi, kRdi, kR8, kR9, kR10, kR11,
                 kR12, kR13, kR14, kR15, kGprCount };

inline constexpr uint32_t kMsrTsc = 0x10;
inline constexpr uint32_t kMsrEfer = 0xc0000080;
inline constexpr uint32_t kMsrFsBase = 0xc0000100;
inline constexpr uint32_t kMsrGsBase = 0xc0000101;
inline constexpr uint32_t kMsrKernelGsBase = 0xc0000102;

struct VcpuState {
  static constexpr uint32_t kVersion = 2;

  uint32_t index = 0;
  std::array<uint64_t, kGprCount> gpr{};
  uint64_t rip = 0, rflags = 0x2;
  Segment cs, ds, es, fs, gs, ss, tr, ldt;
  DescriptorTable gdt, idt;
  uint64_t cr0 = 0, cr2 = 0, cr3 = 0, cr4 = 0, cr8 = 0;
  uint64_t efer = 0;
  uint64_t apic_base = 0;
  FpuState fpu;
  std::vector<hv::Msr> msrs;  // includes IA32_TSC where the accelerator has it

  // KVM only (empty or false elsewhere).
  std::vector<uint8_t> xsave;  // the whole XSAVE area (supersedes `fpu`)
  bool has_xcr0 = false;
  uint64_t xcr0 = 0;
  std::vector<uint8_t> lapic;     // the local APIC's register page (1 KiB)
  std::vector<uint8_t> events;    // struct kvm_vcpu_events
  std::vector<uint8_t> mp_state;  // struct kvm_mp_state

  uint64_t GetMsr(uint32_t index, uint64_t fallback = 0) const;
  void SetMsr(uint32_t index, uint64_t value);

  std::vector<uint8_t> Serialize() const;
  static Result<VcpuState> Deserialize(std::span<const uint8_t> bytes);
};

// The registers for an error message: RIP, RSP, flags, segments, GPRs, CRs.
std::string FormatRegisters(const VcpuState& s);

}  // namespace faultline::hv
