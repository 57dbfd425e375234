#include "src/hypervisor/vcpu_state.h"

#include <fmt/format.h>

#include <cstring>

namespace faultline::hv {
namespace {

constexpr uint32_t kMagic = 0x5356'4c46;  // "FLVS"
constexpr uint32_t kMaxMsrs = 4096;
constexpr uint32_t kMaxBlob = 1 << 20;

enum Tag : uint32_t {
  kCore = 1,  // GPRs, RIP, RFLAGS, segments, tables, CRs, EFER, APIC base
  kFpu,
  kMsrs,
  kXsave,
  kXcr0,
  kLapic,
  kEvents,
  kMpState,
  kEnd = 31,  // last, empty: a state cut at a section boundary is still an error
};

class Writer {
 public:
  void U8(uint8_t v) { Raw(&v, 1); }
  void U16(uint16_t v) { Raw(&v, 2); }
  void U32(uint32_t v) { Raw(&v, 4); }
  void U64(uint64_t v) { Raw(&v, 8); }
  void Raw(const void* p, size_t n) {
    auto* b = static_cast<const uint8_t*>(p);
    out_.insert(out_.end(), b, b + n);
  }
  // A section: tag, then length, then what `body` writes.
  template <typename Fn>
  void Section(uint32_t tag, Fn&& body) {
    U32(tag);
    const size_t length_at = out_.size();
    U32(0);
    body();
    const auto length = static_cast<uint32_t>(out_.size() - length_at - 4);
    std::memcpy(out_.data() + length_at, &length, 4);
  }
  void Segment(const hv::Segment& s) {
    U64(s.base);
    U32(s.limit);
    U16(s.selector);
    for (uint8_t b : {s.type, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable}) U8(b);
  }
  void Table(const DescriptorTable& t) {
    U64(t.base);
    U16(t.limit);
  }
  std::vector<uint8_t> Take() { return std::move(out_); }

 private:
  std::vector<uint8_t> out_;
};

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> in) : in_(in) {}
  bool U8(uint8_t* v) { return Raw(v, 1); }
  bool U16(uint16_t* v) { return Raw(v, 2); }
  bool U32(uint32_t* v) { return Raw(v, 4); }
  bool U64(uint64_t* v) { return Raw(v, 8); }
  bool Raw(void* p, size_t n) {
    if (in_.size() - pos_ < n) return false;
    std::memcpy(p, in_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  bool Segment(hv::Segment* s) {
    bool ok = U64(&s->base) && U32(&s->limit) && U16(&s->selector);
    for (uint8_t* b :
         {&s->type, &s->present, &s->dpl, &s->db, &s->s, &s->l, &s->g, &s->avl, &s->unusable}) {
      ok = ok && U8(b);
    }
    return ok;
  }
  bool Table(DescriptorTable* t) { return U64(&t->base) && U16(&t->limit); }
  size_t pos() const { return pos_; }
  bool done() const { return pos_ == in_.size(); }

 private:
  std::span<const uint8_t> in_;
  size_t pos_ = 0;
};

Status ReadBlob(Reader& r, uint32_t len, std::vector<uint8_t>* out, const char* what) {
  if (len > kMaxBlob) return Error("vCPU state: {} section of {} bytes", what, len);
  out->resize(len);
  if (!r.Raw(out->data(), len)) return Error("vCPU state: truncated {} section", what);
  return Status::Ok();
}

}  // namespace

uint64_t VcpuState::GetMsr(uint32_t msr_index, uint64_t fallback) const {
  for (const hv::Msr& m : msrs) {
    if (m.index == msr_index) return m.value;
  }
  return fallback;
}

void VcpuState::SetMsr(uint32_t msr_index, uint64_t value) {
  for (hv::Msr& m : msrs) {
    if (m.index == msr_index) {
      m.value = value;
      return;
    }
  }
  msrs.push_back({msr_index, value});
}

std::vector<uint8_t> VcpuState::Serialize() const {
  Writer w;
  w.U32(kMagic);
  w.U32(kVersion);
  w.U32(index);
  w.Section(kCore, [&] {
    for (uint64_t r : gpr) w.U64(r);
    w.U64(rip);
    w.U64(rflags);
    for (const Segment* s : {&cs, &ds, &es, &fs, &gs, &ss, &tr, &ldt}) w.Segment(*s);
    w.Table(gdt);
    w.Table(idt);
    for (uint64_t v : {cr0, cr2, cr3, cr4, cr8, efer, apic_base}) w.U64(v);
  });
  w.Section(kFpu, [&] {
    for (const auto& st : fpu.st) w.Raw(st.data(), st.size());
    w.U16(fpu.fcw);
    w.U16(fpu.fsw);
    w.U8(fpu.ftw);
    w.U16(fpu.last_opcode);
    w.U64(fpu.last_ip);
    w.U64(fpu.last_dp);
    for (const auto& x : fpu.xmm) w.Raw(x.data(), x.size());
    w.U32(fpu.mxcsr);
  });
  w.Section(kMsrs, [&] {
    for (const hv::Msr& m : msrs) {
      w.U32(m.index);
      w.U64(m.value);
    }
  });
  if (!xsave.empty()) w.Section(kXsave, [&] { w.Raw(xsave.data(), xsave.size()); });
  if (has_xcr0) w.Section(kXcr0, [&] { w.U64(xcr0); });
  if (!lapic.empty()) w.Section(kLapic, [&] { w.Raw(lapic.data(), lapic.size()); });
  if (!events.empty()) w.Section(kEvents, [&] { w.Raw(events.data(), events.size()); });
  if (!mp_state.empty()) w.Section(kMpState, [&] { w.Raw(mp_state.data(), mp_state.size()); });
  w.Section(kEnd, [] {});
  return w.Take();
}

namespace {

bool ReadCore(Reader& r, VcpuState& s) {
  bool ok = true;
  for (uint64_t& g : s.gpr) ok = ok && r.U64(&g);
  ok = ok && r.U64(&s.rip) && r.U64(&s.rflags);
  for (Segment* seg : {&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt}) {
    ok = ok && r.Segment(seg);
  }
  ok = ok && r.Table(&s.gdt) && r.Table(&s.idt);
  for (uint64_t* v : {&s.cr0, &s.cr2, &s.cr3, &s.cr4, &s.cr8, &s.efer, &s.apic_base}) {
    ok = ok && r.U64(v);
  }
  return ok;
}

bool ReadFpu(Reader& r, VcpuState& s) {
  bool ok = true;
  for (auto& st : s.fpu.st) ok = ok && r.Raw(st.data(), st.size());
  ok = ok && r.U16(&s.fpu.fcw) && r.U16(&s.fpu.fsw) && r.U8(&s.fpu.ftw) &&
       r.U16(&s.fpu.last_opcode) && r.U64(&s.fpu.last_ip) && r.U64(&s.fpu.last_dp);
  for (auto& x : s.fpu.xmm) ok = ok && r.Raw(x.data(), x.size());
  return ok && r.U32(&s.fpu.mxcsr);
}

// Reads the body of section `tag`, `len` bytes long, into `s`; the caller
// has read its header and checks that exactly `len` bytes were consumed.
Status ReadSection(Reader& r, uint32_t tag, uint32_t len, VcpuState& s) {
  bool ok = true;
  switch (tag) {
    case kCore:
      ok = ReadCore(r, s);
      break;
    case kFpu:
      ok = ReadFpu(r, s);
      break;
    case kMsrs:
      if (len % 12 != 0 || len / 12 > kMaxMsrs) {
        return Error("vCPU state: MSR section of {} bytes", len);
      }
      s.msrs.resize(len / 12);
      for (hv::Msr& m : s.msrs) ok = ok && r.U32(&m.index) && r.U64(&m.value);
      break;
    case kXsave:
      return ReadBlob(r, len, &s.xsave, "xsave");
    case kXcr0:
      ok = r.U64(&s.xcr0);
      s.has_xcr0 = true;
      break;
    case kLapic:
      return ReadBlob(r, len, &s.lapic, "lapic");
    case kEvents:
      return ReadBlob(r, len, &s.events, "events");
    case kMpState:
      return ReadBlob(r, len, &s.mp_state, "mp_state");
    default:
      return Error("vCPU state: unknown section {}", tag);
  }
  if (!ok) return Error("vCPU state: truncated section {}", tag);
  return Status::Ok();
}

}  // namespace

Result<VcpuState> VcpuState::Deserialize(std::span<const uint8_t> bytes) {
  Reader r(bytes);
  uint32_t magic, version;
  VcpuState s;
  if (!r.U32(&magic) || !r.U32(&version) || !r.U32(&s.index)) {
    return Error("vCPU state: truncated header ({} bytes)", bytes.size());
  }
  if (magic != kMagic) return Error("vCPU state: bad magic {:#x}", magic);
  if (version != kVersion) {
    return Error("vCPU state: version {}, this build reads version {}", version, kVersion);
  }
  uint32_t seen = 0;
  for (;;) {
    uint32_t tag, len;
    if (r.done()) return Error("vCPU state: truncated ({} bytes, no end section)", bytes.size());
    if (!r.U32(&tag) || !r.U32(&len)) return Error("vCPU state: truncated section header");
    if (tag == kEnd) {
      if (len != 0 || !r.done()) return Error("vCPU state: bytes after the end section");
      break;
    }
    if (tag >= 32 || (seen & (1u << tag))) {
      return Error("vCPU state: bad or repeated section {}", tag);
    }
    seen |= 1u << tag;
    const size_t start = r.pos();
    RETURN_IF_ERROR(ReadSection(r, tag, len, s));
    if (r.pos() - start != len) {
      return Error("vCPU state: section {} is {} bytes, its contents {}", tag, len,
                   r.pos() - start);
    }
  }
  constexpr uint32_t kRequired = (1u << kCore) | (1u << kFpu) | (1u << kMsrs);
  if ((seen & kRequired) != kRequired) return Error("vCPU state: missing sections");
  return s;
}

std::string FormatRegisters(const VcpuState& s) {
  const auto& g = s.gpr;
  return fmt::format(
      "  rip={:#018x} rsp={:#018x} rflags={:#x} cs={:#x} (dpl {}) ss={:#x}\n"
      "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n"
      "  rsi={:#018x} rdi={:#018x} rbp={:#018x} r8={:#018x}\n"
      "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
      s.rip, g[kRsp], s.rflags, s.cs.selector, s.cs.dpl, s.ss.selector, g[kRax], g[kRbx], g[kRcx],
      g[kRdx], g[kRsi], g[kRdi], g[kRbp], g[kR8], s.cr0, s.cr2, s.cr3, s.cr4, s.efer);
}

}  // namespace faultline::hv
