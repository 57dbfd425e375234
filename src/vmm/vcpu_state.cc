#include "src/vmm/vcpu_state.h"

#include <cstring>

namespace faultline::vmm {
namespace {

constexpr uint32_t kMagic = 0x5356'4c46;  // "FLVS"
constexpr uint32_t kVersion = 1;
constexpr uint32_t kMaxMsrs = 4096;
constexpr uint32_t kMaxXsave = 1 << 20;

enum Tag : uint32_t {
  kRegs = 1,
  kSregs,
  kFpu,
  kXsave,
  kXcrs,
  kMsrs,
  kLapic,
  kEvents,
  kMpState,
};

class Writer {
 public:
  void U32(uint32_t v) { Raw(&v, sizeof(v)); }
  void U64(uint64_t v) { Raw(&v, sizeof(v)); }
  void Raw(const void* p, size_t n) {
    auto* b = static_cast<const uint8_t*>(p);
    out_.insert(out_.end(), b, b + n);
  }
  void Section(uint32_t tag, const void* p, size_t n) {
    U32(tag);
    U32(static_cast<uint32_t>(n));
    Raw(p, n);
  }
  std::vector<uint8_t> Take() { return std::move(out_); }

 private:
  std::vector<uint8_t> out_;
};

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> in) : in_(in) {}
  bool U32(uint32_t* v) { return Raw(v, sizeof(*v)); }
  bool U64(uint64_t* v) { return Raw(v, sizeof(*v)); }
  bool Raw(void* p, size_t n) {
    if (in_.size() - pos_ < n) return false;
    std::memcpy(p, in_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  bool done() const { return pos_ == in_.size(); }

 private:
  std::span<const uint8_t> in_;
  size_t pos_ = 0;
};

template <typename T>
Status ReadFixed(Reader& r, uint32_t len, T* out, const char* what) {
  if (len != sizeof(T))
    return Error("vCPU state: {} section is {} bytes, expected {}", what, len, sizeof(T));
  if (!r.Raw(out, sizeof(T))) return Error("vCPU state: truncated {} section", what);
  return Status::Ok();
}

}  // namespace

std::vector<uint8_t> VcpuState::Serialize() const {
  Writer w;
  w.U32(kMagic);
  w.U32(kVersion);
  w.U32(id);
  w.Section(kRegs, &regs, sizeof(regs));
  w.Section(kSregs, &sregs, sizeof(sregs));
  w.Section(kFpu, &fpu, sizeof(fpu));
  if (!xsave.empty()) w.Section(kXsave, xsave.data(), xsave.size());
  if (has_xcrs) w.Section(kXcrs, &xcrs, sizeof(xcrs));
  w.U32(kMsrs);
  w.U32(static_cast<uint32_t>(msrs.size() * 12));
  for (const sys::MsrEntry& m : msrs) {
    w.U32(m.index);
    w.U64(m.data);
  }
  if (has_lapic) w.Section(kLapic, &lapic, sizeof(lapic));
  w.Section(kEvents, &events, sizeof(events));
  w.Section(kMpState, &mp_state, sizeof(mp_state));
  return w.Take();
}

Result<VcpuState> VcpuState::Deserialize(std::span<const uint8_t> bytes) {
  Reader r(bytes);
  uint32_t magic, version;
  VcpuState s;
  if (!r.U32(&magic) || !r.U32(&version) || !r.U32(&s.id)) {
    return Error("vCPU state: truncated header ({} bytes)", bytes.size());
  }
  if (magic != kMagic) return Error("vCPU state: bad magic {:#x}", magic);
  if (version != kVersion) {
    return Error("vCPU state: version {}, this build reads version {}", version, kVersion);
  }
  uint32_t seen = 0;
  while (!r.done()) {
    uint32_t tag, len;
    if (!r.U32(&tag) || !r.U32(&len)) return Error("vCPU state: truncated section header");
    if (tag >= 32 || (seen & (1u << tag)))
      return Error("vCPU state: bad or repeated section {}", tag);
    seen |= 1u << tag;
    switch (tag) {
      case kRegs:
        RETURN_IF_ERROR(ReadFixed(r, len, &s.regs, "regs"));
        break;
      case kSregs:
        RETURN_IF_ERROR(ReadFixed(r, len, &s.sregs, "sregs"));
        break;
      case kFpu:
        RETURN_IF_ERROR(ReadFixed(r, len, &s.fpu, "fpu"));
        break;
      case kXsave:
        if (len < sizeof(kvm_xsave) || len > kMaxXsave) {
          return Error("vCPU state: xsave section of {} bytes", len);
        }
        s.xsave.resize(len);
        if (!r.Raw(s.xsave.data(), len)) return Error("vCPU state: truncated xsave section");
        break;
      case kXcrs:
        RETURN_IF_ERROR(ReadFixed(r, len, &s.xcrs, "xcrs"));
        s.has_xcrs = true;
        break;
      case kMsrs: {
        if (len % 12 != 0 || len / 12 > kMaxMsrs) {
          return Error("vCPU state: MSR section of {} bytes", len);
        }
        s.msrs.resize(len / 12);
        for (sys::MsrEntry& m : s.msrs) {
          if (!r.U32(&m.index) || !r.U64(&m.data)) return Error("vCPU state: truncated MSRs");
        }
        break;
      }
      case kLapic:
        RETURN_IF_ERROR(ReadFixed(r, len, &s.lapic, "lapic"));
        s.has_lapic = true;
        break;
      case kEvents:
        RETURN_IF_ERROR(ReadFixed(r, len, &s.events, "events"));
        break;
      case kMpState:
        RETURN_IF_ERROR(ReadFixed(r, len, &s.mp_state, "mp_state"));
        break;
      default:
        return Error("vCPU state: unknown section {}", tag);
    }
  }
  constexpr uint32_t kRequired = (1u << kRegs) | (1u << kSregs) | (1u << kFpu) | (1u << kMsrs) |
                                 (1u << kEvents) | (1u << kMpState);
  if ((seen & kRequired) != kRequired) return Error("vCPU state: missing sections");
  return s;
}

void FilterReadableMsrs(const sys::KvmVcpu& vcpu, VcpuStateSupport& support) {
  std::vector<uint32_t> readable;
  for (uint32_t index : support.msr_indices) {
    sys::MsrEntry entry{index, 0};
    Result<size_t> n = vcpu.GetMsrs({&entry, 1});
    if (n.has_value() && *n == 1) readable.push_back(index);
  }
  support.msr_indices = std::move(readable);
}

Result<VcpuState> CaptureVcpuState(const sys::KvmVcpu& vcpu, const VcpuStateSupport& support) {
  VcpuState s;
  s.id = vcpu.id();
  // Events first: KVM reports a pending exception there, and reading the
  // rest does not change it.
  ASSIGN_OR_RETURN(s.events, vcpu.GetVcpuEvents());
  ASSIGN_OR_RETURN(s.mp_state, vcpu.GetMpState());
  ASSIGN_OR_RETURN(s.regs, vcpu.GetRegs());
  ASSIGN_OR_RETURN(s.sregs, vcpu.GetSregs());
  ASSIGN_OR_RETURN(s.fpu, vcpu.GetFpu());
  ASSIGN_OR_RETURN(s.xsave, vcpu.GetXsave(support.xsave2_size));
  if (support.xcrs) {
    ASSIGN_OR_RETURN(s.xcrs, vcpu.GetXcrs());
    s.has_xcrs = true;
  }
  s.msrs.reserve(support.msr_indices.size());
  for (uint32_t index : support.msr_indices) s.msrs.push_back({index, 0});
  ASSIGN_OR_RETURN(size_t n, vcpu.GetMsrs(s.msrs));
  if (n != s.msrs.size()) {
    return Error("KVM_GET_MSRS vcpu {}: read {} of {} MSRs (stopped at {:#x})", vcpu.id(), n,
                 s.msrs.size(), s.msrs[n].index);
  }
  if (support.lapic) {
    ASSIGN_OR_RETURN(s.lapic, vcpu.GetLapic());
    s.has_lapic = true;
  }
  return s;
}

Status RestoreVcpuState(sys::KvmVcpu& vcpu, const VcpuState& s) {
  // Order matters: special registers (CR0/CR4/EFER) before XSAVE and the
  // MSRs that depend on them; events and MP state last, since setting
  // registers can clear pending events.
  RETURN_IF_ERROR(vcpu.SetSregs(s.sregs));
  RETURN_IF_ERROR(vcpu.SetRegs(s.regs));
  if (s.has_xcrs) RETURN_IF_ERROR(vcpu.SetXcrs(s.xcrs));
  if (!s.xsave.empty()) {
    RETURN_IF_ERROR(vcpu.SetXsave(s.xsave));
  } else {
    RETURN_IF_ERROR(vcpu.SetFpu(s.fpu));
  }
  ASSIGN_OR_RETURN(size_t n, vcpu.SetMsrs(s.msrs));
  if (n != s.msrs.size()) {
    return Error("KVM_SET_MSRS vcpu {}: wrote {} of {} MSRs (stopped at {:#x})", vcpu.id(), n,
                 s.msrs.size(), s.msrs[n].index);
  }
  if (s.has_lapic) RETURN_IF_ERROR(vcpu.SetLapic(s.lapic));
  RETURN_IF_ERROR(vcpu.SetVcpuEvents(s.events));
  RETURN_IF_ERROR(vcpu.SetMpState(s.mp_state));
  return Status::Ok();
}

}  // namespace faultline::vmm
