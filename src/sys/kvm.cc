#include "src/sys/kvm.h"

#include <fcntl.h>
#include <sys/ioctl.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "src/sys/linux_abi.h"

namespace faultline::sys {
namespace {

// ioctl() retried on EINTR only where the ioctl has no side effects worth
// reporting; KVM_RUN is handled separately because EINTR is its kick.
int Ioctl(int fd, unsigned long request, auto arg) {
  int r;
  do {
    r = ::ioctl(fd, request, arg);
  } while (r < 0 && errno == EINTR);
  return r;
}

template <typename T>
Result<T> GetStruct(int fd, unsigned long request, const char* name, uint32_t vcpu) {
  T value;
  std::memset(&value, 0, sizeof(value));
  if (Ioctl(fd, request, &value) < 0) return ErrnoError(errno, "{} vcpu {}", name, vcpu);
  return value;
}

template <typename T>
Status SetStruct(int fd, unsigned long request, const T& value, const char* name, uint32_t vcpu) {
  if (Ioctl(fd, request, &value) < 0) return ErrnoError(errno, "{} vcpu {}", name, vcpu);
  return Status::Ok();
}

// A kvm_msrs / kvm_cpuid2 style buffer: header plus `count` entries.
template <typename Header, typename Entry>
std::unique_ptr<uint8_t[]> VarStruct(size_t count) {
  size_t bytes = sizeof(Header) + count * sizeof(Entry);
  auto buffer = std::make_unique<uint8_t[]>(bytes);
  std::memset(buffer.get(), 0, bytes);
  return buffer;
}

}  // namespace

Result<KvmSystem> KvmSystem::Open(const char* path) {
  int fd = ::open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT) {
      return ErrnoError(err,
                        "{}: no KVM device — load the kvm module (modprobe kvm_intel, "
                        "kvm_amd or kvm_pvm) or run on a host with virtualization enabled",
                        path);
    }
    if (err == EACCES || err == EPERM) {
      return ErrnoError(err, "{}: permission denied — run as root or add the user to group kvm",
                        path);
    }
    return ErrnoError(err, "open {}", path);
  }
  KvmSystem system{UniqueFd(fd)};
  int version = Ioctl(fd, KVM_GET_API_VERSION, 0);
  if (version < 0) return ErrnoError(errno, "KVM_GET_API_VERSION on {}", path);
  if (version != KVM_API_VERSION) {
    return Error(
        "{}: KVM API version {} but Faultline needs {} — the kernel's KVM is too old "
        "or too new for this build",
        path, version, KVM_API_VERSION);
  }
  return system;
}

int KvmSystem::CheckExtension(long capability) const {
  int r = Ioctl(fd_.get(), KVM_CHECK_EXTENSION, capability);
  return r < 0 ? 0 : r;
}

Result<int> KvmSystem::VcpuMmapSize() const {
  int r = Ioctl(fd_.get(), KVM_GET_VCPU_MMAP_SIZE, 0);
  if (r < 0) return ErrnoError(errno, "KVM_GET_VCPU_MMAP_SIZE");
  return r;
}

Result<std::vector<kvm_cpuid_entry2>> KvmSystem::SupportedCpuid() const {
  for (size_t count = 64; count <= 4096; count *= 2) {
    auto buffer = VarStruct<kvm_cpuid2, kvm_cpuid_entry2>(count);
    auto* cpuid = reinterpret_cast<kvm_cpuid2*>(buffer.get());
    cpuid->nent = count;
    if (Ioctl(fd_.get(), KVM_GET_SUPPORTED_CPUID, cpuid) < 0) {
      if (errno == E2BIG) continue;
      return ErrnoError(errno, "KVM_GET_SUPPORTED_CPUID");
    }
    return std::vector<kvm_cpuid_entry2>(cpuid->entries, cpuid->entries + cpuid->nent);
  }
  return Error("KVM_GET_SUPPORTED_CPUID: more than 4096 entries");
}

Result<std::vector<uint32_t>> KvmSystem::MsrIndexList() const {
  kvm_msr_list probe{};
  if (Ioctl(fd_.get(), KVM_GET_MSR_INDEX_LIST, &probe) < 0 && errno != E2BIG) {
    return ErrnoError(errno, "KVM_GET_MSR_INDEX_LIST");
  }
  auto buffer = VarStruct<kvm_msr_list, uint32_t>(probe.nmsrs);
  auto* list = reinterpret_cast<kvm_msr_list*>(buffer.get());
  list->nmsrs = probe.nmsrs;
  if (Ioctl(fd_.get(), KVM_GET_MSR_INDEX_LIST, list) < 0) {
    return ErrnoError(errno, "KVM_GET_MSR_INDEX_LIST ({} MSRs)", probe.nmsrs);
  }
  return std::vector<uint32_t>(list->indices, list->indices + list->nmsrs);
}

Result<KvmVm> KvmSystem::CreateVm() const {
  ASSIGN_OR_RETURN(int mmap_size, VcpuMmapSize());
  int fd = Ioctl(fd_.get(), KVM_CREATE_VM, 0);
  if (fd < 0) return ErrnoError(errno, "KVM_CREATE_VM");
  return KvmVm(UniqueFd(fd), mmap_size);
}

int KvmVm::CheckExtension(long capability) const {
  int r = Ioctl(fd_.get(), KVM_CHECK_EXTENSION, capability);
  return r < 0 ? 0 : r;
}

Status KvmVm::EnableCap(uint32_t capability, uint64_t arg0, uint64_t arg1) {
  kvm_enable_cap cap{};
  cap.cap = capability;
  cap.args[0] = arg0;
  cap.args[1] = arg1;
  if (Ioctl(fd_.get(), KVM_ENABLE_CAP, &cap) < 0) {
    return ErrnoError(errno, "KVM_ENABLE_CAP {} ({:#x}, {:#x})", capability, arg0, arg1);
  }
  return Status::Ok();
}

Status KvmVm::SetUserMemoryRegion(const UserMemoryRegion& r) {
  if (r.flags & KVM_MEM_GUEST_MEMFD) {
    kvm_userspace_memory_region2 region{};
    region.slot = r.slot;
    region.flags = r.flags;
    region.guest_phys_addr = r.gpa.value;
    region.memory_size = r.size;
    region.userspace_addr = r.hva.value;
    region.guest_memfd = static_cast<uint32_t>(r.guest_memfd);
    region.guest_memfd_offset = r.guest_memfd_offset;
    if (Ioctl(fd_.get(), KVM_SET_USER_MEMORY_REGION2, &region) < 0) {
      return ErrnoError(errno,
                        "KVM_SET_USER_MEMORY_REGION2 slot {} gpa {:#x} size {:#x} guest_memfd {} "
                        "offset {:#x}",
                        r.slot, r.gpa.value, r.size, r.guest_memfd, r.guest_memfd_offset);
    }
    return Status::Ok();
  }
  kvm_userspace_memory_region region{};
  region.slot = r.slot;
  region.flags = r.flags;
  region.guest_phys_addr = r.gpa.value;
  region.memory_size = r.size;
  region.userspace_addr = r.hva.value;
  if (Ioctl(fd_.get(), KVM_SET_USER_MEMORY_REGION, &region) < 0) {
    return ErrnoError(errno, "KVM_SET_USER_MEMORY_REGION slot {} gpa {:#x} size {:#x} flags {:#x}",
                      r.slot, r.gpa.value, r.size, r.flags);
  }
  return Status::Ok();
}

Status KvmVm::GetDirtyLog(uint32_t slot, std::span<uint64_t> bitmap) {
  kvm_dirty_log log{};
  log.slot = slot;
  log.dirty_bitmap = bitmap.data();
  if (Ioctl(fd_.get(), KVM_GET_DIRTY_LOG, &log) < 0) {
    return ErrnoError(errno, "KVM_GET_DIRTY_LOG slot {}", slot);
  }
  return Status::Ok();
}

Status KvmVm::ClearDirtyLog(uint32_t slot, uint64_t first_page, uint32_t num_pages,
                            std::span<uint64_t> bitmap) {
  kvm_clear_dirty_log clear{};
  clear.slot = slot;
  clear.first_page = first_page;
  clear.num_pages = num_pages;
  clear.dirty_bitmap = bitmap.data();
  if (Ioctl(fd_.get(), KVM_CLEAR_DIRTY_LOG, &clear) < 0) {
    return ErrnoError(errno, "KVM_CLEAR_DIRTY_LOG slot {} pages [{}, +{})", slot, first_page,
                      num_pages);
  }
  return Status::Ok();
}

Result<int> KvmVm::ResetDirtyRings() {
  int r = Ioctl(fd_.get(), KVM_RESET_DIRTY_RINGS, 0);
  if (r < 0) return ErrnoError(errno, "KVM_RESET_DIRTY_RINGS");
  return r;
}

Status KvmVm::CreateIrqchip() {
  if (Ioctl(fd_.get(), KVM_CREATE_IRQCHIP, 0) < 0) return ErrnoError(errno, "KVM_CREATE_IRQCHIP");
  return Status::Ok();
}

Status KvmVm::SetTssAddr(uint64_t gpa) {
  if (Ioctl(fd_.get(), KVM_SET_TSS_ADDR, gpa) < 0) {
    return ErrnoError(errno, "KVM_SET_TSS_ADDR {:#x}", gpa);
  }
  return Status::Ok();
}

Status KvmVm::SetIdentityMapAddr(uint64_t gpa) {
  if (Ioctl(fd_.get(), KVM_SET_IDENTITY_MAP_ADDR, &gpa) < 0) {
    return ErrnoError(errno, "KVM_SET_IDENTITY_MAP_ADDR {:#x}", gpa);
  }
  return Status::Ok();
}

Status KvmVm::SetClock(uint64_t ns) {
  kvm_clock_data data{};
  data.clock = ns;
  if (Ioctl(fd_.get(), KVM_SET_CLOCK, &data) < 0) return ErrnoError(errno, "KVM_SET_CLOCK");
  return Status::Ok();
}

Result<uint64_t> KvmVm::GetClock() {
  kvm_clock_data data{};
  if (Ioctl(fd_.get(), KVM_GET_CLOCK, &data) < 0) return ErrnoError(errno, "KVM_GET_CLOCK");
  return static_cast<uint64_t>(data.clock);
}

Result<KvmVcpu> KvmVm::CreateVcpu(uint32_t id) {
  int fd = Ioctl(fd_.get(), KVM_CREATE_VCPU, static_cast<unsigned long>(id));
  if (fd < 0) return ErrnoError(errno, "KVM_CREATE_VCPU {}", id);
  UniqueFd vcpu_fd(fd);
  ASSIGN_OR_RETURN(Mapping run, Mapping::Map(vcpu_mmap_size_, PROT_READ | PROT_WRITE, MAP_SHARED,
                                             fd, 0, "kvm_run"));
  return KvmVcpu(id, std::move(vcpu_fd), std::move(run));
}

Status KvmVcpu::Run() {
  // No retry on EINTR: it is how a kick reaches the caller.
  if (::ioctl(fd_.get(), KVM_RUN, 0) < 0) return ErrnoError(errno, "KVM_RUN vcpu {}", id_);
  return Status::Ok();
}

Result<kvm_regs> KvmVcpu::GetRegs() const {
  return GetStruct<kvm_regs>(fd_.get(), KVM_GET_REGS, "KVM_GET_REGS", id_);
}
Status KvmVcpu::SetRegs(const kvm_regs& regs) {
  return SetStruct(fd_.get(), KVM_SET_REGS, regs, "KVM_SET_REGS", id_);
}
Result<kvm_sregs> KvmVcpu::GetSregs() const {
  return GetStruct<kvm_sregs>(fd_.get(), KVM_GET_SREGS, "KVM_GET_SREGS", id_);
}
Status KvmVcpu::SetSregs(const kvm_sregs& sregs) {
  return SetStruct(fd_.get(), KVM_SET_SREGS, sregs, "KVM_SET_SREGS", id_);
}
Result<kvm_fpu> KvmVcpu::GetFpu() const {
  return GetStruct<kvm_fpu>(fd_.get(), KVM_GET_FPU, "KVM_GET_FPU", id_);
}
Status KvmVcpu::SetFpu(const kvm_fpu& fpu) {
  return SetStruct(fd_.get(), KVM_SET_FPU, fpu, "KVM_SET_FPU", id_);
}
Result<kvm_xcrs> KvmVcpu::GetXcrs() const {
  return GetStruct<kvm_xcrs>(fd_.get(), KVM_GET_XCRS, "KVM_GET_XCRS", id_);
}
Status KvmVcpu::SetXcrs(const kvm_xcrs& xcrs) {
  return SetStruct(fd_.get(), KVM_SET_XCRS, xcrs, "KVM_SET_XCRS", id_);
}
Result<kvm_lapic_state> KvmVcpu::GetLapic() const {
  return GetStruct<kvm_lapic_state>(fd_.get(), KVM_GET_LAPIC, "KVM_GET_LAPIC", id_);
}
Status KvmVcpu::SetLapic(const kvm_lapic_state& lapic) {
  return SetStruct(fd_.get(), KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC", id_);
}
Result<kvm_vcpu_events> KvmVcpu::GetVcpuEvents() const {
  return GetStruct<kvm_vcpu_events>(fd_.get(), KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", id_);
}
Status KvmVcpu::SetVcpuEvents(const kvm_vcpu_events& events) {
  return SetStruct(fd_.get(), KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS", id_);
}
Result<kvm_mp_state> KvmVcpu::GetMpState() const {
  return GetStruct<kvm_mp_state>(fd_.get(), KVM_GET_MP_STATE, "KVM_GET_MP_STATE", id_);
}
Status KvmVcpu::SetMpState(const kvm_mp_state& state) {
  return SetStruct(fd_.get(), KVM_SET_MP_STATE, state, "KVM_SET_MP_STATE", id_);
}
Result<Mapping> KvmVcpu::MapDirtyRing(uint32_t bytes) const {
  return Mapping::Map(bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(),
                      KVM_DIRTY_LOG_PAGE_OFFSET * kPageSize, "KVM dirty ring");
}

Status KvmVcpu::X86SetMce(const kvm_x86_mce& mce) {
  return SetStruct(fd_.get(), KVM_X86_SET_MCE, mce, "KVM_X86_SET_MCE", id_);
}
Status KvmVcpu::X86SetupMce(uint64_t mcg_cap) {
  return SetStruct(fd_.get(), KVM_X86_SETUP_MCE, mcg_cap, "KVM_X86_SETUP_MCE", id_);
}

Result<std::vector<uint8_t>> KvmVcpu::GetXsave(int xsave2_size) const {
  size_t size = xsave2_size > 0 ? static_cast<size_t>(xsave2_size) : sizeof(kvm_xsave);
  std::vector<uint8_t> bytes(std::max(size, sizeof(kvm_xsave)));
  unsigned long request = xsave2_size > 0 ? KVM_GET_XSAVE2 : KVM_GET_XSAVE;
  if (Ioctl(fd_.get(), request, bytes.data()) < 0) {
    return ErrnoError(errno, "{} vcpu {}", xsave2_size > 0 ? "KVM_GET_XSAVE2" : "KVM_GET_XSAVE",
                      id_);
  }
  return bytes;
}

Status KvmVcpu::SetXsave(std::span<const uint8_t> xsave) {
  if (xsave.size() < sizeof(kvm_xsave)) {
    return Error("KVM_SET_XSAVE vcpu {}: {} bytes, need at least {}", id_, xsave.size(),
                 sizeof(kvm_xsave));
  }
  if (Ioctl(fd_.get(), KVM_SET_XSAVE, xsave.data()) < 0) {
    return ErrnoError(errno, "KVM_SET_XSAVE vcpu {}", id_);
  }
  return Status::Ok();
}

Result<size_t> KvmVcpu::GetMsrs(std::span<MsrEntry> entries) const {
  auto buffer = VarStruct<kvm_msrs, kvm_msr_entry>(entries.size());
  auto* msrs = reinterpret_cast<kvm_msrs*>(buffer.get());
  msrs->nmsrs = entries.size();
  for (size_t i = 0; i < entries.size(); ++i) msrs->entries[i].index = entries[i].index;
  int n = Ioctl(fd_.get(), KVM_GET_MSRS, msrs);
  if (n < 0) return ErrnoError(errno, "KVM_GET_MSRS vcpu {} ({} MSRs)", id_, entries.size());
  for (int i = 0; i < n; ++i) entries[i].data = msrs->entries[i].data;
  return static_cast<size_t>(n);
}

Result<size_t> KvmVcpu::SetMsrs(std::span<const MsrEntry> entries) {
  auto buffer = VarStruct<kvm_msrs, kvm_msr_entry>(entries.size());
  auto* msrs = reinterpret_cast<kvm_msrs*>(buffer.get());
  msrs->nmsrs = entries.size();
  for (size_t i = 0; i < entries.size(); ++i) {
    msrs->entries[i].index = entries[i].index;
    msrs->entries[i].data = entries[i].data;
  }
  int n = Ioctl(fd_.get(), KVM_SET_MSRS, msrs);
  if (n < 0) return ErrnoError(errno, "KVM_SET_MSRS vcpu {} ({} MSRs)", id_, entries.size());
  return static_cast<size_t>(n);
}

Status KvmVcpu::SetCpuid(std::span<const kvm_cpuid_entry2> entries) {
  auto buffer = VarStruct<kvm_cpuid2, kvm_cpuid_entry2>(entries.size());
  auto* cpuid = reinterpret_cast<kvm_cpuid2*>(buffer.get());
  cpuid->nent = entries.size();
  std::memcpy(cpuid->entries, entries.data(), entries.size_bytes());
  if (Ioctl(fd_.get(), KVM_SET_CPUID2, cpuid) < 0) {
    return ErrnoError(errno, "KVM_SET_CPUID2 vcpu {} ({} entries)", id_, entries.size());
  }
  return Status::Ok();
}

Result<uint32_t> KvmVcpu::GetTscKhz() const {
  int r = Ioctl(fd_.get(), KVM_GET_TSC_KHZ, 0);
  if (r < 0) return ErrnoError(errno, "KVM_GET_TSC_KHZ vcpu {}", id_);
  return static_cast<uint32_t>(r);
}

Status KvmVcpu::SetTscKhz(uint32_t khz) {
  if (Ioctl(fd_.get(), KVM_SET_TSC_KHZ, static_cast<unsigned long>(khz)) < 0) {
    return ErrnoError(errno, "KVM_SET_TSC_KHZ vcpu {} {} kHz", id_, khz);
  }
  return Status::Ok();
}

const char* KvmExitName(uint32_t exit_reason) {
  switch (exit_reason) {
#define FL_EXIT(name) \
  case name:          \
    return #name;
    FL_EXIT(KVM_EXIT_UNKNOWN)
    FL_EXIT(KVM_EXIT_EXCEPTION)
    FL_EXIT(KVM_EXIT_IO)
    FL_EXIT(KVM_EXIT_HYPERCALL)
    FL_EXIT(KVM_EXIT_DEBUG)
    FL_EXIT(KVM_EXIT_HLT)
    FL_EXIT(KVM_EXIT_MMIO)
    FL_EXIT(KVM_EXIT_IRQ_WINDOW_OPEN)
    FL_EXIT(KVM_EXIT_SHUTDOWN)
    FL_EXIT(KVM_EXIT_FAIL_ENTRY)
    FL_EXIT(KVM_EXIT_INTR)
    FL_EXIT(KVM_EXIT_SET_TPR)
    FL_EXIT(KVM_EXIT_TPR_ACCESS)
    FL_EXIT(KVM_EXIT_NMI)
    FL_EXIT(KVM_EXIT_INTERNAL_ERROR)
    FL_EXIT(KVM_EXIT_SYSTEM_EVENT)
    FL_EXIT(KVM_EXIT_X86_RDMSR)
    FL_EXIT(KVM_EXIT_X86_WRMSR)
    FL_EXIT(KVM_EXIT_DIRTY_RING_FULL)
#undef FL_EXIT
    default:
      return "KVM_EXIT_?";
  }
}

}  // namespace faultline::sys
