#include "src/migration/page_sender.h"

#include <cstring>
#include <thread>

namespace faultline::migration {

bool IsZeroPage(const uint8_t* page) {
  // Word loads ORed a cache line at a time: non-zero pages usually differ
  // in the first line and exit at once.
  const auto* words = reinterpret_cast<const uint64_t*>(page);
  for (size_t i = 0; i < kWirePageSize / 8; i += 8) {
    uint64_t any = 0;
    for (size_t j = 0; j < 8; ++j) any |= words[i + j];
    if (any != 0) return false;
  }
  return true;
}

void Pacer::Take(uint64_t bytes) {
  if (rate_ == 0) return;
  std::chrono::steady_clock::time_point until;
  {
    sys::MutexLock lock(mu_);
    const auto now = std::chrono::steady_clock::now();
    const auto cost = std::chrono::nanoseconds(
        static_cast<int64_t>(static_cast<double>(bytes) * 1e9 / static_cast<double>(rate_)));
    free_at_ = std::max(now, free_at_) + cost;
    until = free_at_;
  }
  std::this_thread::sleep_until(until);
}

PageSender::PageSender(Session& session, std::vector<std::shared_ptr<RamBlock>> blocks,
                       const SourceOptions& options, std::atomic<uint64_t>& pages_sent)
    : session_(session),
      blocks_(std::move(blocks)),
      batch_pages_(options.batch_pages),
      pages_sent_(pages_sent),
      pacer_(options.bandwidth_limit),
      channel_totals_(session.pages.size()) {}

Result<PageSender::PassTotals> PageSender::SendPass(std::span<const DirtyBitmap> dirty,
                                                    uint32_t pass, bool final) {
  regions_.clear();
  for (uint32_t b = 0; b < blocks_.size(); ++b) {
    const uint64_t pages = dirty[b].pages();
    for (uint64_t first = 0; first < pages; first += kRegionPages) {
      const uint64_t count = std::min(kRegionPages, pages - first);
      if (dirty[b].AnyInRange(first, count)) regions_.push_back({b, first, count});
    }
  }
  next_region_.store(0);
  const size_t n = session_.pages.size();
  std::vector<PassTotals> totals(n);
  std::vector<Status> results(n);
  std::vector<std::thread> threads;
  for (size_t c = 0; c < n; ++c) {
    threads.emplace_back([&, c] {
      results[c] = SendShare(c, dirty, pass, final, totals[c]);
      if (!results[c].ok()) session_.Shutdown();  // stop the other channels too
    });
  }
  for (std::thread& t : threads) t.join();
  PassTotals sum;
  for (size_t c = 0; c < n; ++c) {
    RETURN_IF_ERROR(results[c].WithContext(fmt::format("page channel {}", c)));
    sum.data_pages += totals[c].data_pages;
    sum.zero_pages += totals[c].zero_pages;
  }
  return sum;
}

Status PageSender::SendShare(size_t channel, std::span<const DirtyBitmap> dirty, uint32_t pass,
                             bool final, PassTotals& totals) {
  MessageWriter& writer = session_.pages[channel]->writer();
  PagesHeader batch{0, pass, 0, {}};
  std::vector<ConstBuffer> data;
  ZeroPages zeros{0, pass, {}};
  batch.pages.reserve(batch_pages_);
  data.reserve(batch_pages_);

  auto flush_pages = [&]() -> Status {
    if (batch.pages.empty()) return Status::Ok();
    pacer_.Take(batch.pages.size() * kWirePageSize);
    RETURN_IF_ERROR(writer.SendPages(batch, data));
    totals.data_pages += batch.pages.size();
    pages_sent_.fetch_add(batch.pages.size(), std::memory_order_relaxed);
    batch.pages.clear();
    data.clear();
    return Status::Ok();
  };
  auto flush_zeros = [&]() -> Status {
    if (zeros.runs.empty()) return Status::Ok();
    RETURN_IF_ERROR(writer.Send(zeros));
    const uint64_t count = zeros.page_count();
    totals.zero_pages += count;
    pages_sent_.fetch_add(count, std::memory_order_relaxed);
    zeros.runs.clear();
    return Status::Ok();
  };

  for (size_t r = next_region_.fetch_add(1); r < regions_.size(); r = next_region_.fetch_add(1)) {
    const Region& region = regions_[r];
    const DirtyBitmap& bits = dirty[region.block];
    const uint8_t* host = blocks_[region.block]->host();
    batch.block = zeros.block = region.block;
    const uint64_t end = region.first + region.count;
    // Indices rise within a region, as Pages and ZeroPages require.
    for (uint64_t p = bits.FindNextSet(region.first); p < end; p = bits.FindNextSet(p + 1)) {
      const uint8_t* page = host + p * kWirePageSize;
      if (IsZeroPage(page)) {
        if (!zeros.runs.empty() && zeros.runs.back().first + zeros.runs.back().count == p) {
          ++zeros.runs.back().count;
        } else {
          if (zeros.runs.size() == kMaxZeroRuns) RETURN_IF_ERROR(flush_zeros());
          zeros.runs.push_back({static_cast<uint32_t>(p), 1});
        }
        continue;
      }
      batch.pages.push_back(static_cast<uint32_t>(p));
      data.push_back(ConstBuffer(page, kWirePageSize));
      if (batch.pages.size() == batch_pages_) RETURN_IF_ERROR(flush_pages());
    }
    // A region's messages name its block: flush before the next region.
    RETURN_IF_ERROR(flush_pages());
    RETURN_IF_ERROR(flush_zeros());
  }

  PassTotals& life = channel_totals_[channel];
  life.data_pages += totals.data_pages;
  life.zero_pages += totals.zero_pages;
  if (!final) return writer.Send(PassEnd{pass, totals.data_pages, totals.zero_pages, 0});
  return writer.Send(
      ChannelEnd{pass, totals.data_pages, totals.zero_pages, life.data_pages, life.zero_pages});
}

}  // namespace faultline::migration
