// Typed wrappers over the KVM ioctls: one function per ioctl, a Status or
// Result back with the ioctl's name and arguments as context. The only KVM
// code in the project that calls ioctl().
#pragma once

#include "src/sys/linux_abi.h"

#include <cstdint>
#include <span>
#include <vector>

#include "faultline/status.h"
#include "faultline/types.h"
#include "src/sys/mapping.h"
#include "src/sys/unique_fd.h"

namespace faultline::sys {

class KvmVm;
class KvmVcpu;

// /dev/kvm.
class KvmSystem {
 public:
  // Opens /dev/kvm and checks the API version. Errors say what to do when
  // the device is missing or not accessible.
  static Result<KvmSystem> Open(const char* path = "/dev/kvm");

  // KVM_CHECK_EXTENSION on /dev/kvm: 0 when unsupported.
  int CheckExtension(long capability) const;
  Result<int> VcpuMmapSize() const;
  Result<std::vector<kvm_cpuid_entry2>> SupportedCpuid() const;
  Result<std::vector<uint32_t>> MsrIndexList() const;
  Result<KvmVm> CreateVm() const;

  int fd() const { return fd_.get(); }

 private:
  explicit KvmSystem(UniqueFd fd) : fd_(std::move(fd)) {}
  UniqueFd fd_;
};

struct UserMemoryRegion {
  uint32_t slot = 0;   // address space in bits 16..31, slot id in 0..15
  uint32_t flags = 0;  // KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MEM_GUEST_MEMFD
  Gpa gpa;
  uint64_t size = 0;  // 0 deletes the slot
  Hva hva;
  int guest_memfd = -1;  // with KVM_MEM_GUEST_MEMFD
  uint64_t guest_memfd_offset = 0;
};

class KvmVm {
 public:
  KvmVm(KvmVm&&) = default;
  KvmVm& operator=(KvmVm&&) = default;

  int CheckExtension(long capability) const;
  Status EnableCap(uint32_t capability, uint64_t arg0 = 0, uint64_t arg1 = 0);

  // KVM_SET_USER_MEMORY_REGION, or KVM_SET_USER_MEMORY_REGION2 when the
  // region names a guest_memfd.
  Status SetUserMemoryRegion(const UserMemoryRegion& region);
  // KVM_GET_DIRTY_LOG into `bitmap` (one bit per page of the slot, rounded
  // up to 64 bits).
  Status GetDirtyLog(uint32_t slot, std::span<uint64_t> bitmap);
  // KVM_CLEAR_DIRTY_LOG: re-protects the pages set in `bitmap`, which covers
  // pages [first_page, first_page + num_pages) of the slot. first_page must
  // be a multiple of 64.
  Status ClearDirtyLog(uint32_t slot, uint64_t first_page, uint32_t num_pages,
                       std::span<uint64_t> bitmap);
  // KVM_RESET_DIRTY_RINGS: returns the number of entries reset.
  Result<int> ResetDirtyRings();

  Status CreateIrqchip();
  Status SetTssAddr(uint64_t gpa);
  Status SetIdentityMapAddr(uint64_t gpa);
  Status SetClock(uint64_t ns);
  Result<uint64_t> GetClock();

  Result<KvmVcpu> CreateVcpu(uint32_t id);

  int fd() const { return fd_.get(); }
  int vcpu_mmap_size() const { return vcpu_mmap_size_; }

 private:
  friend class KvmSystem;
  KvmVm(UniqueFd fd, int vcpu_mmap_size) : fd_(std::move(fd)), vcpu_mmap_size_(vcpu_mmap_size) {}
  UniqueFd fd_;
  int vcpu_mmap_size_;
};

// Variable-length structures with a fixed-size header, owned in a vector.
struct MsrEntry {
  uint32_t index;
  uint64_t data;
};

class KvmVcpu {
 public:
  KvmVcpu(KvmVcpu&&) = default;
  KvmVcpu& operator=(KvmVcpu&&) = default;

  uint32_t id() const { return id_; }
  int fd() const { return fd_.get(); }
  kvm_run* run() const { return reinterpret_cast<kvm_run*>(run_map_.data()); }

  // KVM_RUN. EINTR (a kick, or immediate_exit set) is returned as an error
  // with code EINTR; callers treat it as a normal exit.
  Status Run();

  Result<kvm_regs> GetRegs() const;
  Status SetRegs(const kvm_regs& regs);
  Result<kvm_sregs> GetSregs() const;
  Status SetSregs(const kvm_sregs& sregs);
  Result<kvm_fpu> GetFpu() const;
  Status SetFpu(const kvm_fpu& fpu);
  // KVM_GET_XSAVE2 (size from KVM_CAP_XSAVE2) or KVM_GET_XSAVE: raw bytes.
  Result<std::vector<uint8_t>> GetXsave(int xsave2_size) const;
  Status SetXsave(std::span<const uint8_t> xsave);
  Result<kvm_xcrs> GetXcrs() const;
  Status SetXcrs(const kvm_xcrs& xcrs);
  // Reads the MSRs named in `entries` (their data is filled in). Returns the
  // number read: KVM stops at the first MSR it cannot read.
  Result<size_t> GetMsrs(std::span<MsrEntry> entries) const;
  Result<size_t> SetMsrs(std::span<const MsrEntry> entries);
  Result<kvm_lapic_state> GetLapic() const;
  Status SetLapic(const kvm_lapic_state& lapic);
  Result<kvm_vcpu_events> GetVcpuEvents() const;
  Status SetVcpuEvents(const kvm_vcpu_events& events);
  Result<kvm_mp_state> GetMpState() const;
  Status SetMpState(const kvm_mp_state& state);
  Status SetCpuid(std::span<const kvm_cpuid_entry2> entries);
  Result<uint32_t> GetTscKhz() const;
  Status SetTscKhz(uint32_t khz);
  // Maps this vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING enabled on the VM
  // with `bytes` before the vCPU was created): an array of kvm_dirty_gfn.
  Result<Mapping> MapDirtyRing(uint32_t bytes) const;
  Status X86SetMce(const kvm_x86_mce& mce);
  Status X86SetupMce(uint64_t mcg_cap);

 private:
  friend class KvmVm;
  KvmVcpu(uint32_t id, UniqueFd fd, Mapping run_map)
      : id_(id), fd_(std::move(fd)), run_map_(std::move(run_map)) {}
  uint32_t id_;
  UniqueFd fd_;
  Mapping run_map_;
};

// Names of KVM exit reasons ("KVM_EXIT_MMIO"), for messages.
const char* KvmExitName(uint32_t exit_reason);

}  // namespace faultline::sys
