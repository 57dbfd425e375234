#include "src/paging/fault_injecting_page_source.h"

#include <utility>

namespace faultline::paging {

FaultInjectingPageSource::FaultInjectingPageSource(std::shared_ptr<PageSource> inner)
    : inner_(std::move(inner)) {}

void FaultInjectingPageSource::MakeUnavailable(uint32_t block_id, uint64_t offset,
                                               uint64_t length) {
  sys::MutexLock lock(mu_);
  rules_.push_back({block_id, offset, length, true, 0});
}

void FaultInjectingPageSource::FailFetches(uint32_t block_id, uint64_t offset, uint64_t length,
                                           uint32_t count) {
  sys::MutexLock lock(mu_);
  rules_.push_back({block_id, offset, length, false, count});
}

void FaultInjectingPageSource::Fetch(const FetchRequest& request, FetchCallback done) {
  const uint64_t n = seen_.fetch_add(1, std::memory_order_relaxed) + 1;
  const uint32_t every = every_nth_.load(std::memory_order_relaxed);
  if (every != 0 && n % every == 0) {
    failures_.fetch_add(1, std::memory_order_relaxed);
    done(FetchResult::Failed(Error("injected failure (every {}th fetch)", every)));
    return;
  }
  std::optional<FetchResult> injected;
  {
    sys::MutexLock lock(mu_);
    for (Rule& rule : rules_) {
      if (rule.block_id != request.block_id) continue;
      const uint64_t end = request.offset + request.dest.size();
      if (end <= rule.offset || request.offset >= rule.offset + rule.length) continue;
      if (rule.unavailable) {
        injected = FetchResult::Unavailable(
            Error("block {} [{:#x}, +{:#x}) is unavailable at the source (injected)",
                  request.block_id, rule.offset, rule.length));
        unavailable_.fetch_add(1, std::memory_order_relaxed);
        break;
      }
      if (rule.remaining > 0) {
        --rule.remaining;
        injected = FetchResult::Failed(
            Error("injected failure of block {} offset {:#x}", request.block_id, request.offset));
        failures_.fetch_add(1, std::memory_order_relaxed);
        break;
      }
    }
  }
  if (injected) {
    done(std::move(*injected));
    return;
  }
  inner_->Fetch(request, std::move(done));
}

}  // namespace faultline::paging
