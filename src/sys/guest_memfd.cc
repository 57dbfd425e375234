#include "src/sys/guest_memfd.h"

#include <fcntl.h>
#include <sys/ioctl.h>

#include <cerrno>

#include "faultline/types.h"
#include "src/sys/kvm.h"
#include "src/sys/linux_abi.h"

namespace faultline::sys {
namespace {

static_assert(kGuestMemfdFlagMmap == GUEST_MEMFD_FLAG_MMAP);
static_assert(kGuestMemfdFlagInitShared == GUEST_MEMFD_FLAG_INIT_SHARED);

// KVM_CHECK_EXTENSION on a VM fd: 0 when unsupported, -1 when `vm_fd` is
// not a KVM fd at all.
int CheckVmExtension(int vm_fd, long capability) {
  const int ret = ::ioctl(vm_fd, KVM_CHECK_EXTENSION, capability);
  return ret < 0 ? -1 : ret;
}

constexpr const char* kNoGuestMemfd =
    "guest_memfd is not supported by this kernel or VM type (KVM_CAP_GUEST_MEMFD is 0; needs "
    "Linux 6.8+ and a KVM that offers it, which a nested KVM may not); back the RAM with memfd "
    "instead";

}  // namespace

uint64_t SupportedGuestMemfdFlags(int vm_fd) {
  const int flags = CheckVmExtension(vm_fd, KVM_CAP_GUEST_MEMFD_FLAGS);
  return flags > 0 ? static_cast<uint64_t>(flags) : 0;
}

Result<UniqueFd> CreateGuestMemfd(int vm_fd, uint64_t size, uint64_t flags) {
  if (size == 0 || !IsAligned(size, kPageSize)) {
    return Error("KVM_CREATE_GUEST_MEMFD: size {} is not a non-zero multiple of {}", size,
                 kPageSize);
  }
  kvm_create_guest_memfd arg = {};
  arg.size = size;
  arg.flags = flags;
  const int fd = ::ioctl(vm_fd, KVM_CREATE_GUEST_MEMFD, &arg);
  if (fd >= 0) return UniqueFd(fd);
  const int err = errno;
  const int has_gmem = CheckVmExtension(vm_fd, KVM_CAP_GUEST_MEMFD);
  if (has_gmem < 0) {
    return ErrnoError(err, "KVM_CREATE_GUEST_MEMFD: fd {} is not a KVM VM fd", vm_fd);
  }
  if (has_gmem == 0) {
    return ErrnoError(err, "KVM_CREATE_GUEST_MEMFD: {}", kNoGuestMemfd);
  }
  const uint64_t supported = SupportedGuestMemfdFlags(vm_fd);
  if (err == EINVAL && (flags & ~supported) != 0) {
    return ErrnoError(err,
                      "KVM_CREATE_GUEST_MEMFD flags 0x{:x}: this VM supports only 0x{:x} "
                      "(KVM_CAP_GUEST_MEMFD_FLAGS; MMAP and INIT_SHARED need Linux 6.18+)",
                      flags, supported);
  }
  return ErrnoError(err, "KVM_CREATE_GUEST_MEMFD size {} flags 0x{:x}", size, flags);
}

Result<UniqueFd> CreateGuestMemfdOwner() {
  ASSIGN_OR_RETURN(KvmSystem kvm, KvmSystem::Open());
  ASSIGN_OR_RETURN(KvmVm vm, kvm.CreateVm());
  const int fd = fcntl(vm.fd(), F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return ErrnoError(errno, "duplicating the KVM VM's fd");
  return UniqueFd(fd);
}

Status ProbeGuestMemfd() {
  ASSIGN_OR_RETURN(KvmSystem kvm, KvmSystem::Open());
  ASSIGN_OR_RETURN(KvmVm vm, kvm.CreateVm());
  if (vm.CheckExtension(KVM_CAP_GUEST_MEMFD) <= 0) {
    return Error("{}", kNoGuestMemfd);
  }
  constexpr uint64_t kNeeded = kGuestMemfdFlagMmap | kGuestMemfdFlagInitShared;
  const uint64_t supported = SupportedGuestMemfdFlags(vm.fd());
  if ((supported & kNeeded) != kNeeded) {
    return Error(
        "this KVM's guest_memfd supports flags 0x{:x}, not MMAP and INIT_SHARED "
        "(KVM_CAP_GUEST_MEMFD_FLAGS; needs Linux 6.18+)",
        supported);
  }
  return Status::Ok();
}

}  // namespace faultline::sys
