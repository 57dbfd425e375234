// Little-endian byte encoding for the migration wire format.
//
// Every multi-byte field on the wire is little-endian and written byte by
// byte, never by copying a host struct: the layout is the documented one
// (docs/protocol.md) whatever the compiler's padding and the host's byte
// order. Compilers turn these loops into single loads and stores.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <vector>

namespace faultline::migration {

template <typename T>
inline void StoreLe(uint8_t* out, T value) {
  for (size_t i = 0; i < sizeof(T); ++i) out[i] = static_cast<uint8_t>(value >> (8 * i));
}

template <typename T>
inline T LoadLe(const uint8_t* in) {
  T value = 0;
  for (size_t i = 0; i < sizeof(T); ++i) value |= static_cast<T>(T{in[i]} << (8 * i));
  return value;
}

// Appends fields to a byte vector.
class ByteWriter {
 public:
  explicit ByteWriter(std::vector<uint8_t>& out) : out_(out) {}

  void U8(uint8_t v) { out_.push_back(v); }
  void U16(uint16_t v) { Le(v); }
  void U32(uint32_t v) { Le(v); }
  void U64(uint64_t v) { Le(v); }
  void Bytes(std::span<const uint8_t> bytes) {
    out_.insert(out_.end(), bytes.begin(), bytes.end());
  }
  void Text(std::string_view text) {
    const auto* p = reinterpret_cast<const uint8_t*>(text.data());
    out_.insert(out_.end(), p, p + text.size());
  }
  // `text` NUL-padded (or cut) to exactly `width` bytes.
  void FixedText(std::string_view text, size_t width) {
    const size_t n = text.size() < width ? text.size() : width;
    Text(text.substr(0, n));
    out_.insert(out_.end(), width - n, 0);
  }
  size_t size() const { return out_.size(); }

 private:
  template <typename T>
  void Le(T v) {
    uint8_t b[sizeof(T)];
    StoreLe(b, v);
    out_.insert(out_.end(), b, b + sizeof(T));
  }

  std::vector<uint8_t>& out_;
};

// Reads fields from a byte span. A read past the end returns zero and sets
// a sticky `truncated()` flag instead of reading out of bounds, so a decoder
// can read a whole fixed layout and check once at the end.
class ByteReader {
 public:
  explicit ByteReader(std::span<const uint8_t> in) : in_(in) {}

  uint8_t U8() { return Le<uint8_t>(); }
  uint16_t U16() { return Le<uint16_t>(); }
  uint32_t U32() { return Le<uint32_t>(); }
  uint64_t U64() { return Le<uint64_t>(); }
  // The next `n` bytes, or an empty span (and truncated()) if fewer remain.
  std::span<const uint8_t> Bytes(size_t n) {
    if (!Need(n)) return {};
    auto out = in_.subspan(pos_, n);
    pos_ += n;
    return out;
  }
  void Skip(size_t n) { (void)Bytes(n); }

  bool truncated() const { return truncated_; }
  size_t remaining() const { return in_.size() - pos_; }
  size_t position() const { return pos_; }

 private:
  bool Need(size_t n) {
    if (truncated_ || in_.size() - pos_ < n) {
      truncated_ = true;
      return false;
    }
    return true;
  }
  template <typename T>
  T Le() {
    if (!Need(sizeof(T))) return 0;
    T v = LoadLe<T>(in_.data() + pos_);
    pos_ += sizeof(T);
    return v;
  }

  std::span<const uint8_t> in_;
  size_t pos_ = 0;
  bool truncated_ = false;
};

}  // namespace faultline::migration
