#include "src/memory/dirty_bitmap.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

namespace faultline {
namespace {

constexpr uint64_t kAllOnes = ~uint64_t{0};
constexpr uint64_t kBits = DirtyBitmap::kBitsPerWord;

uint64_t WordsFor(uint64_t pages) { return (pages + kBits - 1) / kBits; }

// Index checks guard against a caller's arithmetic error that would otherwise
// write past the bitmap: a broken invariant, so abort rather than return.
[[noreturn]] void Die(const char* what, uint64_t first, uint64_t count, uint64_t pages) {
  std::fprintf(stderr, "DirtyBitmap: %s [%#llx, +%#llx) outside %#llx pages\n", what,
               static_cast<unsigned long long>(first), static_cast<unsigned long long>(count),
               static_cast<unsigned long long>(pages));
  std::abort();
}

// Calls op(word, mask) for each word that [first, first + count) touches,
// with the mask of the bits in range. count must be > 0.
template <typename Op>
void ForEachWordInRange(uint64_t first, uint64_t count, Op&& op) {
  const uint64_t last = first + count - 1;
  const uint64_t first_word = first / kBits;
  const uint64_t last_word = last / kBits;
  const uint64_t head = kAllOnes << (first % kBits);
  const uint64_t tail = kAllOnes >> (kBits - 1 - last % kBits);
  if (first_word == last_word) {
    op(first_word, head & tail);
    return;
  }
  op(first_word, head);
  for (uint64_t w = first_word + 1; w < last_word; ++w) op(w, kAllOnes);
  op(last_word, tail);
}

}  // namespace

DirtyBitmap::DirtyBitmap(uint64_t pages) : pages_(pages), words_(WordsFor(pages), 0) {}

void DirtyBitmap::CheckRange(uint64_t first, uint64_t count) const {
  if (first > pages_ || count > pages_ - first) Die("range", first, count, pages_);
}

bool DirtyBitmap::Test(uint64_t page) const {
  if (page >= pages_) Die("test", page, 1, pages_);
  return (words_[page / kBits] >> (page % kBits)) & 1;
}

void DirtyBitmap::Set(uint64_t page) {
  if (page >= pages_) Die("set", page, 1, pages_);
  words_[page / kBits] |= uint64_t{1} << (page % kBits);
}

void DirtyBitmap::Clear(uint64_t page) {
  if (page >= pages_) Die("clear", page, 1, pages_);
  words_[page / kBits] &= ~(uint64_t{1} << (page % kBits));
}

bool DirtyBitmap::TestAndClear(uint64_t page) {
  if (page >= pages_) Die("test and clear", page, 1, pages_);
  const uint64_t bit = uint64_t{1} << (page % kBits);
  uint64_t& word = words_[page / kBits];
  const bool was_set = (word & bit) != 0;
  word &= ~bit;
  return was_set;
}

void DirtyBitmap::SetRange(uint64_t first, uint64_t count) {
  CheckRange(first, count);
  if (count == 0) return;
  ForEachWordInRange(first, count, [&](uint64_t w, uint64_t mask) { words_[w] |= mask; });
}

void DirtyBitmap::ClearRange(uint64_t first, uint64_t count) {
  CheckRange(first, count);
  if (count == 0) return;
  ForEachWordInRange(first, count, [&](uint64_t w, uint64_t mask) { words_[w] &= ~mask; });
}

void DirtyBitmap::ClearAll() { std::fill(words_.begin(), words_.end(), 0); }

bool DirtyBitmap::AnyInRange(uint64_t first, uint64_t count) const {
  CheckRange(first, count);
  if (count == 0) return false;
  bool any = false;
  ForEachWordInRange(first, count,
                     [&](uint64_t w, uint64_t mask) { any |= (words_[w] & mask) != 0; });
  return any;
}

uint64_t DirtyBitmap::Count() const {
  uint64_t total = 0;
  for (uint64_t word : words_) total += static_cast<uint64_t>(std::popcount(word));
  return total;
}

uint64_t DirtyBitmap::CountRange(uint64_t first, uint64_t count) const {
  CheckRange(first, count);
  if (count == 0) return 0;
  uint64_t total = 0;
  ForEachWordInRange(first, count, [&](uint64_t w, uint64_t mask) {
    total += static_cast<uint64_t>(std::popcount(words_[w] & mask));
  });
  return total;
}

bool DirtyBitmap::Empty() const {
  return std::all_of(words_.begin(), words_.end(), [](uint64_t word) { return word == 0; });
}

void DirtyBitmap::Merge(const DirtyBitmap& other) {
  if (other.pages_ != pages_) Die("merge of a bitmap of another size", 0, other.pages_, pages_);
  for (size_t w = 0; w < words_.size(); ++w) words_[w] |= other.words_[w];
}

void DirtyBitmap::MergeRaw(std::span<const uint64_t> src, uint64_t count, uint64_t page_offset) {
  CheckRange(page_offset, count);
  if (count == 0) return;
  if (src.size() < WordsFor(count)) Die("merge from a short source", page_offset, count, pages_);
  const uint64_t src_words = WordsFor(count);
  const uint64_t shift = page_offset % kBits;
  const uint64_t dst = page_offset / kBits;
  const uint64_t tail_bits = count % kBits;
  for (uint64_t i = 0; i < src_words; ++i) {
    uint64_t value = src[i];
    // KVM leaves bits past the slot's end zero, but a stray one would mark a
    // page of the neighbouring slot: mask them off.
    if (i + 1 == src_words && tail_bits != 0) value &= (uint64_t{1} << tail_bits) - 1;
    if (value == 0) continue;
    words_[dst + i] |= value << shift;
    // With shift > 0 the high bits spill into the next word. They are
    // nonzero only for pages below page_offset + count <= pages_, so that
    // word exists.
    if (shift != 0) {
      const uint64_t spill = value >> (kBits - shift);
      if (spill != 0) words_[dst + i + 1] |= spill;
    }
  }
}

void DirtyBitmap::TakeInto(DirtyBitmap& out) {
  out.pages_ = pages_;
  out.words_.swap(words_);
  // words_ now holds out's old storage: reuse it.
  words_.assign(out.words_.size(), 0);
}

DirtyBitmap DirtyBitmap::Take() {
  DirtyBitmap out;
  TakeInto(out);
  return out;
}

uint64_t DirtyBitmap::FindNextSet(uint64_t from) const {
  if (from >= pages_) return pages_;
  uint64_t w = from / kBits;
  uint64_t word = words_[w] & (kAllOnes << (from % kBits));
  while (word == 0) {
    if (++w == words_.size()) return pages_;
    word = words_[w];
  }
  return w * kBits + static_cast<uint64_t>(std::countr_zero(word));
}

uint64_t DirtyBitmap::FindNextClear(uint64_t from) const {
  if (from >= pages_) return pages_;
  uint64_t w = from / kBits;
  uint64_t word = ~words_[w] & (kAllOnes << (from % kBits));
  while (word == 0) {
    if (++w == words_.size()) return pages_;
    word = ~words_[w];
  }
  // Bits past pages_ are zero, so they read as clear here: clamp.
  return std::min(w * kBits + static_cast<uint64_t>(std::countr_zero(word)), pages_);
}

}  // namespace faultline
