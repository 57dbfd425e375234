// Huge page reservations for the integration tests.
#pragma once

#include <cstdint>
#include <fstream>

#include "src/sys/memfd.h"

namespace faultline::integration {

// Raises /proc/sys/vm/nr_hugepages by `extra` for the scope and lowers it by
// the same amount afterwards (not back to a saved value, which would undo
// another test process's reservation made in between).
class HugePages {
 public:
  explicit HugePages(uint64_t extra) : extra_(extra) { Write(Read() + extra_); }
  ~HugePages() {
    const uint64_t now = Read();
    Write(now > extra_ ? now - extra_ : 0);
  }
  HugePages(const HugePages&) = delete;
  HugePages& operator=(const HugePages&) = delete;

  // Free 2 MiB pages in the pool (0 if it cannot be read).
  static uint64_t Free() {
    Result<sys::HugePagePool> pool = sys::ReadHugePagePool();
    return pool.has_value() ? pool->free : 0;
  }

 private:
  static uint64_t Read() {
    std::ifstream in("/proc/sys/vm/nr_hugepages");
    uint64_t n = 0;
    in >> n;
    return n;
  }
  static void Write(uint64_t n) { std::ofstream("/proc/sys/vm/nr_hugepages") << n; }
  const uint64_t extra_;
};

}  // namespace faultline::integration
