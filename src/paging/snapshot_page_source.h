// SnapshotPageSource: a PageSource serving pages from a snapshot held in
// memory or in a file, optionally after a fixed delay per request (a stand-in
// for a network round trip, so that fetches overlap the way they would with a
// real peer).
//
// It also counts fetches per 4 KiB page, which is how tests check that every
// page is fetched exactly once.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "src/paging/page_source.h"
#include "src/sys/mapping.h"
#include "src/sys/mutex.h"
#include "src/sys/unique_fd.h"

namespace faultline::paging {

class SnapshotPageSource final : public PageSource {
 public:
  struct Options {
    // Each fetch completes this long after Fetch was called; 0 completes
    // inline, on the caller's thread.
    std::chrono::nanoseconds delay{0};
    // Threads completing delayed fetches (copying into dest, calling done).
    uint32_t delay_threads = 1;
  };

  SnapshotPageSource() : SnapshotPageSource(Options{}) {}
  explicit SnapshotPageSource(Options options);
  ~SnapshotPageSource() override;  // CancelAll()

  // Adds a block served from a private copy of `bytes`; returns its id.
  Result<uint32_t> AddCopy(std::string name, std::span<const uint8_t> bytes);
  // Adds a block served from `bytes`, which `keep_alive` keeps valid.
  uint32_t AddMemory(std::string name, std::span<const uint8_t> bytes,
                     std::shared_ptr<const void> keep_alive);
  // Adds a block served from `size` bytes of `fd` at `file_offset` (pread).
  uint32_t AddFile(std::string name, sys::UniqueFd fd, uint64_t file_offset, uint64_t size);

  // Blocks must all be added before the first Fetch.
  void Fetch(const FetchRequest& request, FetchCallback done) override;
  void CancelAll() override;

  // How many times 4 KiB page `page` of block `block_id` has been fetched.
  uint32_t fetch_count(uint32_t block_id, uint64_t page) const;
  // Pages of the block fetched more than once.
  uint64_t refetched_pages(uint32_t block_id) const;
  uint64_t fetches() const { return fetches_.load(std::memory_order_relaxed); }
  uint64_t bytes_served() const { return bytes_served_.load(std::memory_order_relaxed); }

 private:
  struct Block {
    std::string name;
    uint64_t size = 0;
    std::span<const uint8_t> bytes;  // memory blocks
    std::shared_ptr<const void> keep_alive;
    sys::UniqueFd fd;  // file blocks
    uint64_t file_offset = 0;
    std::unique_ptr<std::atomic<uint32_t>[]> counts;  // one per 4 KiB page
  };
  struct Pending {
    std::chrono::steady_clock::time_point due;
    FetchRequest request;
    FetchCallback done;
  };

  Block& NewBlock(std::string name, uint64_t size);
  // Copies the bytes into request.dest; the result to report.
  FetchResult Serve(const FetchRequest& request);
  void DelayThread();

  const Options options_;
  std::vector<std::unique_ptr<Block>> blocks_;  // fixed once fetching starts
  std::atomic<uint64_t> fetches_{0};
  std::atomic<uint64_t> bytes_served_{0};

  sys::Mutex mu_;
  std::condition_variable cv_;
  std::deque<Pending> pending_ GUARDED_BY(mu_);  // in due order (constant delay)
  bool cancelled_ GUARDED_BY(mu_) = false;
  // Not guarded: started by the constructor, joined and cleared by
  // CancelAll; the delay threads never touch it.
  std::vector<std::thread> threads_;
};

}  // namespace faultline::paging
