#include "src/sys/mapping.h"

#include <cerrno>

namespace faultline::sys {

Result<Mapping> Mapping::Map(size_t size, int prot, int flags, int fd, off_t offset,
                             const char* what, void* hint) {
  if (size == 0) return Error("mmap {}: size is zero", what);
  void* addr = ::mmap(hint, size, prot, flags, fd, offset);
  if (addr == MAP_FAILED) {
    return ErrnoError(errno, "mmap {} ({} bytes)", what, size);
  }
  return Mapping(addr, size);
}

Result<Mapping> Mapping::Anonymous(size_t size, const char* what) {
  return Map(size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0,
             what);
}

void Mapping::Reset() {
  if (addr_ != nullptr) ::munmap(addr_, size_);
  addr_ = nullptr;
  size_ = 0;
}

Status PopulateWrite(void* addr, size_t size) {
  if (madvise(addr, size, MADV_POPULATE_WRITE) != 0) {
    return ErrnoError(errno, "madvise(MADV_POPULATE_WRITE) of {} bytes at {}", size, addr);
  }
  return Status::Ok();
}

}  // namespace faultline::sys
