// PageSender: sends one pass of pages over a session's page channels, one
// thread per channel. The pass's work is the dirty bitmap of each block, cut
// into regions of kRegionPages pages handed out in order; each thread sends
// its regions' data pages in Pages batches (header, index list and the pages
// themselves in one gather write, read straight from guest memory) and its
// zero pages as ZeroPages runs, then ends the pass on its channel.
//
// Reading guest memory while the guest writes it is intended: a page changed
// after the dirty log was harvested is dirty again and is resent in a later
// pass; the final pass runs with the guest paused.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "faultline/ram_block.h"
#include "src/memory/dirty_bitmap.h"
#include "src/migration/handshake.h"
#include "src/migration/source.h"
#include "src/sys/mutex.h"

namespace faultline::migration {

// Spreads page data over time so that all channels together stay under a
// rate. Thread-safe.
// True if the 4 KiB page at `page` is all zeros (sent as a zero run).
bool IsZeroPage(const uint8_t* page);

class Pacer {
 public:
  explicit Pacer(uint64_t bytes_per_second) : rate_(bytes_per_second) {}
  // Waits until `bytes` more may go (at once when unlimited).
  void Take(uint64_t bytes);

 private:
  const uint64_t rate_;
  sys::Mutex mu_;  // leaf
  std::chrono::steady_clock::time_point free_at_ GUARDED_BY(mu_){};
};

class PageSender {
 public:
  static constexpr uint64_t kRegionPages = 4096;  // 16 MiB of guest memory

  struct PassTotals {
    uint64_t data_pages = 0;
    uint64_t zero_pages = 0;
  };

  // `session` and `blocks` must outlive the sender. `pages_sent` counts
  // progress (data and zero pages) for status queries.
  PageSender(Session& session, std::vector<std::shared_ptr<RamBlock>> blocks,
             const SourceOptions& options, std::atomic<uint64_t>& pages_sent);

  // Sends the pages set in dirty[b] (4 KiB pages of blocks[b]) as pass
  // `pass`, then PassEnd on every page channel, or ChannelEnd when `final`.
  // On error the session is shut down, so that every thread stops.
  Result<PassTotals> SendPass(std::span<const DirtyBitmap> dirty, uint32_t pass, bool final);

 private:
  struct Region {
    uint32_t block;
    uint64_t first;
    uint64_t count;
  };
  Status SendShare(size_t channel, std::span<const DirtyBitmap> dirty, uint32_t pass, bool final,
                   PassTotals& totals);

  Session& session_;
  const std::vector<std::shared_ptr<RamBlock>> blocks_;
  const uint32_t batch_pages_;
  std::atomic<uint64_t>& pages_sent_;
  Pacer pacer_;
  // Per pass: the regions and the next one to take.
  std::vector<Region> regions_;
  std::atomic<size_t> next_region_{0};
  // Per channel, over all passes (ChannelEnd reports them). Each entry is
  // touched only by its channel's thread, and read after the threads joined.
  std::vector<PassTotals> channel_totals_;
};

}  // namespace faultline::migration
