// guest_memfd: KVM-owned guest memory as a file (KVM_CREATE_GUEST_MEMFD).
#pragma once

#include <cstdint>

#include "faultline/status.h"
#include "src/sys/unique_fd.h"

namespace faultline::sys {

// KVM_CREATE_GUEST_MEMFD flags (values checked in guest_memfd.cc).
inline constexpr uint64_t kGuestMemfdFlagMmap = 1ull << 0;        // GUEST_MEMFD_FLAG_MMAP
inline constexpr uint64_t kGuestMemfdFlagInitShared = 1ull << 1;  // GUEST_MEMFD_FLAG_INIT_SHARED

// Creates a guest_memfd of `size` bytes (a multiple of the page size) bound
// to the VM `vm_fd`. With kGuestMemfdFlagMmap | kGuestMemfdFlagInitShared the
// file can be mmap()ed shared and its memory is faultable from the host; a
// memslot using it must then point userspace_addr at such a mapping. When the
// kernel or the VM does not support it, the error names the capability
// (KVM_CAP_GUEST_MEMFD, KVM_CAP_GUEST_MEMFD_FLAGS) that is missing.
Result<UniqueFd> CreateGuestMemfd(int vm_fd, uint64_t size, uint64_t flags);

// KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD_FLAGS) on the VM: the flags
// CreateGuestMemfd accepts for it (0 before Linux 6.18 or without support).
uint64_t SupportedGuestMemfdFlags(int vm_fd);

// Whether this host can back guest RAM with a guest_memfd the way Faultline
// uses it (a KVM VM whose guest_memfd takes MMAP and INIT_SHARED): Ok, or
// an error that says what is missing (no /dev/kvm, KVM_CAP_GUEST_MEMFD 0,
// flags before Linux 6.18). Opens /dev/kvm and creates a VM on each call.
Status ProbeGuestMemfd();

// A new KVM VM to own guest_memfds, for code that has no VM of its own (the
// tests of layers below the hypervisor). The fd keeps /dev/kvm's VM alive.
Result<UniqueFd> CreateGuestMemfdOwner();

}  // namespace faultline::sys
