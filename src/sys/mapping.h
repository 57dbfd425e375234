// Mapping: sole owner of an mmap'ed range; unmaps it on destruction.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "faultline/status.h"
#include "faultline/types.h"

namespace faultline::sys {

class Mapping {
 public:
  Mapping() = default;
  ~Mapping() { Reset(); }
  Mapping(Mapping&& other) noexcept
      : addr_(std::exchange(other.addr_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  Mapping& operator=(Mapping&& other) noexcept {
    if (this != &other) {
      Reset();
      addr_ = std::exchange(other.addr_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  // mmap(hint, size, prot, flags, fd, offset). `what` names the mapping in
  // errors ("guest RAM 'ram0'").
  static Result<Mapping> Map(size_t size, int prot, int flags, int fd, off_t offset,
                             const char* what, void* hint = nullptr);
  // Private anonymous read-write memory.
  static Result<Mapping> Anonymous(size_t size, const char* what);

  uint8_t* data() const { return static_cast<uint8_t*>(addr_); }
  size_t size() const { return size_; }
  Hva hva() const { return Hva(addr_); }
  bool valid() const { return addr_ != nullptr; }

  // Gives up ownership without unmapping.
  std::pair<void*, size_t> Release() {
    return {std::exchange(addr_, nullptr), std::exchange(size_, 0)};
  }
  void Reset();

 private:
  Mapping(void* addr, size_t size) : addr_(addr), size_(size) {}
  void* addr_ = nullptr;
  size_t size_ = 0;
};

// Allocates every page of [addr, addr + size) writable now
// (MADV_POPULATE_WRITE), so that later writes take no page fault: for memory
// that will certainly be written soon, e.g. a migration destination's RAM.
Status PopulateWrite(void* addr, size_t size);

}  // namespace faultline::sys
