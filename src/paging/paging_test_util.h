// Helpers for the paging tests: page contents, huge page reservations,
// catching SIGBUS in a thread that touches a poisoned page.
#pragma once

#include <setjmp.h>
#include <signal.h>
#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <optional>
#include <span>
#include <vector>

#include "faultline/types.h"

namespace faultline::paging::testing {

// Word `index` of 4 KiB page `page` of the test snapshot. Never zero, so a
// zero-filled page is always wrong.
inline uint64_t PatternWord(uint64_t page, uint64_t index) {
  uint64_t x = page * 0x9e3779b97f4a7c15ull + index * 0xbf58476d1ce4e5b9ull + 1;
  x ^= x >> 31;
  return x | 1;
}

inline std::vector<uint8_t> PatternBytes(uint64_t size) {
  std::vector<uint8_t> v(size);
  auto* words = reinterpret_cast<uint64_t*>(v.data());
  for (uint64_t w = 0; w < size / 8; ++w) words[w] = PatternWord(w / 512, w % 512);
  return v;
}

// Pages of [p, p + size) whose first and last words differ from the pattern.
inline uint64_t WrongPages(const uint8_t* p, uint64_t first_page, uint64_t pages) {
  uint64_t wrong = 0;
  for (uint64_t i = 0; i < pages; ++i) {
    const auto* words = reinterpret_cast<const volatile uint64_t*>(p + i * kPageSize);
    wrong += words[0] != PatternWord(first_page + i, 0) ||
             words[511] != PatternWord(first_page + i, 511);
  }
  return wrong;
}

// Raises /proc/sys/vm/nr_hugepages by `extra` for the scope, if allowed.
class ScopedHugePages {
 public:
  explicit ScopedHugePages(uint64_t extra) {
    std::ifstream in(kPath);
    uint64_t value = 0;
    if (!(in >> value)) return;
    original_ = value;
    have_original_ = true;
    ok_ = Write(value + extra);
  }
  ~ScopedHugePages() {
    if (have_original_) Write(original_);
  }
  bool ok() const { return ok_; }

 private:
  static constexpr const char* kPath = "/proc/sys/vm/nr_hugepages";
  static bool Write(uint64_t v) {
    std::ofstream out(kPath);
    out << v << '\n';
    out.flush();
    return out.good();
  }
  // Not std::optional: GCC 12 -O2 warns (maybe-uninitialized) through it.
  uint64_t original_ = 0;
  bool have_original_ = false;
  bool ok_ = false;
};

// Catches SIGBUS from memory accesses in the calling thread:
//   SigbusCatcher catcher;
//   if (sigsetjmp(*catcher.Arm(), 1) == 0) { touch... } else { caught }
// The address and si_code of the last SIGBUS are kept per thread.
class SigbusCatcher {
 public:
  SigbusCatcher() {
    struct sigaction sa = {};
    sa.sa_sigaction = &Handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &old_);
  }
  ~SigbusCatcher() { sigaction(SIGBUS, &old_, nullptr); }
  sigjmp_buf* Arm() {
    armed_ = true;
    return &jump_;
  }
  static void Disarm() { armed_ = false; }
  static uintptr_t last_address() { return address_; }
  static int last_code() { return code_; }

 private:
  static void Handler(int sig, siginfo_t* info, void*) {
    if (!armed_) {
      signal(sig, SIG_DFL);
      raise(sig);
      return;
    }
    armed_ = false;
    address_ = reinterpret_cast<uintptr_t>(info->si_addr);
    code_ = info->si_code;
    siglongjmp(jump_, 1);
  }
  struct sigaction old_ = {};
  static inline thread_local sigjmp_buf jump_;
  static inline thread_local volatile bool armed_ = false;
  static inline thread_local uintptr_t address_ = 0;
  static inline thread_local int code_ = 0;
};

// Checks `pages` pages at `p` like WrongPages, adding to *wrong; false if
// the reads raised SIGBUS (the rest of the range is then not checked).
// -Wclobbered is a false alarm here: nothing live after a longjmp is
// modified between the sigsetjmp and it (C11 7.13.2.1p3).
#pragma GCC diagnostic push
#if !defined(__clang__)  // clang has no -Wclobbered (nor the false alarm)
#pragma GCC diagnostic ignored "-Wclobbered"
#endif
[[gnu::noinline]] inline bool CheckCatchingSigbus(SigbusCatcher& catcher, const uint8_t* p,
                                                  uint64_t first_page, uint64_t pages,
                                                  uint64_t* wrong) {
  if (sigsetjmp(*catcher.Arm(), 1) != 0) return false;
  *wrong += WrongPages(p, first_page, pages);
  SigbusCatcher::Disarm();
  return true;
}
#pragma GCC diagnostic pop

}  // namespace faultline::paging::testing
