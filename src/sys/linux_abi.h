// Linux ABI newer than the system headers (which are Linux 6.1 here).
//
// This is the ONE place that defines kernel interfaces the installed
// <linux/*.h> headers lack. Every definition is guarded with #ifndef so a newer
// header wins, and every struct size and ioctl number is checked below against
// a literal computed by hand from the documented uapi, so a typo here fails the
// build instead of sending the kernel a wrong request.
//
// Values come from the kernel's include/uapi/linux/{kvm,userfaultfd,memfd}.h;
// each group names the release that introduced it.
//
// Only src/sys/ may include this header (it pulls in <linux/kvm.h> and
// <linux/userfaultfd.h>).
#pragma once

// The 6.1 uapi <linux/stddef.h> declares flexible arrays as
// `struct { struct { } __empty_x; T x[]; }`. In C++ an empty struct has size
// 1, so every KVM struct ending in such an array (kvm_cpuid2, kvm_msrs,
// kvm_msr_list, kvm_xsave, ...) grows, and with it the size encoded in the
// ioctl number: KVM_GET_SUPPORTED_CPUID becomes 0xc00cae05 and the kernel
// answers EINVAL. Later kernels define the macro as `T x[0]` for C++; do the
// same before any <linux/kvm.h> is seen. Every src/sys file includes KVM and
// userfaultfd headers through this one for that reason.
#include <linux/stddef.h>
#ifdef __cplusplus
#undef __DECLARE_FLEX_ARRAY
#define __DECLARE_FLEX_ARRAY(TYPE, NAME) TYPE NAME[0]
#endif

#include <linux/kvm.h>
#include <linux/types.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>  // glibc's MFD_*; <linux/memfd.h> would redefine them

#include <cstddef>

// ---------------------------------------------------------------------------
// KVM
// ---------------------------------------------------------------------------

// Linux 6.8: KVM_SET_USER_MEMORY_REGION2, guest_memfd, memory attributes.
#ifndef KVM_SET_USER_MEMORY_REGION2
struct kvm_userspace_memory_region2 {
  __u32 slot;
  __u32 flags;
  __u64 guest_phys_addr;
  __u64 memory_size;     // bytes
  __u64 userspace_addr;  // start of the userspace allocated memory
  __u64 guest_memfd_offset;
  __u32 guest_memfd;
  __u32 pad1;
  __u64 pad2[14];
};
#define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
#endif

#ifndef KVM_MEM_GUEST_MEMFD
#define KVM_MEM_GUEST_MEMFD (1UL << 2)  // Linux 6.8
#endif

#ifndef KVM_CREATE_GUEST_MEMFD
struct kvm_create_guest_memfd {
  __u64 size;
  __u64 flags;
  __u64 reserved[6];
};
#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
#endif

// Linux 6.18: guest_memfd that userspace can mmap(), and whose memory starts
// out shared (faultable from the host) rather than private.
#ifndef GUEST_MEMFD_FLAG_MMAP
#define GUEST_MEMFD_FLAG_MMAP (1ULL << 0)
#endif
#ifndef GUEST_MEMFD_FLAG_INIT_SHARED
#define GUEST_MEMFD_FLAG_INIT_SHARED (1ULL << 1)
#endif

// Capabilities (KVM_CHECK_EXTENSION).
#ifndef KVM_CAP_DIRTY_LOG_RING_ACQ_REL
#define KVM_CAP_DIRTY_LOG_RING_ACQ_REL 223  // Linux 6.1
#endif
#ifndef KVM_CAP_USER_MEMORY2
#define KVM_CAP_USER_MEMORY2 231  // Linux 6.8
#endif
#ifndef KVM_CAP_MEMORY_FAULT_INFO
#define KVM_CAP_MEMORY_FAULT_INFO 232  // Linux 6.8
#endif
#ifndef KVM_CAP_MEMORY_ATTRIBUTES
#define KVM_CAP_MEMORY_ATTRIBUTES 233  // Linux 6.8
#endif
#ifndef KVM_CAP_GUEST_MEMFD
#define KVM_CAP_GUEST_MEMFD 234  // Linux 6.8
#endif
#ifndef KVM_CAP_VM_TYPES
#define KVM_CAP_VM_TYPES 235  // Linux 6.8
#endif
// Linux 6.18: KVM_CHECK_EXTENSION on a VM fd returns the GUEST_MEMFD_FLAG_*
// bits that KVM_CREATE_GUEST_MEMFD accepts for that VM.
#ifndef KVM_CAP_GUEST_MEMFD_FLAGS
#define KVM_CAP_GUEST_MEMFD_FLAGS 244
#endif

// ---------------------------------------------------------------------------
// userfaultfd
// ---------------------------------------------------------------------------

// Linux 6.1 already has: USERFAULTFD_IOC_NEW (/dev/userfaultfd, 6.1),
// UFFD_FEATURE_WP_HUGETLBFS_SHMEM (6.1), MINOR and CONTINUE (5.13),
// UFFD_USER_MODE_ONLY (5.11). Guarded anyway so older headers still work.
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

// Linux 6.4: write-protect markers on unpopulated ptes.
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif

// Linux 6.6: UFFDIO_POISON.
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
#endif
#ifndef UFFDIO_POISON
struct uffdio_poison {
  struct uffdio_range range;
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
  __u64 mode;
  // Written by the kernel: bytes poisoned, or a negative errno.
  __s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

// Linux 6.7: asynchronous write-protect faults (resolved by the kernel).
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif

// Linux 6.8: UFFDIO_MOVE (anonymous memory only).
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
#endif
#ifndef UFFDIO_MOVE
struct uffdio_move {
  __u64 dst;
  __u64 src;
  __u64 len;
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
  __u64 mode;
  // Written by the kernel: bytes moved, or a negative errno.
  __s64 move;
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif

// ---------------------------------------------------------------------------
// memfd_create flags
// ---------------------------------------------------------------------------

// Linux 4.14: huge page size encoding for MFD_HUGETLB (glibc does not define
// these; <linux/memfd.h> clashes with glibc's MFD_CLOEXEC spelling).
#ifndef MFD_HUGE_SHIFT
#define MFD_HUGE_SHIFT 26
#endif
#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << MFD_HUGE_SHIFT)
#endif

// Linux 6.3: memfd executability. Without either flag a kernel with
// vm.memfd_noexec=0 creates an executable memfd and logs a warning.
#ifndef MFD_NOEXEC_SEAL
#define MFD_NOEXEC_SEAL 0x0008U
#endif
#ifndef MFD_EXEC
#define MFD_EXEC 0x0010U
#endif

// ---------------------------------------------------------------------------
// Checks: sizes and ioctl numbers against hand-computed literals.
// _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr, with
// dir 1 = write (_IOW), 2 = read (_IOR), 3 = both (_IOWR).
// ---------------------------------------------------------------------------

namespace faultline::sys::abi_check {

static_assert(sizeof(kvm_userspace_memory_region2) == 160);
static_assert(offsetof(kvm_userspace_memory_region2, guest_memfd_offset) == 32);
static_assert(offsetof(kvm_userspace_memory_region2, guest_memfd) == 40);
static_assert(sizeof(kvm_create_guest_memfd) == 64);
static_assert(KVM_SET_USER_MEMORY_REGION2 == 0x40a0ae49UL);  // _IOW(0xAE, 0x49, 160)
static_assert(KVM_CREATE_GUEST_MEMFD == 0xc040aed4UL);       // _IOWR(0xAE, 0xd4, 64)
static_assert(KVM_MEM_GUEST_MEMFD == 4);

static_assert(sizeof(uffd_msg) == 32);
static_assert(sizeof(uffdio_api) == 24);
static_assert(sizeof(uffdio_range) == 16);
static_assert(sizeof(uffdio_register) == 32);
static_assert(sizeof(uffdio_copy) == 40);
static_assert(sizeof(uffdio_zeropage) == 32);
static_assert(sizeof(uffdio_writeprotect) == 24);
static_assert(sizeof(uffdio_continue) == 32);
static_assert(sizeof(uffdio_move) == 40);
static_assert(offsetof(uffdio_move, move) == 32);
static_assert(sizeof(uffdio_poison) == 32);
static_assert(offsetof(uffdio_poison, updated) == 24);

static_assert(USERFAULTFD_IOC_NEW == 0xaa00UL);      // _IO(0xAA, 0x00)
static_assert(UFFDIO_API == 0xc018aa3fUL);           // _IOWR(0xAA, 0x3f, 24)
static_assert(UFFDIO_REGISTER == 0xc020aa00UL);      // _IOWR(0xAA, 0x00, 32)
static_assert(UFFDIO_UNREGISTER == 0x8010aa01UL);    // _IOR(0xAA, 0x01, 16)
static_assert(UFFDIO_WAKE == 0x8010aa02UL);          // _IOR(0xAA, 0x02, 16)
static_assert(UFFDIO_COPY == 0xc028aa03UL);          // _IOWR(0xAA, 0x03, 40)
static_assert(UFFDIO_ZEROPAGE == 0xc020aa04UL);      // _IOWR(0xAA, 0x04, 32)
static_assert(UFFDIO_MOVE == 0xc028aa05UL);          // _IOWR(0xAA, 0x05, 40)
static_assert(UFFDIO_WRITEPROTECT == 0xc018aa06UL);  // _IOWR(0xAA, 0x06, 24)
static_assert(UFFDIO_CONTINUE == 0xc020aa07UL);      // _IOWR(0xAA, 0x07, 32)
static_assert(UFFDIO_POISON == 0xc020aa08UL);        // _IOWR(0xAA, 0x08, 32)

static_assert(MFD_HUGE_2MB == 0x54000000U);
static_assert(MFD_NOEXEC_SEAL == 8 && MFD_EXEC == 16);

static_assert(UFFD_FEATURE_WP_HUGETLBFS_SHMEM == 0x1000);
static_assert(UFFD_FEATURE_WP_UNPOPULATED == 0x2000);
static_assert(UFFD_FEATURE_POISON == 0x4000);
static_assert(UFFD_FEATURE_WP_ASYNC == 0x8000);
static_assert(UFFD_FEATURE_MOVE == 0x10000);

}  // namespace faultline::sys::abi_check

// Linux 6.11: with this quirk disabled (KVM_CAP_DISABLE_QUIRKS2), deleting a
// memslot zaps only that slot's SPTEs instead of the whole MMU.
#ifndef KVM_X86_QUIRK_SLOT_ZAP_ALL
#define KVM_X86_QUIRK_SLOT_ZAP_ALL (1 << 7)
#endif
static_assert(KVM_X86_QUIRK_SLOT_ZAP_ALL == 0x80);

// The flexible-array fix above, checked where it matters.
static_assert(sizeof(kvm_cpuid2) == 8 && sizeof(kvm_msrs) == 8 && sizeof(kvm_msr_list) == 4);
static_assert(sizeof(kvm_xsave) == 4096);
static_assert(KVM_GET_SUPPORTED_CPUID == 0xc008ae05u);
static_assert(KVM_SET_CPUID2 == 0x4008ae90u);
static_assert(KVM_GET_MSR_INDEX_LIST == 0xc004ae02u);
static_assert(KVM_GET_MSRS == 0xc008ae88u && KVM_SET_MSRS == 0x4008ae89u);
static_assert(KVM_GET_XSAVE == 0x9000aea4u && KVM_SET_XSAVE == 0x5000aea5u);
static_assert(KVM_GET_XSAVE2 == 0x9000aecfu);

// ---------------------------------------------------------------------------
// PAGEMAP_SCAN (include/uapi/linux/fs.h; Documentation/admin-guide/mm/pagemap.rst)
// ---------------------------------------------------------------------------

// Linux 6.7: an ioctl on /proc/<pid>/pagemap that reports page table state
// as ranges (struct page_region) and, with PM_SCAN_WP_MATCHING, write-protects
// the matching pages in the same walk (userfaultfd WP_ASYNC ranges only).
// <linux/fs.h> is deliberately not included here (it brings <linux/mount.h>,
// which clashes with glibc's <sys/mount.h>): a file using a newer
// <linux/fs.h> must include it before this header, and then its definitions win.
#ifndef PAGEMAP_SCAN
#define PAGE_IS_WPALLOWED (1 << 0)   // async write-protect enabled on the page
#define PAGE_IS_WRITTEN (1 << 1)     // written since it was write-protected
#define PAGE_IS_FILE (1 << 2)        // file-backed (or shmem)
#define PAGE_IS_PRESENT (1 << 3)     // present in memory
#define PAGE_IS_SWAPPED (1 << 4)     // swapped out
#define PAGE_IS_PFNZERO (1 << 5)     // maps the zero page
#define PAGE_IS_HUGE (1 << 6)        // THP or hugetlb
#define PAGE_IS_SOFT_DIRTY (1 << 7)  // soft-dirty

struct page_region {
  __u64 start;
  __u64 end;  // exclusive
  __u64 categories;
};

#define PM_SCAN_WP_MATCHING (1 << 0)    // write-protect the pages matched
#define PM_SCAN_CHECK_WPASYNC (1 << 1)  // fail (EPERM) on a range without async WP

struct pm_scan_arg {
  __u64 size;  // sizeof(struct pm_scan_arg)
  __u64 flags;
  __u64 start;
  __u64 end;
  __u64 walk_end;  // written by the kernel: where the walk stopped (== end: all of it)
  __u64 vec;       // struct page_region[vec_len]
  __u64 vec_len;
  __u64 max_pages;  // 0: no limit
  __u64 category_inverted;
  __u64 category_mask;
  __u64 category_anyof_mask;
  __u64 return_mask;
};

#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

// Linux 6.15: guard regions (MADV_GUARD_INSTALL) as a category.
#ifndef PAGE_IS_GUARD
#define PAGE_IS_GUARD (1 << 8)
#endif

namespace faultline::sys::abi_check {

static_assert(sizeof(page_region) == 24);
static_assert(offsetof(page_region, categories) == 16);
static_assert(sizeof(pm_scan_arg) == 96);
static_assert(offsetof(pm_scan_arg, walk_end) == 32);
static_assert(offsetof(pm_scan_arg, vec) == 40);
static_assert(offsetof(pm_scan_arg, max_pages) == 56);
static_assert(offsetof(pm_scan_arg, return_mask) == 88);
static_assert(PAGEMAP_SCAN == 0xc0606610UL);  // _IOWR('f' = 0x66, 16, 96)
static_assert(PM_SCAN_WP_MATCHING == 1 && PM_SCAN_CHECK_WPASYNC == 2);
static_assert(PAGE_IS_WPALLOWED == 0x01 && PAGE_IS_WRITTEN == 0x02 && PAGE_IS_FILE == 0x04);
static_assert(PAGE_IS_PRESENT == 0x08 && PAGE_IS_SWAPPED == 0x10 && PAGE_IS_PFNZERO == 0x20);
static_assert(PAGE_IS_HUGE == 0x40 && PAGE_IS_SOFT_DIRTY == 0x80 && PAGE_IS_GUARD == 0x100);

}  // namespace faultline::sys::abi_check
