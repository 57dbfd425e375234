// PushScheduler: which pages a post-copy source pushes next. Every page the
// destination does not have yet is pushed once; the order follows the
// guest: after each page request, the pages just after the requested one
// (and a few before) go first, because a guest that faults on a page
// usually touches its neighbours next. Without recent requests the push
// sweeps each block in address order.
//
// Thread-safe (one mutex): page-channel threads take batches, the request
// responder records requests and marks the pages it answered as sent.
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <vector>

#include "src/memory/dirty_bitmap.h"
#include "src/sys/mutex.h"

namespace faultline::migration {

struct PushBatch {
  uint32_t block = 0;
  std::vector<uint32_t> pages;  // strictly increasing wire-page indices
};

class PushScheduler {
 public:
  struct Options {
    uint32_t ahead = 64;   // neighbours after a requested page to push first
    uint32_t behind = 8;   // and before it
    uint32_t hints = 256;  // recent requests remembered (older ones are dropped)
  };

  // `todo[b]`: the 4 KiB pages of block b still to push; `unit_pages[b]`:
  // wire pages per install unit of block b (1, or 512 on hugetlb); a batch
  // never splits a unit.
  PushScheduler(std::vector<DirtyBitmap> todo, std::vector<uint32_t> unit_pages, Options options);
  PushScheduler(std::vector<DirtyBitmap> todo, std::vector<uint32_t> unit_pages)
      : PushScheduler(std::move(todo), std::move(unit_pages), Options{}) {}

  // The next batch of at most `max_pages` pages (at least one unit), taken
  // out of the to-do set; nullopt when everything was taken.
  std::optional<PushBatch> Next(uint32_t max_pages);
  // The destination asked for `pages` of `block` (being answered now): they
  // need no push, and their neighbourhood is pushed next.
  void Requested(uint32_t block, const std::vector<uint32_t>& pages);
  // A batch that could not be sent goes back (a broken link).
  void Return(const PushBatch& batch);
  uint64_t remaining() const;

 private:
  // Takes up to `max_pages` to-do pages of `block` from [first, end), whole
  // units, into `out`.
  void TakeLocked(uint32_t block, uint64_t first, uint64_t end, uint32_t max_pages, PushBatch& out)
      REQUIRES(mu_);

  const Options options_;
  const std::vector<uint32_t> unit_pages_;
  const size_t blocks_;  // todo_.size(), which never changes: checked without the lock
  // Taken after PostcopySource::scheduler_mu_ (progress() asks for
  // remaining() under it).
  mutable sys::Mutex mu_;
  std::vector<DirtyBitmap> todo_ GUARDED_BY(mu_);
  std::vector<uint64_t> cursor_ GUARDED_BY(mu_);  // the address-order sweep, per block
  struct Hint {
    uint32_t block;
    uint64_t first;
    uint64_t end;
  };
  std::deque<Hint> hints_ GUARDED_BY(mu_);  // newest first
  uint64_t remaining_ GUARDED_BY(mu_) = 0;
};

}  // namespace faultline::migration
