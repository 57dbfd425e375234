#include "src/paging/snapshot_page_source.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "faultline/types.h"

namespace faultline::paging {

SnapshotPageSource::SnapshotPageSource(Options options) : options_(options) {
  if (options_.delay.count() > 0) {
    const uint32_t n = options_.delay_threads == 0 ? 1 : options_.delay_threads;
    for (uint32_t i = 0; i < n; ++i) threads_.emplace_back([this] { DelayThread(); });
  }
}

SnapshotPageSource::~SnapshotPageSource() { CancelAll(); }

SnapshotPageSource::Block& SnapshotPageSource::NewBlock(std::string name, uint64_t size) {
  auto block = std::make_unique<Block>();
  block->name = std::move(name);
  block->size = size;
  const uint64_t pages = AlignUp(size, kPageSize) / kPageSize;
  block->counts = std::make_unique<std::atomic<uint32_t>[]>(pages);
  blocks_.push_back(std::move(block));
  return *blocks_.back();
}

Result<uint32_t> SnapshotPageSource::AddCopy(std::string name, std::span<const uint8_t> bytes) {
  const std::string what = fmt::format("page source snapshot '{}'", name);
  ASSIGN_OR_RETURN(sys::Mapping copy, sys::Mapping::Anonymous(bytes.size(), what.c_str()));
  std::memcpy(copy.data(), bytes.data(), bytes.size());
  std::span<const uint8_t> view(copy.data(), bytes.size());
  auto owner = std::make_shared<sys::Mapping>(std::move(copy));
  return AddMemory(std::move(name), view, std::move(owner));
}

uint32_t SnapshotPageSource::AddMemory(std::string name, std::span<const uint8_t> bytes,
                                       std::shared_ptr<const void> keep_alive) {
  Block& block = NewBlock(std::move(name), bytes.size());
  block.bytes = bytes;
  block.keep_alive = std::move(keep_alive);
  return static_cast<uint32_t>(blocks_.size() - 1);
}

uint32_t SnapshotPageSource::AddFile(std::string name, sys::UniqueFd fd, uint64_t file_offset,
                                     uint64_t size) {
  Block& block = NewBlock(std::move(name), size);
  block.fd = std::move(fd);
  block.file_offset = file_offset;
  return static_cast<uint32_t>(blocks_.size() - 1);
}

FetchResult SnapshotPageSource::Serve(const FetchRequest& r) {
  // Requests come from our own pager, but a bad one must be an error, not an
  // out-of-bounds copy.
  if (r.block_id >= blocks_.size()) {
    return FetchResult::Failed(Error("page source: no block {}", r.block_id));
  }
  Block& block = *blocks_[r.block_id];
  const uint64_t size = r.dest.size();
  if (r.offset > block.size || size > block.size - r.offset) {
    return FetchResult::Failed(Error("page source '{}': [{:#x}, +{:#x}) is outside its {:#x} bytes",
                                     block.name, r.offset, size, block.size));
  }
  if (block.fd.valid()) {
    uint64_t done = 0;
    while (done < size) {
      const ssize_t n = ::pread(block.fd.get(), r.dest.data() + done, size - done,
                                static_cast<off_t>(block.file_offset + r.offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        const int err = n < 0 ? errno : EIO;
        return FetchResult::Failed(
            ErrnoError(err, "page source '{}': pread at {:#x}", block.name, r.offset + done));
      }
      done += static_cast<uint64_t>(n);
    }
  } else {
    std::memcpy(r.dest.data(), block.bytes.data() + r.offset, size);
  }
  for (uint64_t page = r.offset / kPageSize; page < (r.offset + size) / kPageSize; ++page) {
    block.counts[page].fetch_add(1, std::memory_order_relaxed);
  }
  fetches_.fetch_add(1, std::memory_order_relaxed);
  bytes_served_.fetch_add(size, std::memory_order_relaxed);
  return FetchResult::Filled();
}

void SnapshotPageSource::Fetch(const FetchRequest& request, FetchCallback done) {
  if (options_.delay.count() == 0) {
    bool cancelled;
    {
      sys::MutexLock lock(mu_);
      cancelled = cancelled_;
    }
    done(cancelled ? FetchResult::Failed(Error("page source: cancelled")) : Serve(request));
    return;
  }
  {
    sys::MutexLock lock(mu_);
    if (!cancelled_) {
      pending_.push_back(
          {std::chrono::steady_clock::now() + options_.delay, request, std::move(done)});
      cv_.notify_one();
      return;
    }
  }
  done(FetchResult::Failed(Error("page source: cancelled")));
}

void SnapshotPageSource::DelayThread() {
  sys::MutexLock lock(mu_);
  while (true) {
    if (cancelled_) return;
    if (pending_.empty()) {
      cv_.wait(lock.native());
      continue;
    }
    const auto due = pending_.front().due;
    if (std::chrono::steady_clock::now() < due) {
      cv_.wait_until(lock.native(), due);
      continue;
    }
    Pending p = std::move(pending_.front());
    pending_.pop_front();
    // Serve and complete without the lock: completions install pages and
    // may take a while; other threads keep serving meanwhile.
    lock.Unlock();
    p.done(Serve(p.request));
    lock.Lock();
  }
}

void SnapshotPageSource::CancelAll() {
  std::deque<Pending> dropped;
  {
    sys::MutexLock lock(mu_);
    if (cancelled_ && threads_.empty()) return;
    cancelled_ = true;
    dropped.swap(pending_);
    cv_.notify_all();
  }
  // Joining waits for completions in progress on the delay threads, so that
  // once this returns no callback is running.
  for (std::thread& t : threads_) t.join();
  threads_.clear();
  for (Pending& p : dropped) p.done(FetchResult::Failed(Error("page source: cancelled")));
}

uint32_t SnapshotPageSource::fetch_count(uint32_t block_id, uint64_t page) const {
  return blocks_.at(block_id)->counts[page].load(std::memory_order_relaxed);
}

uint64_t SnapshotPageSource::refetched_pages(uint32_t block_id) const {
  const Block& block = *blocks_.at(block_id);
  uint64_t n = 0;
  for (uint64_t page = 0; page < AlignUp(block.size, kPageSize) / kPageSize; ++page) {
    n += block.counts[page].load(std::memory_order_relaxed) > 1;
  }
  return n;
}

}  // namespace faultline::paging
