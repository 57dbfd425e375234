// RamBlock: one contiguous piece of guest RAM with a backing, a fixed maximum
// size and a page size. Where it appears in the guest-physical address space
// (and how much of it is in use) is the MemoryMap's business, not the block's.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "faultline/status.h"
#include "faultline/types.h"

namespace faultline {

enum class Backing {
  kAnonymous,   // private anonymous memory, optionally THP
  kMemfd,       // memfd/shmem, with an alias mapping of the same pages
  kHugetlb,     // memfd with MFD_HUGETLB, 2 MiB pages, with an alias mapping
  kGuestMemfd,  // KVM guest_memfd with MMAP|INIT_SHARED
};

const char* BackingName(Backing backing);  // "anon", "memfd", "hugetlb", "gmem"
Result<Backing> ParseBacking(std::string_view name);

struct RamBlockOptions {
  std::string name;
  uint64_t size = 0;  // bytes; a multiple of the backing's page size
  Backing backing = Backing::kAnonymous;
  bool transparent_huge_pages = false;  // anonymous only: MADV_HUGEPAGE
  int vm_fd = -1;                       // guest_memfd only: the VM that owns it
  // memfd and hugetlb only: map this existing memfd (of exactly `size`
  // bytes) instead of creating one; the block keeps a duplicate. Another
  // process's guest RAM, handed over in a local update.
  int adopt_fd = -1;
  // A VMM of its own (the embedding API): the VMM's existing mapping of
  // the block, `size` bytes, which becomes host() and which its vCPUs use.
  // The block never unmaps it; it must stay mapped while the block lives.
  // anon: a private anonymous mapping. memfd and hugetlb: a MAP_SHARED
  // mapping of `adopt_fd` (required), which the block maps again as its
  // alias.
  void* host = nullptr;
};

class RamBlock {
 public:
  // Creates and maps the block. Errors say what to do (e.g. how many huge
  // pages to reserve and how).
  static Result<std::shared_ptr<RamBlock>> Create(const RamBlockOptions& options);

  virtual ~RamBlock() = default;
  RamBlock(const RamBlock&) = delete;
  RamBlock& operator=(const RamBlock&) = delete;

  const std::string& name() const { return name_; }
  Backing backing() const { return backing_; }
  uint64_t size() const { return size_; }
  uint64_t page_size() const { return page_size_; }
  uint64_t pages() const { return size_ / page_size_; }  // in page_size() units

  // The primary mapping, size() bytes: what KVM memslots point at.
  uint8_t* host() const { return host_; }
  // A second mapping of the same pages (memfd, hugetlb, guest_memfd), or
  // nullptr (anonymous). Writes through it are visible through host() and
  // do not trigger userfaultfd MINOR faults registered on host().
  uint8_t* alias() const { return alias_; }
  // The backing file descriptor (memfd or guest_memfd), or -1.
  virtual int fd() const = 0;

  // Makes [offset, offset + length) read back as zeros and frees its memory
  // (PUNCH_HOLE, MADV_REMOVE or MADV_DONTNEED, whichever fits the backing).
  // Both must be multiples of page_size().
  virtual Status Discard(uint64_t offset, uint64_t length) = 0;

 protected:
  RamBlock(std::string name, Backing backing, uint64_t size, uint64_t page_size)
      : name_(std::move(name)), backing_(backing), size_(size), page_size_(page_size) {}

  std::string name_;
  Backing backing_;
  uint64_t size_;
  uint64_t page_size_;
  uint8_t* host_ = nullptr;
  uint8_t* alias_ = nullptr;
};

}  // namespace faultline
