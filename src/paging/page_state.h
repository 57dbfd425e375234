// PageStateTable: what demand paging knows about each install unit (a page,
// or a huge page on hugetlbfs) of one RAM block. One byte per unit, changed
// with compare-and-swap, so that exactly one thread fetches a unit however
// many fault on it at once.
//
//   kMissing ──fault/push/VMM──> kFetching ──fetched──> kPresent
//      │                            │    └──unavailable──> kPoisoned
//      │  REMOVE event              │ REMOVE event
//      v                            v
//    kZero <──completion────── kFetchingDiscarded
//      └──fault/VMM──> kZeroFilling ──zeros installed──> kPresent
//
// kFetching, kFetchingDiscarded and kZeroFilling belong to the thread that
// entered them: only it leaves them (REMOVE handling only turns kFetching
// into kFetchingDiscarded). Waiters
// (EnsurePresent) block on the byte with std::atomic::wait and are notified
// whenever a unit reaches a settled state (kPresent, kPoisoned, kZero).
// kZeroFilling counts as settled too (it never needs the source), so that
// a block once complete stays complete.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

namespace faultline::paging {

enum class PageState : uint8_t {
  kMissing = 0,
  kFetching,
  kFetchingDiscarded,  // fetching, but the range was discarded meanwhile
  kPresent,
  kPoisoned,
  kZero,  // discarded: reads as zeros; the next fault installs a zero page
  // A zero page being installed: owned like kFetching (waiters wait, one
  // thread installs), but settled, since it never needs the source. So a
  // fault on a zero page never turns a complete block incomplete again.
  kZeroFilling,
};

inline bool IsSettled(PageState s) {
  return s == PageState::kPresent || s == PageState::kPoisoned || s == PageState::kZero ||
         s == PageState::kZeroFilling;
}

class PageStateTable {
 public:
  explicit PageStateTable(uint64_t units)
      : units_(units), states_(std::make_unique<std::atomic<uint8_t>[]>(units)) {}

  uint64_t units() const { return units_; }

  PageState Load(uint64_t unit) const {
    return static_cast<PageState>(states_[unit].load(std::memory_order_acquire));
  }
  // Sets `unit` to `desired` if it is `expected`; otherwise loads the current
  // state into `expected`.
  bool CompareExchange(uint64_t unit, PageState& expected, PageState desired) {
    uint8_t e = static_cast<uint8_t>(expected);
    const bool ok = states_[unit].compare_exchange_strong(e, static_cast<uint8_t>(desired),
                                                          std::memory_order_acq_rel);
    expected = static_cast<PageState>(e);
    return ok;
  }
  // Settles a unit the caller owns (kFetching*) and wakes its waiters.
  void Settle(uint64_t unit, PageState state) {
    states_[unit].store(static_cast<uint8_t>(state), std::memory_order_release);
    states_[unit].notify_all();
  }
  // Before paging starts only (no concurrent access).
  void SetInitial(uint64_t unit, PageState state) {
    states_[unit].store(static_cast<uint8_t>(state), std::memory_order_relaxed);
  }
  // Blocks while `unit` is in state `old`.
  void WaitWhile(uint64_t unit, PageState old) const {
    states_[unit].wait(static_cast<uint8_t>(old), std::memory_order_acquire);
  }

 private:
  uint64_t units_;
  std::unique_ptr<std::atomic<uint8_t>[]> states_;
};

}  // namespace faultline::paging
