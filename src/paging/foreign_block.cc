#include "src/paging/foreign_block.h"

#include <utility>

namespace faultline::paging {

Result<std::shared_ptr<RamBlock>> ForeignBlock::Create(std::string name, Hva base, uint64_t size,
                                                       uint64_t page_size) {
  if (page_size != kPageSize && page_size != kHugePageSize) {
    return Error("foreign block '{}': page size {} (expected 4096 or 2097152)", name, page_size);
  }
  if (size == 0 || size % page_size != 0 || base.value % page_size != 0 || base.value == 0 ||
      base.value + size < base.value) {
    return Error("foreign block '{}': [{:#x}, +{:#x}) is not a range of whole {}-byte pages", name,
                 base.value, size, page_size);
  }
  const Backing backing = page_size == kPageSize ? Backing::kAnonymous : Backing::kHugetlb;
  std::shared_ptr<ForeignBlock> block(new ForeignBlock(std::move(name), backing, size, page_size));
  // An address in another process, stored where RamBlock keeps its
  // mapping: only ever passed on to the userfaultfd as a number.
  block->host_ = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(base.value));
  return std::shared_ptr<RamBlock>(std::move(block));
}

Status ForeignBlock::Discard(uint64_t offset, uint64_t length) {
  return Error(
      "foreign block '{}': [{:#x}, +{:#x}) is another process's memory; it cannot be "
      "discarded from here",
      name(), offset, length);
}

}  // namespace faultline::paging
