#include "src/migration/network_page_source.h"

#include <algorithm>
#include <cstring>

namespace faultline::migration {

NetworkPageSource::NetworkPageSource(std::vector<NetworkBlock> blocks)
    : blocks_(std::move(blocks)) {
  for (const NetworkBlock& b : blocks_) {
    have_.emplace_back(b.size / kWirePageSize);
    arriving_.emplace_back(b.direct != nullptr ? b.size / kWirePageSize : 0);
  }
}

NetworkPageSource::~NetworkPageSource() { CancelAll(); }

void NetworkPageSource::SetPushTarget(paging::PushTarget* target) {
  sys::MutexLock lock(mu_);
  push_target_ = target;
}

void NetworkPageSource::MarkHave(uint32_t block, const DirtyBitmap& pages) {
  sys::MutexLock lock(mu_);
  if (block < have_.size() && pages.pages() == have_[block].pages()) have_[block].Merge(pages);
}

NetworkPageSource::Pending* NetworkPageSource::FindLocked(uint32_t block, uint64_t page) {
  auto it = pending_.upper_bound({block, page});
  if (it == pending_.begin()) return nullptr;
  --it;
  Pending* p = it->second.get();
  if (p->block != block || page >= p->first + p->count) return nullptr;
  return p;
}

Status NetworkPageSource::Check(const paging::FetchRequest& request) const {
  const uint64_t size = request.dest.size();
  if (request.block_id >= blocks_.size() || size == 0 || size % kWirePageSize != 0 ||
      request.offset % kWirePageSize != 0 || request.offset > blocks_[request.block_id].size ||
      blocks_[request.block_id].size - request.offset < size ||
      size / kWirePageSize > kMaxRequestPages) {
    return Error(
        "network page source: fetch of block {} [{:#x}, +{:#x}) is outside the migrated "
        "memory",
        request.block_id, request.offset, size);
  }
  return Status::Ok();
}

std::unique_ptr<NetworkPageSource::Pending> NetworkPageSource::NewPending(
    const paging::FetchRequest& request, paging::FetchCallback done) {
  auto p = std::make_unique<Pending>();
  p->block = request.block_id;
  p->first = request.offset / kWirePageSize;
  p->count = static_cast<uint32_t>(request.dest.size() / kWirePageSize);
  p->dest = request.dest;
  p->done = std::move(done);
  p->priority = request.priority;
  p->start = Clock::now();
  p->claimed.assign(p->count, 0);
  return p;
}

void NetworkPageSource::Fetch(const paging::FetchRequest& request, paging::FetchCallback done) {
  if (Status s = Check(request); !s.ok()) {
    done(paging::FetchResult::Failed(std::move(s)));
    return;
  }
  auto p = NewPending(request, std::move(done));
  std::vector<PageRequest> requests;
  {
    sys::MutexLock lock(mu_);
    if (cancelled_) {
      lock.Unlock();
      p->done(paging::FetchResult::Failed(Status(ECANCELED, "network page source cancelled")));
      return;
    }
    // Hole blocks: pages pushed into the block's memory before anyone asked
    // are the data this fetch wants, if its destination is that memory.
    const NetworkBlock& b = blocks_[p->block];
    if (b.direct != nullptr && p->dest.data() == b.direct + request.offset) {
      for (uint32_t i = 0; i < p->count; ++i) {
        if (have_[p->block].Test(p->first + i)) {
          p->claimed[i] = kFilled;
          ++p->filled;
        } else if (arriving_[p->block].Test(p->first + i)) {
          // A push is being received into this very page now: it settles
          // the page. Requesting it too would let the reply be received
          // into the page after the push settled it, and so after the
          // fetch completed and the guest wrote there (the guest's write
          // lost under an older copy).
          p->claimed[i] = kArriving;
        }
      }
      if (p->filled == p->count) {
        ++stats_.fetches_inline;
        lock.Unlock();
        p->done(paging::FetchResult::Filled());
        return;
      }
    }
    requests = RequestsFor(*p);
    p->requested = !requests.empty();
    for (const PageRequest& r : requests) stats_.pages_requested += r.pages.size();
    const auto key = std::make_pair(p->block, p->first);
    pending_.emplace(key, std::move(p));
  }
  SendRequests(std::move(requests));
}

std::vector<PageRequest> NetworkPageSource::RequestsFor(const Pending& p) {
  std::vector<PageRequest> out;
  for (uint32_t i = 0; i < p.count; ++i) {
    if (p.claimed[i] != kWanted) continue;
    if (out.empty() || out.back().pages.size() == kMaxRequestPages) {
      out.push_back(PageRequest{p.block, next_request_id_++, {}});
    }
    out.back().pages.push_back(static_cast<uint32_t>(p.first + i));
  }
  return out;
}

void NetworkPageSource::SendRequests(std::vector<PageRequest> requests) {
  if (requests.empty()) return;
  sys::MutexLock lock(send_mu_);
  if (link_ == nullptr) return;  // sent again by the next Connect()
  for (const PageRequest& r : requests) {
    // A failed send means the link is breaking: the destination notices on
    // its reads, and Connect() sends every outstanding request again.
    if (!link_->writer().Send(r).ok()) return;
  }
  sys::MutexLock stats_lock(mu_);
  stats_.requests_sent += requests.size();
}

void NetworkPageSource::CancelAll() {
  std::map<std::pair<uint32_t, uint64_t>, std::unique_ptr<Pending>> pending;
  {
    sys::MutexLock lock(mu_);
    cancelled_ = true;
    pending.swap(pending_);
  }
  for (auto& [key, p] : pending) {
    p->done(paging::FetchResult::Failed(Status(ECANCELED, "network page source cancelled")));
  }
}

Status NetworkPageSource::Connect(Link* link) {
  std::vector<PageRequest> requests;
  {
    sys::MutexLock send_lock(send_mu_);
    link_ = link;
  }
  {
    sys::MutexLock lock(mu_);
    for (auto& [key, p] : pending_) {
      for (PageRequest& r : RequestsFor(*p)) {
        p->requested = true;
        requests.push_back(std::move(r));
      }
    }
  }
  SendRequests(std::move(requests));
  return Status::Ok();
}

void NetworkPageSource::Disconnect() {
  sys::MutexLock lock(send_mu_);
  link_ = nullptr;
}

void NetworkPageSource::ClaimPushed(uint32_t block, std::span<const uint32_t> pages) {
  if (blocks_[block].direct != nullptr) return;
  paging::PushTarget* target = nullptr;
  std::vector<std::pair<uint64_t, uint64_t>> runs;  // wire pages [first, end) nobody waits for
  {
    sys::MutexLock lock(mu_);
    target = push_target_;
    if (target == nullptr) return;
    for (uint32_t page : pages) {
      if (have_[block].Test(page) || FindLocked(block, page) != nullptr) continue;
      if (!runs.empty() && runs.back().second == page) {
        ++runs.back().second;
      } else {
        runs.emplace_back(page, page + 1);
      }
    }
  }
  // The pager's claims, outside mu_ (a claim may wait for a staging page).
  // Each claimed unit is fetching in the pager, so no fetch of it can come
  // in between: it becomes a pending fetch that sends no request.
  std::vector<std::unique_ptr<Pending>> claimed;
  std::vector<paging::FetchCallback> refused;
  for (auto [first, end] : runs) {
    for (paging::PushSlot& slot :
         target->Claim(block, first * kWirePageSize, (end - first) * kWirePageSize)) {
      const paging::FetchRequest request{slot.block_id, slot.offset, slot.dest,
                                         paging::FetchPriority::kPush};
      if (Status s = Check(request); !s.ok()) {
        slot.done(paging::FetchResult::Failed(s.WithContext("push claim")));
        continue;
      }
      claimed.push_back(NewPending(request, std::move(slot.done)));
    }
  }
  {
    sys::MutexLock lock(mu_);
    for (auto& p : claimed) {
      if (cancelled_ || FindLocked(p->block, p->first) != nullptr ||
          FindLocked(p->block, p->first + p->count - 1) != nullptr) {
        refused.push_back(std::move(p->done));
        continue;
      }
      const auto key = std::make_pair(p->block, p->first);
      pending_.emplace(key, std::move(p));
    }
  }
  for (auto& done : refused) {
    done(paging::FetchResult::Failed(
        Status(ECANCELED, "network page source: cancelled, or the pages are fetched already")));
  }
}

std::unique_ptr<NetworkPageSource::Pending> NetworkPageSource::SettleLocked(uint32_t block,
                                                                            uint64_t page,
                                                                            bool reply) {
  Pending* p = FindLocked(block, page);
  // Counted once, on its first arrival (a direct write and a reply of the
  // same hole page can both land).
  if (!have_[block].Test(page)) {
    have_[block].Set(page);
    ++(p != nullptr && p->requested ? stats_.pages_demanded : stats_.pages_pushed);
    if (reply) ++stats_.pages_replied;
  }
  if (p == nullptr) return nullptr;
  // kArriving here from a direct push: the fetch was made while the push
  // was received into the block's memory, where the fetch wants it (hole
  // blocks), so it is in place now. kFilled: a reply and a push of the same
  // page crossed; count it once.
  uint8_t& state = p->claimed[page - p->first];
  if (state == kFilled) return nullptr;
  state = kFilled;
  if (++p->filled < p->count) return nullptr;
  auto node = pending_.extract({p->block, p->first});
  return std::move(node.mapped());
}

void NetworkPageSource::Complete(std::unique_ptr<Pending> p) {
  if (p->priority == paging::FetchPriority::kFault) {
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - p->start);
    latency_.Record(static_cast<uint64_t>(ns.count()));
    sys::MutexLock lock(mu_);
    stats_.blocked_seconds += std::chrono::duration<double>(ns).count();
  }
  p->done(paging::FetchResult::Filled());
}

Status NetworkPageSource::ReceivePages(Link& link, const PagesHeader& header, bool reply) {
  const uint32_t b = header.block;  // checked against the block list by the decoder
  const size_t n = header.pages.size();
  ClaimPushed(b, header.pages);

  std::vector<MutableBuffer> dests(n);
  std::vector<Target> targets(n, Target::kScratch);
  std::vector<uint8_t> scratch;
  {
    sys::MutexLock lock(mu_);
    for (size_t i = 0; i < n; ++i) {
      const uint64_t page = header.pages[i];
      if (have_[b].Test(page)) continue;
      if (Pending* p = FindLocked(b, page);
          p != nullptr && p->claimed[page - p->first] == kWanted) {
        p->claimed[page - p->first] = kArriving;
        dests[i] = p->dest.subspan((page - p->first) * kWirePageSize, kWirePageSize);
        targets[i] = Target::kPending;
      } else if (p == nullptr && blocks_[b].direct != nullptr && !arriving_[b].Test(page)) {
        arriving_[b].Set(page);
        dests[i] = MutableBuffer(blocks_[b].direct + page * kWirePageSize, kWirePageSize);
        targets[i] = Target::kDirect;
      }
    }
    size_t scratch_pages = 0;
    for (Target t : targets) scratch_pages += t == Target::kScratch;
    scratch.resize(scratch_pages * kWirePageSize);
    size_t next = 0;
    for (size_t i = 0; i < n; ++i) {
      if (targets[i] != Target::kScratch) continue;
      dests[i] = MutableBuffer(scratch.data() + next++ * kWirePageSize, kWirePageSize);
      ++stats_.pages_duplicate;
    }
  }
  Status received = link.reader().ReceivePageData(dests);

  std::vector<std::unique_ptr<Pending>> completed;
  {
    sys::MutexLock lock(mu_);
    for (size_t i = 0; i < n; ++i) {
      const uint64_t page = header.pages[i];
      if (targets[i] == Target::kDirect) arriving_[b].Clear(page);
      if (targets[i] == Target::kScratch) continue;
      if (!received.ok()) {
        // Not in place: the page must come again (a resend after Connect).
        // A fetch made while a direct push arrived left the page to it.
        Pending* p = FindLocked(b, page);
        if (p != nullptr && p->claimed[page - p->first] == kArriving) {
          p->claimed[page - p->first] = kWanted;
        }
        continue;
      }
      if (auto done = SettleLocked(b, page, reply)) completed.push_back(std::move(done));
    }
  }
  for (auto& p : completed) Complete(std::move(p));
  return received;
}

void NetworkPageSource::ApplyZeroPages(const ZeroPages& zeros) {
  const uint32_t b = zeros.block;
  std::vector<uint32_t> pages;
  for (const PageRun& run : zeros.runs) {
    for (uint32_t i = 0; i < run.count; ++i) pages.push_back(run.first + i);
  }
  ClaimPushed(b, pages);
  std::vector<std::unique_ptr<Pending>> completed;
  sys::MutexLock lock(mu_);
  for (uint32_t page : pages) {
    if (have_[b].Test(page)) continue;
    Pending* p = FindLocked(b, page);
    if (p != nullptr && p->claimed[page - p->first] == kWanted) {
      std::memset(p->dest.data() + (page - p->first) * kWirePageSize, 0, kWirePageSize);
    } else if (p == nullptr && blocks_[b].direct != nullptr && !arriving_[b].Test(page)) {
      std::memset(blocks_[b].direct + page * kWirePageSize, 0, kWirePageSize);
    } else {
      continue;
    }
    if (auto done = SettleLocked(b, page, false)) completed.push_back(std::move(done));
  }
  // Callbacks without the lock: they install pages and may fetch again.
  lock.Unlock();
  for (auto& p : completed) Complete(std::move(p));
}

std::vector<DirtyBitmap> NetworkPageSource::have() const {
  sys::MutexLock lock(mu_);
  return have_;
}

uint64_t NetworkPageSource::outstanding_fetches() const {
  sys::MutexLock lock(mu_);
  return pending_.size();
}

NetworkSourceStats NetworkPageSource::stats() const {
  NetworkSourceStats s;
  {
    sys::MutexLock lock(mu_);
    s = stats_;
  }
  s.fault_latency = latency_.Summarize();
  return s;
}

}  // namespace faultline::migration
