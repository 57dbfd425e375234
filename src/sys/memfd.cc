#include "src/sys/memfd.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <sstream>

#include "faultline/types.h"
#include "src/sys/linux_abi.h"

namespace faultline::sys {
namespace {

static_assert(kMemfdAllowSealing == MFD_ALLOW_SEALING);
static_assert(kMemfdHugetlb == MFD_HUGETLB);
static_assert(kMemfdHuge2Mb == MFD_HUGE_2MB);
static_assert(kMemfdExec == MFD_EXEC);

}  // namespace

Result<UniqueFd> CreateMemfd(std::string_view name, uint64_t size, unsigned flags) {
  const std::string name_str(name);
  const bool hugetlb = (flags & kMemfdHugetlb) != 0;
  if (size == 0) return Error("memfd '{}': size is zero", name);
  if (hugetlb && !IsAligned(size, kHugePageSize)) {
    return Error("memfd '{}': size {} is not a multiple of the 2 MiB huge page size", name, size);
  }
  flags |= MFD_CLOEXEC;
  int fd = -1;
  if ((flags & MFD_EXEC) == 0) {
    fd = ::memfd_create(name_str.c_str(), flags | MFD_NOEXEC_SEAL);
    // Kernels before 6.3 reject the flag; the memfd is then executable, as
    // memfds always were.
    if (fd < 0 && errno == EINVAL) fd = ::memfd_create(name_str.c_str(), flags);
  } else {
    fd = ::memfd_create(name_str.c_str(), flags);
  }
  if (fd < 0) {
    const int err = errno;
    if (hugetlb) {
      return ErrnoError(err, "memfd_create '{}' with MFD_HUGETLB (is hugetlbfs enabled?)", name);
    }
    return ErrnoError(err, "memfd_create '{}'", name);
  }
  UniqueFd owned(fd);
  if (::ftruncate(owned.get(), static_cast<off_t>(size)) != 0) {
    const int err = errno;
    if (hugetlb) {
      return ErrnoError(err, "ftruncate memfd '{}' to {} bytes; {}", name, size,
                        HugePageShortage(name, size));
    }
    return ErrnoError(err, "ftruncate memfd '{}' to {} bytes", name, size);
  }
  return owned;
}

Result<UniqueFd> AdoptMemfd(int fd, bool hugetlb, uint64_t size) {
  const char* kind = hugetlb ? "hugetlbfs memfd" : "memfd";
  struct statfs fs {};
  struct stat st {};
  if (::fstatfs(fd, &fs) != 0 || ::fstat(fd, &st) != 0) {
    return ErrnoError(errno, "descriptor {} for guest RAM", fd);
  }
  const auto type = static_cast<uint64_t>(fs.f_type);
  const uint64_t want = hugetlb ? HUGETLBFS_MAGIC : TMPFS_MAGIC;
  if (!S_ISREG(st.st_mode) || type != want) {
    return Error("descriptor {} for guest RAM is not a {} (file system {:#x})", fd, kind, type);
  }
  if (static_cast<uint64_t>(st.st_size) != size) {
    return Error("the {} for guest RAM is {} bytes, not the {} bytes expected", kind,
                 static_cast<uint64_t>(st.st_size), size);
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) return ErrnoError(errno, "fcntl(F_GETFL) on the {} for guest RAM", kind);
  if ((flags & O_ACCMODE) != O_RDWR) {
    return Error("the {} for guest RAM is not open read-write", kind);
  }
  UniqueFd dup(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
  if (!dup) return ErrnoError(errno, "duplicating the {} for guest RAM", kind);
  return dup;
}

Status PunchHole(int fd, uint64_t offset, uint64_t length) {
  if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                  static_cast<off_t>(length)) != 0) {
    const int err = errno;
    return ErrnoError(err, "fallocate(PUNCH_HOLE) [0x{:x}, +0x{:x})", offset, length);
  }
  return Status::Ok();
}

Result<HugePagePool> ReadHugePagePool() {
  std::ifstream in("/proc/meminfo");
  if (!in) return ErrnoError(errno, "open /proc/meminfo");
  HugePagePool pool;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string key;
    uint64_t value = 0;
    if (!(fields >> key >> value)) continue;
    if (key == "HugePages_Total:") pool.total = value;
    if (key == "HugePages_Free:") pool.free = value;
    if (key == "HugePages_Rsvd:") pool.reserved = value;
    if (key == "Hugepagesize:") pool.page_size = value * 1024;  // in kB
  }
  return pool;
}

std::string HugePageShortage(std::string_view what, uint64_t bytes) {
  const uint64_t needed = AlignUp(bytes, kHugePageSize) / kHugePageSize;
  auto pool = ReadHugePagePool();
  if (!pool.has_value()) {
    return fmt::format(
        "{} needs {} free 2 MiB huge pages; reserve them with "
        "`echo N > /proc/sys/vm/nr_hugepages` (N = pages already in use + {})",
        what, needed, needed);
  }
  const uint64_t available = pool->available();
  const uint64_t target = pool->total + (needed > available ? needed - available : 0);
  return fmt::format(
      "{} needs {} free 2 MiB huge pages but only {} are available (HugePages_Total {}, "
      "Free {}, Rsvd {}); reserve more with `echo {} > /proc/sys/vm/nr_hugepages` as root",
      what, needed, available, pool->total, pool->free, pool->reserved, target);
}

}  // namespace faultline::sys
