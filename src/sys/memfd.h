// memfd: anonymous files backing guest RAM (shmem, or hugetlbfs with
// MFD_HUGETLB), and hole punching to free their pages.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "faultline/status.h"
#include "src/sys/unique_fd.h"

namespace faultline::sys {

// memfd_create(2) flags (values checked against the kernel's in memfd.cc).
inline constexpr unsigned kMemfdAllowSealing = 0x0002U;  // MFD_ALLOW_SEALING
inline constexpr unsigned kMemfdHugetlb = 0x0004U;       // MFD_HUGETLB
inline constexpr unsigned kMemfdHuge2Mb = 21U << 26;     // MFD_HUGE_2MB
inline constexpr unsigned kMemfdExec = 0x0010U;          // MFD_EXEC (6.3)

// Creates a memfd of `size` bytes. MFD_CLOEXEC is always set; so is
// MFD_NOEXEC_SEAL (guest RAM is never executed by the host) unless `flags`
// has kMemfdExec or the kernel predates it. With kMemfdHugetlb the size must
// be a multiple of the huge page size; memory is reserved only when the file
// is mapped shared, so see HugePageShortage() for diagnosing that mmap.
Result<UniqueFd> CreateMemfd(std::string_view name, uint64_t size, unsigned flags);

// Checks that `fd`, received from elsewhere (a local update), is what it
// must be to back `size` bytes of guest RAM: a memfd (tmpfs), or with
// `hugetlb` a hugetlbfs memfd, of exactly `size` bytes, open read-write.
// Returns a duplicate (close-on-exec) for the caller to own.
Result<UniqueFd> AdoptMemfd(int fd, bool hugetlb, uint64_t size);

// fallocate(PUNCH_HOLE | KEEP_SIZE): frees [offset, offset + length) of a
// memfd or guest_memfd; the range reads back as zeros.
Status PunchHole(int fd, uint64_t offset, uint64_t length);

// The huge page pool of the default (2 MiB) size, from /proc/meminfo.
struct HugePagePool {
  uint64_t total = 0;      // HugePages_Total
  uint64_t free = 0;       // HugePages_Free (includes reserved pages)
  uint64_t reserved = 0;   // HugePages_Rsvd (promised to mappings, not yet faulted)
  uint64_t page_size = 0;  // Hugepagesize, bytes

  // Pages a new mapping can still reserve.
  uint64_t available() const { return free > reserved ? free - reserved : 0; }
};
Result<HugePagePool> ReadHugePagePool();

// A message for when `bytes` of 2 MiB huge pages could not be had: how many
// pages are needed, how many are available, and the command that reserves
// enough ("echo N > /proc/sys/vm/nr_hugepages").
std::string HugePageShortage(std::string_view what, uint64_t bytes);

}  // namespace faultline::sys
