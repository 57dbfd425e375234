#include "src/migration/push_scheduler.h"

#include <algorithm>

namespace faultline::migration {

PushScheduler::PushScheduler(std::vector<DirtyBitmap> todo, std::vector<uint32_t> unit_pages,
                             Options options)
    : options_(options),
      unit_pages_(std::move(unit_pages)),
      blocks_(todo.size()),
      todo_(std::move(todo)) {
  cursor_.assign(todo_.size(), 0);
  for (const DirtyBitmap& t : todo_) remaining_ += t.Count();
}

void PushScheduler::TakeLocked(uint32_t block, uint64_t first, uint64_t end, uint32_t max_pages,
                               PushBatch& out) {
  DirtyBitmap& todo = todo_[block];
  const uint64_t unit = unit_pages_[block];
  first = first / unit * unit;
  end = std::min<uint64_t>((end + unit - 1) / unit * unit, todo.pages());
  for (uint64_t u = todo.FindNextSet(first); u < end;) {
    const uint64_t base = u / unit * unit;
    if (out.pages.size() + unit > std::max<uint64_t>(max_pages, unit) ||
        (!out.pages.empty() && out.block != block)) {
      return;
    }
    out.block = block;
    for (uint64_t p = base; p < base + unit && p < todo.pages(); ++p) {
      if (todo.TestAndClear(p)) {
        out.pages.push_back(static_cast<uint32_t>(p));
        --remaining_;
      }
    }
    u = todo.FindNextSet(base + unit);
  }
}

std::optional<PushBatch> PushScheduler::Next(uint32_t max_pages) {
  sys::MutexLock lock(mu_);
  PushBatch out;
  while (!hints_.empty() && out.pages.empty()) {
    const Hint h = hints_.front();
    hints_.pop_front();
    TakeLocked(h.block, h.first, h.end, max_pages, out);
    if (!out.pages.empty() && todo_[h.block].AnyInRange(h.first, h.end - h.first)) {
      hints_.push_front(h);  // more of this neighbourhood next time
    }
  }
  for (uint32_t b = 0; b < todo_.size() && out.pages.empty(); ++b) {
    TakeLocked(b, cursor_[b], todo_[b].pages(), max_pages, out);
    if (!out.pages.empty()) cursor_[b] = out.pages.back() + 1;
  }
  if (out.pages.empty()) return std::nullopt;
  std::sort(out.pages.begin(), out.pages.end());
  return out;
}

void PushScheduler::Requested(uint32_t block, const std::vector<uint32_t>& pages) {
  if (block >= blocks_ || pages.empty()) return;
  sys::MutexLock lock(mu_);
  DirtyBitmap& todo = todo_[block];
  for (uint32_t p : pages) {
    if (p < todo.pages() && todo.TestAndClear(p)) --remaining_;
  }
  const uint64_t first = pages.front() > options_.behind ? pages.front() - options_.behind : 0;
  const uint64_t end =
      std::min<uint64_t>(uint64_t{pages.back()} + 1 + options_.ahead, todo.pages());
  if (first < end) hints_.push_front(Hint{block, first, end});
  while (hints_.size() > options_.hints) hints_.pop_back();
}

void PushScheduler::Return(const PushBatch& batch) {
  sys::MutexLock lock(mu_);
  for (uint32_t p : batch.pages) {
    if (!todo_[batch.block].Test(p)) {
      todo_[batch.block].Set(p);
      ++remaining_;
    }
  }
  cursor_[batch.block] = std::min<uint64_t>(cursor_[batch.block], batch.pages.front());
}

uint64_t PushScheduler::remaining() const {
  sys::MutexLock lock(mu_);
  return remaining_;
}

}  // namespace faultline::migration
