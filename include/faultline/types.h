// Strong types for addresses and sizes, so a guest-physical address is never
// passed where a host-virtual one is expected.
#pragma once

#include <compare>
#include <cstddef>
#include <cstdint>

namespace faultline {

inline constexpr uint64_t kPageSize = 4096;
inline constexpr uint64_t kPageShift = 12;
inline constexpr uint64_t kHugePageSize = 2ull << 20;

constexpr bool IsAligned(uint64_t value, uint64_t alignment) {
  return (value & (alignment - 1)) == 0;
}
constexpr uint64_t AlignDown(uint64_t value, uint64_t alignment) {
  return value & ~(alignment - 1);
}
constexpr uint64_t AlignUp(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) & ~(alignment - 1);
}

// A guest-physical address.
struct Gpa {
  uint64_t value = 0;
  constexpr Gpa() = default;
  constexpr explicit Gpa(uint64_t v) : value(v) {}
  constexpr Gpa operator+(uint64_t offset) const { return Gpa(value + offset); }
  constexpr uint64_t operator-(Gpa other) const { return value - other.value; }
  friend constexpr auto operator<=>(Gpa, Gpa) = default;
};

// A host-virtual address in this process.
struct Hva {
  uint64_t value = 0;
  constexpr Hva() = default;
  constexpr explicit Hva(uint64_t v) : value(v) {}
  explicit Hva(const void* p) : value(reinterpret_cast<uintptr_t>(p)) {}
  template <typename T = uint8_t>
  T* ptr() const {
    return reinterpret_cast<T*>(value);
  }
  constexpr Hva operator+(uint64_t offset) const { return Hva(value + offset); }
  friend constexpr auto operator<=>(Hva, Hva) = default;
};

}  // namespace faultline
