// DirtyBitmap: one bit per page of a RamBlock, kept per block rather than per
// KVM memslot so that dirty bits survive a layout change (a slot deleted and
// re-created around a new hole loses its KVM dirty log; the block's bitmap
// does not). Pages are counted in the block's page size.
//
// Every operation works a 64-bit word at a time and skips zero words, so
// scanning a mostly clean GiB (262,144 pages, 4,096 words) costs a few
// microseconds.
//
// Not thread-safe: the block's dirty tracker serializes access. Page indices
// and ranges outside the bitmap are a programming error and abort.
#pragma once

#include <bit>
#include <cstdint>
#include <span>
#include <vector>

namespace faultline {

class DirtyBitmap {
 public:
  static constexpr uint64_t kBitsPerWord = 64;

  DirtyBitmap() = default;
  explicit DirtyBitmap(uint64_t pages);

  uint64_t pages() const { return pages_; }
  // Bits at and beyond pages() in the last word are always zero.
  std::span<const uint64_t> words() const { return words_; }

  bool Test(uint64_t page) const;
  void Set(uint64_t page);
  void Clear(uint64_t page);
  // Returns whether `page` was set, and clears it.
  bool TestAndClear(uint64_t page);

  void SetRange(uint64_t first, uint64_t count);
  void ClearRange(uint64_t first, uint64_t count);
  void SetAll() { SetRange(0, pages_); }
  void ClearAll();
  bool AnyInRange(uint64_t first, uint64_t count) const;

  uint64_t Count() const;
  uint64_t CountRange(uint64_t first, uint64_t count) const;
  bool Empty() const;

  // this |= other; both must have the same number of pages.
  void Merge(const DirtyBitmap& other);
  // ORs `count` bits of a raw little-endian bitmap (KVM_GET_DIRTY_LOG's, in
  // slot-relative pages) into pages [page_offset, page_offset + count). Bits
  // of `src` beyond `count` are ignored. `page_offset` need not be a
  // multiple of 64: a slot can start anywhere in its block.
  void MergeRaw(std::span<const uint64_t> src, uint64_t count, uint64_t page_offset);

  // Harvest: moves the set bits into `out` (resized to pages()) and clears
  // this bitmap. Reuses out's storage, so a harvest loop does not allocate.
  void TakeInto(DirtyBitmap& out);
  DirtyBitmap Take();

  // Calls fn(page) for each set page, in increasing order.
  template <typename Fn>
  void ForEachSet(Fn&& fn) const;
  // Calls fn(first, count) for each maximal run of set pages, in increasing
  // order. Runs cross word boundaries.
  template <typename Fn>
  void ForEachRun(Fn&& fn) const;

  // The first set page at or after `from`, or pages() if none.
  uint64_t FindNextSet(uint64_t from) const;
  // The first clear page at or after `from`, or pages() if none.
  uint64_t FindNextClear(uint64_t from) const;

  friend bool operator==(const DirtyBitmap&, const DirtyBitmap&) = default;

 private:
  void CheckRange(uint64_t first, uint64_t count) const;

  uint64_t pages_ = 0;
  std::vector<uint64_t> words_;
};

template <typename Fn>
void DirtyBitmap::ForEachSet(Fn&& fn) const {
  for (size_t w = 0; w < words_.size(); ++w) {
    for (uint64_t word = words_[w]; word != 0; word &= word - 1) {
      fn(w * kBitsPerWord + static_cast<uint64_t>(std::countr_zero(word)));
    }
  }
}

template <typename Fn>
void DirtyBitmap::ForEachRun(Fn&& fn) const {
  // Works on edges rather than bits: `edges` has a 1 wherever a page differs
  // from the one before it (the first page compared with the previous word's
  // last), so edges alternate run start, run end. Clean and fully dirty words
  // have no edges and cost one test; a dense random bitmap costs one loop
  // exit per word instead of a mispredicted branch per run.
  bool open = false;
  uint64_t start = 0;
  uint64_t carry = 0;  // the previous word's last bit
  for (size_t w = 0; w < words_.size(); ++w) {
    const uint64_t word = words_[w];
    uint64_t edges = word ^ ((word << 1) | carry);
    carry = word >> (kBitsPerWord - 1);
    while (edges != 0) {
      const uint64_t page = w * kBitsPerWord + static_cast<uint64_t>(std::countr_zero(edges));
      edges &= edges - 1;
      if (open) fn(start, page - start);
      start = page;
      open = !open;
    }
  }
  // Bits past pages_ are zero, so only a run reaching the last page is open.
  if (open) fn(start, pages_ - start);
}

}  // namespace faultline
