// FaultInjectingPageSource: wraps another PageSource and makes chosen pages
// unavailable (a memory error at the source: the pager must poison them) or
// makes fetches fail (transient errors: the pager must retry, then give up
// cleanly). The deliberately bad peer the tests use.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "src/paging/page_source.h"
#include "src/sys/mutex.h"

namespace faultline::paging {

class FaultInjectingPageSource final : public PageSource {
 public:
  explicit FaultInjectingPageSource(std::shared_ptr<PageSource> inner);

  // Fetches that touch any byte of block [offset, offset + length) report
  // kUnavailable, without asking the inner source.
  void MakeUnavailable(uint32_t block_id, uint64_t offset, uint64_t length);
  // The next `count` fetches that touch block [offset, offset + length) fail
  // (kFailed) without asking the inner source.
  void FailFetches(uint32_t block_id, uint64_t offset, uint64_t length, uint32_t count);
  // Every n-th fetch overall fails (0: none).
  void FailEveryNth(uint32_t n) { every_nth_.store(n, std::memory_order_relaxed); }

  void Fetch(const FetchRequest& request, FetchCallback done) override;
  void CancelAll() override { inner_->CancelAll(); }

  uint64_t injected_unavailable() const { return unavailable_.load(std::memory_order_relaxed); }
  uint64_t injected_failures() const { return failures_.load(std::memory_order_relaxed); }

 private:
  struct Rule {
    uint32_t block_id;
    uint64_t offset;
    uint64_t length;
    bool unavailable;    // else: fail
    uint32_t remaining;  // failures left (fail rules)
  };

  std::shared_ptr<PageSource> inner_;
  sys::Mutex mu_;
  std::vector<Rule> rules_ GUARDED_BY(mu_);
  std::atomic<uint32_t> every_nth_{0};
  std::atomic<uint64_t> seen_{0};
  std::atomic<uint64_t> unavailable_{0};
  std::atomic<uint64_t> failures_{0};
};

}  // namespace faultline::paging
