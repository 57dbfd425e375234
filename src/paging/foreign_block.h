// ForeignBlock: a range of another process's memory, described as a RAM
// block so that the demand pager can serve it through a userfaultfd that
// process registered (AdoptedUffd). host() is the OTHER process's address:
// it is handed to the userfaultfd's ioctls and must never be dereferenced
// here (it may be mapped to anything, or nothing, in this process).
//
// Page size 4 KiB: the other process's anonymous private memory; 2 MiB: its
// hugetlbfs memory (installed a whole huge page per UFFDIO_COPY).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "faultline/ram_block.h"
#include "faultline/status.h"
#include "faultline/types.h"

namespace faultline::paging {

class ForeignBlock final : public RamBlock {
 public:
  // `base` and `size` must be multiples of `page_size` (4 KiB or 2 MiB).
  static Result<std::shared_ptr<RamBlock>> Create(std::string name, Hva base, uint64_t size,
                                                  uint64_t page_size);

  int fd() const override { return -1; }
  // Discarding is the other process's business (it madvises; we see REMOVE).
  Status Discard(uint64_t offset, uint64_t length) override;

 private:
  ForeignBlock(std::string name, Backing backing, uint64_t size, uint64_t page_size)
      : RamBlock(std::move(name), backing, size, page_size) {}
};

}  // namespace faultline::paging
