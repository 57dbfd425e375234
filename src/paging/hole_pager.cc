#include "src/paging/hole_pager.h"

#include <fcntl.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <utility>

namespace faultline::paging {

HolePager::HolePager(PagerContext& ctx, GuestMemory& memory, std::shared_ptr<RamBlock> block,
                     uint32_t source_block, uint64_t chunk, Gpa base, uint64_t chunks)
    : ctx_(ctx),
      memory_(memory),
      block_(std::move(block)),
      source_block_(source_block),
      chunk_(chunk),
      base_(base),
      chunks_(chunks),
      states_(chunks),
      present_(block_->size() / kPageSize),
      ours_(chunks, 0),
      mapped_(chunks, 1) {}

Result<std::unique_ptr<HolePager>> HolePager::Create(PagerContext& ctx, GuestMemory& memory,
                                                     std::shared_ptr<RamBlock> block,
                                                     uint32_t source_block,
                                                     const PresentMap& present, uint64_t chunk) {
  if (block == nullptr) return Error("hole paging: no RAM block");
  if (chunk < kMinHoleChunk || chunk > kMaxHoleChunk || (chunk & (chunk - 1)) != 0 ||
      !IsAligned(chunk, block->page_size())) {
    return Error(
        "hole paging of block '{}': chunk {:#x} must be a power of two from 4 KiB to 2 MiB and "
        "a multiple of its {} KiB pages",
        block->name(), chunk, block->page_size() >> 10);
  }
  std::shared_ptr<const MemoryMap> map = memory.map();
  const Placement* placement = map->FindPlacement(block->name());
  if (placement == nullptr || placement->block != block) {
    return Error("hole paging: block '{}' is not placed in guest memory", block->name());
  }
  if (!IsAligned(placement->base.value, chunk)) {
    return Error("hole paging of block '{}': its base {:#x} is not aligned to the {:#x} chunk",
                 block->name(), placement->base.value, chunk);
  }
  const uint64_t chunks = placement->size_in_use / chunk;
  std::unique_ptr<HolePager> pager(
      new HolePager(ctx, memory, block, source_block, chunk, placement->base, chunks));
  const uint64_t small_per_page = block->page_size() / kPageSize;
  for (const PageRun& run : present.runs()) {
    if (run.first > block->pages() || run.count > block->pages() - run.first) {
      return Error("present map: pages [{}, +{}) are outside block '{}'", run.first, run.count,
                   block->name());
    }
    pager->present_.SetRange(run.first * small_per_page, run.count * small_per_page);
  }
  pager->initial_present_ = present;
  // A chunk wholly present stays mapped; so does one overlapping a hole the
  // map had already (an MMIO window: not RAM, not ours). Every other chunk
  // becomes a hole of its own, in one layout change.
  const uint64_t pages_per_chunk = chunk / kPageSize;
  std::vector<uint64_t> holes;
  for (uint64_t c = 0; c < chunks; ++c) {
    const GpaRange range{pager->ChunkGpa(c), chunk};
    const bool window = std::any_of(placement->holes.begin(), placement->holes.end(),
                                    [&](const GpaRange& h) { return h.Overlaps(range); });
    const bool whole =
        pager->present_.CountRange(c * pages_per_chunk, pages_per_chunk) == pages_per_chunk;
    if (window || whole) {
      pager->states_.SetInitial(c, PageState::kPresent);
    } else {
      pager->ours_[c] = 1;
      holes.push_back(c);
    }
  }
  {
    // Nothing else has the pager yet: map_mu_ is taken (uncontended) only
    // because mapped_ is never written without it.
    sys::MutexLock lock(pager->map_mu_);
    for (uint64_t c : holes) pager->mapped_[c] = 0;
  }
  if (block->backing() == Backing::kHugetlb &&
      ::fallocate(block->fd(), 0, 0, static_cast<off_t>(block->size())) != 0) {
    // As the continue installer does: a chunk's fetch then pays for its
    // copy only, not for allocating and clearing huge pages (reserved at
    // mmap already; present pages keep their contents).
    const int err = errno;
    return ErrnoError(err, "hole paging: allocating the huge pages of block '{}'", block->name());
  }
  // Slots cut at the chunk size first, so that mapping a chunk later only
  // adds a slot (GuestMemory::TryFillHoleWithoutPause).
  RETURN_IF_ERROR(memory.SetMemslotGranule(chunk));
  ASSIGN_OR_RETURN(
      auto punched,
      memory.Update([&](const MemoryMap& m) -> Result<std::shared_ptr<const MemoryMap>> {
        MemoryMap::Builder edit = m.Edit();
        for (uint64_t c : holes) RETURN_IF_ERROR(edit.PunchHole(pager->ChunkGpa(c), chunk));
        return edit.Build();
      }));
  (void)punched;
  return pager;
}

uint64_t HolePager::missing_chunks() const {
  uint64_t n = 0;
  for (uint64_t c = 0; c < chunks_; ++c) n += !IsSettled(states_.Load(c));
  return n;
}

std::vector<HolePager::Run> HolePager::MissingRuns(uint64_t c) const {
  const uint64_t first_page = (ChunkGpa(c) - base_) / kPageSize;
  const uint64_t end_page = first_page + chunk_ / kPageSize;
  std::vector<Run> runs;
  for (uint64_t p = first_page; p < end_page;) {
    if (present_.Test(p)) {
      ++p;
      continue;
    }
    const uint64_t end = std::min(present_.FindNextSet(p), end_page);
    runs.push_back({p, end - p});
    p = end;
  }
  return runs;
}

HolePager::Round HolePager::FetchRound(const std::vector<Run>& runs, bool retry) {
  std::atomic<size_t> remaining{runs.size()};
  std::vector<FetchResult> results(runs.size());
  for (size_t i = 0; i < runs.size(); ++i) {
    ctx_.FetchStarted();
    ctx_.metrics().fetches.Add();
    if (retry) ctx_.metrics().fetch_retries.Add();
    FetchRequest request;
    request.block_id = source_block_;
    request.offset = runs[i].page * kPageSize;
    request.dest = {block_->host() + request.offset, runs[i].count * kPageSize};
    ctx_.source().Fetch(request, [&, i](FetchResult r) {
      results[i] = std::move(r);
      if (remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) remaining.notify_all();
      ctx_.FetchDone();
    });
  }
  for (size_t n = remaining.load(std::memory_order_acquire); n != 0;
       n = remaining.load(std::memory_order_acquire)) {
    remaining.wait(n, std::memory_order_acquire);
  }
  Round round;
  for (size_t i = 0; i < runs.size(); ++i) {
    switch (results[i].kind) {
      case FetchResult::Kind::kFilled:
        ctx_.metrics().bytes_fetched.Add(runs[i].count * kPageSize);
        break;
      case FetchResult::Kind::kUnavailable:
        round.unavailable = true;
        round.error = results[i].error;
        break;
      case FetchResult::Kind::kFailed:
        round.failed.push_back(runs[i]);
        round.error = results[i].error;
        break;
    }
  }
  return round;
}

// Not-present pages are only read here, from present_ as Create left it: a
// chunk is fetched once, so what a fetch brings in need not be recorded
// there (several threads fetching chunks that share a bitmap word would
// race on it).
void HolePager::FetchChunk(uint64_t c) {
  ctx_.metrics().Activity();
  std::vector<Run> runs = MissingRuns(c);
  const uint32_t attempts = std::max<uint32_t>(ctx_.options().fetch_attempts, 1);
  Round round;
  for (uint32_t attempt = 0; attempt < attempts && !runs.empty(); ++attempt) {
    round = FetchRound(runs, attempt > 0);
    if (round.unavailable) break;
    runs = std::move(round.failed);
  }
  if (!round.unavailable && runs.empty()) {
    ctx_.metrics().Installed(chunk_, 0, false);
    states_.Settle(c, PageState::kPresent);
    return;
  }
  if (!round.unavailable) {
    ctx_.RecordError(
        round.error.WithContext(fmt::format("block '{}' chunk at {:#x}: fetch failed {} times",
                                            block_->name(), ChunkGpa(c).value, attempts)));
  }
  PoisonedUnit lost;
  lost.block = block_->name();
  lost.offset = ChunkGpa(c) - base_;
  lost.length = chunk_;
  lost.hva = Hva(block_->host() + lost.offset);
  lost.reason = round.error.ToString();
  // Recorded before the waiters see the state change.
  ctx_.RecordPoison(std::move(lost));
  states_.Settle(c, PageState::kPoisoned);
}

bool HolePager::Map(uint64_t c, bool may_wait) {
  // A thread that may not wait (a vCPU) must not block on map_mu_ either:
  // its holder may be waiting, in FillHole, for every vCPU to pause. The
  // chunk then stays a pending map, retried by the next Resolve.
  if (may_wait) {
    map_mu_.Lock();
  } else if (!map_mu_.TryLock()) {
    AddPendingMap(c);
    return false;
  }
  sys::MutexLock lock(map_mu_, std::adopt_lock);
  if (mapped_[c]) return true;
  auto filled = memory_.TryFillHoleWithoutPause(ChunkGpa(c), chunk_);
  if (filled.has_value() && !*filled && may_wait) {
    // Busy with another layout change; from a thread that is not a vCPU we
    // may simply wait for it.
    Status s = memory_.FillHole(ChunkGpa(c), chunk_);
    filled = s.ok() ? Result<bool>(true) : Result<bool>(s);
  }
  if (!filled.has_value()) {
    ctx_.RecordError(filled.error());
    return false;
  }
  if (*filled) {
    mapped_[c] = 1;
    sys::MutexLock pending_lock(pending_mu_);
    std::erase(pending_maps_, c);
  } else {
    AddPendingMap(c);
  }
  return *filled;
}

void HolePager::AddPendingMap(uint64_t c) {
  sys::MutexLock lock(pending_mu_);
  if (std::find(pending_maps_.begin(), pending_maps_.end(), c) == pending_maps_.end()) {
    pending_maps_.push_back(c);
  }
}

void HolePager::RetryPendingMaps() {
  std::vector<uint64_t> pending;
  {
    sys::MutexLock lock(pending_mu_);
    pending = pending_maps_;
  }
  for (uint64_t c : pending) {
    if (!Map(c, /*may_wait=*/false)) return;  // still busy
  }
}

HolePager::Outcome HolePager::Resolve(Gpa gpa, bool vcpu_thread) {
  if (!Contains(gpa)) return Outcome::kNotOurs;
  const uint64_t c = (gpa - base_) / chunk_;
  if (!ours_[c]) return Outcome::kNotOurs;
  PageState s = states_.Load(c);
  while (true) {
    if (s == PageState::kMissing) {
      if (!states_.CompareExchange(c, s, PageState::kFetching)) continue;
      FetchChunk(c);
      s = states_.Load(c);
      if (s == PageState::kPresent) Map(c, !vcpu_thread);
      break;
    }
    if (s == PageState::kFetching) {
      ctx_.metrics().faults_joined.Add();
      states_.WaitWhile(c, s);
      s = states_.Load(c);
      continue;
    }
    break;
  }
  if (s == PageState::kPoisoned) return Outcome::kPoisoned;
  RetryPendingMaps();
  return Outcome::kPresent;
}

Status HolePager::EnsurePresent(Gpa gpa, uint64_t length, bool vcpu_thread) {
  const Gpa end_of_block = base_ + chunks_ * chunk_;
  const Gpa lo = std::max(gpa, base_);
  const Gpa hi = std::min(gpa + length, end_of_block);
  if (length == 0 || lo >= hi) return Status::Ok();
  for (uint64_t c = (lo - base_) / chunk_; c <= (hi - base_ - 1) / chunk_; ++c) {
    if (!ours_[c]) continue;
    if (Resolve(ChunkGpa(c), vcpu_thread) == Outcome::kPoisoned) {
      return Error(
          "guest-physical {:#x} (block '{}', chunk at {:#x}) is poisoned: its source could "
          "not supply it",
          std::max(gpa, ChunkGpa(c)).value, block_->name(), ChunkGpa(c).value);
    }
    // The VMM reads through the map next: the chunk must be mapped, not
    // merely present.
    for (int tries = 0; !Map(c, !vcpu_thread); ++tries) {
      if (tries == 1000) {
        return Error(
            "guest-physical {:#x}: chunk at {:#x} could not be mapped (another layout change "
            "kept guest memory busy)",
            std::max(gpa, ChunkGpa(c)).value, ChunkGpa(c).value);
      }
      sched_yield();
    }
  }
  return Status::Ok();
}

Status HolePager::PushAll() {
  for (uint64_t c = 0; c < chunks_; ++c) {
    PageState s = PageState::kMissing;
    if (states_.CompareExchange(c, s, PageState::kFetching)) {
      ctx_.metrics().pushes.Add();
      FetchChunk(c);
    }
    if (states_.Load(c) == PageState::kFetching) states_.WaitWhile(c, PageState::kFetching);
    if (states_.Load(c) == PageState::kPresent) Map(c, /*may_wait=*/true);
  }
  return ctx_.first_error();
}

Status HolePager::Finish(uint64_t granule) {
  if (const uint64_t missing = missing_chunks(); missing != 0) {
    return Error("hole paging of block '{}': {} chunks still missing — push them first",
                 block_->name(), missing);
  }
  for (uint64_t c = 0; c < chunks_; ++c) {
    if (states_.Load(c) == PageState::kPresent) Map(c, /*may_wait=*/true);
  }
  return memory_.SetMemslotGranule(granule);
}

}  // namespace faultline::paging
