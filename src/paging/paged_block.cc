#include "src/paging/paged_block.h"

#include <sched.h>

#include <algorithm>
#include <utility>

#include "src/sys/mutex.h"

namespace faultline::paging {
namespace {

uint64_t NsSince(PagedBlock::Clock::time_point start) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(PagedBlock::Clock::now() - start)
          .count());
}

}  // namespace

PagedBlock::PagedBlock(PagerContext& ctx, std::shared_ptr<RamBlock> block,
                       std::unique_ptr<UffdInstaller> installer, uint32_t source_block)
    : ctx_(ctx),
      block_(std::move(block)),
      installer_(std::move(installer)),
      source_block_(source_block),
      states_(block_->size() / installer_->unit()) {}

Result<std::unique_ptr<PagedBlock>> PagedBlock::Create(PagerContext& ctx,
                                                       std::shared_ptr<RamBlock> block,
                                                       InstallerKind kind, uint32_t source_block,
                                                       const PresentMap& present) {
  if (block == nullptr) return Error("demand paging: no RAM block");
  ASSIGN_OR_RETURN(std::unique_ptr<UffdInstaller> installer,
                   UffdInstaller::Create(kind, *block, ctx.options().staging_slots));
  std::unique_ptr<PagedBlock> paged(
      new PagedBlock(ctx, std::move(block), std::move(installer), source_block));
  const uint64_t units = paged->states_.units();
  const uint64_t k = std::clamp<uint64_t>(ctx.options().queues_per_block, 1, units);
  paged->part_units_ = (units + k - 1) / k;
  for (uint64_t first = 0; first < units; first += paged->part_units_) {
    const uint64_t count = std::min(paged->part_units_, units - first);
    ASSIGN_OR_RETURN(auto queue, FaultQueue::Create(*paged, ctx.metrics().AddQueue(),
                                                    paged->OffsetOf(first), count * paged->unit()));
    paged->queues_.push_back(queue.get());
    paged->own_queues_.push_back(std::move(queue));
  }
  RETURN_IF_ERROR(paged->MarkPresent(present));
  return paged;
}

Result<std::unique_ptr<PagedBlock>> PagedBlock::CreateOnQueue(PagerContext& ctx,
                                                              std::shared_ptr<RamBlock> block,
                                                              uint32_t source_block,
                                                              FaultQueue& queue,
                                                              const PresentMap& zero) {
  if (block == nullptr) return Error("demand paging: no RAM block");
  // UFFDIO_COPY works across processes; MOVE and CONTINUE need the memory
  // (or its file) here.
  ASSIGN_OR_RETURN(
      std::unique_ptr<UffdInstaller> installer,
      UffdInstaller::Create(InstallerKind::kCopy, *block, ctx.options().staging_slots));
  std::unique_ptr<PagedBlock> paged(
      new PagedBlock(ctx, std::move(block), std::move(installer), source_block));
  paged->part_units_ = std::max<uint64_t>(paged->states_.units(), 1);
  paged->queues_.push_back(&queue);
  RETURN_IF_ERROR(paged->SetInitial(zero, PageState::kZero, "zero map"));
  return paged;
}

Status PagedBlock::SetInitial(const PresentMap& units, PageState state, const char* what) {
  for (const PageRun& run : units.runs()) {
    if (run.first > states_.units() || run.count > states_.units() - run.first) {
      return Error("{}: pages [{}, +{}) are outside block '{}' ({} pages)", what, run.first,
                   run.count, block_->name(), states_.units());
    }
    for (uint64_t u = run.first; u < run.first + run.count; ++u) states_.SetInitial(u, state);
  }
  return Status::Ok();
}

Status PagedBlock::MarkPresent(const PresentMap& present) {
  const auto start = Clock::now();
  RETURN_IF_ERROR(SetInitial(present, PageState::kPresent, "present map"));
  for (const PageRun& run : present.runs()) {
    // One call per run and queue: a run may span parts, and each part is
    // registered with its own userfaultfd.
    for (uint64_t u = run.first; u < run.first + run.count;) {
      const uint64_t part_end =
          std::min((u / part_units_ + 1) * part_units_, run.first + run.count);
      RETURN_IF_ERROR(
          installer_->MarkPresent(QueueFor(u).uffd(), OffsetOf(u), (part_end - u) * unit()));
      u = part_end;
    }
  }
  mark_present_seconds_ = std::chrono::duration<double>(Clock::now() - start).count();
  initial_present_ = present;
  return Status::Ok();
}

Status PagedBlock::Start() {
  for (auto& q : own_queues_) {
    RETURN_IF_ERROR(q->Start(ctx_.options().threads_per_queue, ctx_.options().realtime_priority));
  }
  return Status::Ok();
}

void PagedBlock::Stop() {
  for (auto& q : own_queues_) q->Stop();
}

Status PagedBlock::Unregister() {
  Status first;
  for (auto& q : own_queues_) {
    Status s = q->Unregister();
    if (first.ok()) first = s;
  }
  return first;
}

FaultQueue& PagedBlock::QueueFor(uint64_t unit) const {
  return *queues_[std::min<uint64_t>(unit / part_units_, queues_.size() - 1)];
}

uint64_t PagedBlock::missing_units() const {
  uint64_t n = 0;
  for (uint64_t u = 0; u < states_.units(); ++u) n += !IsSettled(states_.Load(u));
  return n;
}

void PagedBlock::HandleFault(FaultQueue& queue, const sys::UffdMessage& msg,
                             Clock::time_point read_at) {
  const uint64_t offset = msg.fault_address().value - Hva(block_->host()).value;
  if (msg.fault_address().value < Hva(block_->host()).value || offset >= block_->size()) {
    RecordError(Error("fault queue {}: fault at {:#x} outside block '{}'", queue.index(),
                      msg.fault_address().value, block_->name()));
    return;
  }
  const uint64_t unit = offset / this->unit();
  const uint32_t slot = ctx_.metrics().Fault(queue.index(), static_cast<pid_t>(msg.thread_id()));
  const Origin origin{Reason::kFault, read_at, slot};
  PageState s = states_.Load(unit);
  while (true) {
    switch (s) {
      case PageState::kMissing:
        if (!states_.CompareExchange(unit, s, PageState::kFetching)) continue;
        if (ctx_.options().on_demand_fetch) {
          ctx_.options().on_demand_fetch(source_block_, unit * this->unit(), this->unit());
        }
        if (installer_->uses_source()) {
          // A handler must not wait for a staging slot: it would stop
          // reading the very events that let fetches finish.
          StartFetch(unit, origin, /*may_wait=*/false);
        } else {
          ZeroFill(unit, msg.is_minor(), origin);
        }
        return;
      case PageState::kPresent:
        // Installed, yet faulting: the fault raced with the install (the
        // zero install below then finds the page and just wakes), or the
        // page was discarded without a REMOVE event (a hole punched in the
        // file) and reads as zeros like any discarded page.
        ctx_.metrics().faults_spurious.Add();
        if (initial_present_.Contains(unit)) ctx_.metrics().faults_on_present.Add();
        [[fallthrough]];
      case PageState::kZero:
        if (!states_.CompareExchange(unit, s, PageState::kZeroFilling)) continue;
        ZeroFill(unit, msg.is_minor(), origin);
        return;
      case PageState::kPoisoned:
        // Poison raises SIGBUS without a message; this one predates it.
        (void)queue.uffd().Wake(installer_->host(OffsetOf(unit)), this->unit());
        ctx_.metrics().Latency(slot, NsSince(read_at));
        return;
      case PageState::kFetching:
      case PageState::kFetchingDiscarded:
      case PageState::kZeroFilling:
        // The fetching thread's install wakes this thread too.
        ctx_.metrics().faults_joined.Add();
        Join(unit, slot, read_at);
        return;
    }
  }
}

void PagedBlock::JoinedFault(FaultQueue& queue, const sys::UffdMessage& msg,
                             Clock::time_point read_at) {
  const uint32_t slot = ctx_.metrics().Fault(queue.index(), static_cast<pid_t>(msg.thread_id()));
  ctx_.metrics().faults_joined.Add();
  const uint64_t offset = msg.fault_address().value - Hva(block_->host()).value;
  if (msg.fault_address().value < Hva(block_->host()).value || offset >= block_->size()) return;
  Join(offset / unit(), slot, read_at);
}

void PagedBlock::Join(uint64_t unit, uint32_t slot, Clock::time_point read_at) {
  const uint64_t key = KeyOf(unit);
  const uint32_t ticket = ctx_.metrics().Join(key, slot, FaultMetrics::Ns(read_at));
  if (ticket == FaultMetrics::kNoTicket) return;
  // Settled before the entry was visible to the settling thread (or since):
  // whichever of the two takes the entry first records it.
  if (IsSettled(states_.Load(unit))) ctx_.metrics().JoinSettled(ticket, key);
}

void PagedBlock::Settle(uint64_t unit, PageState state, const Origin& origin) {
  if (origin.reason == Reason::kFault) ctx_.metrics().Latency(origin.slot, NsSince(origin.start));
  states_.Settle(unit, state);
  ctx_.metrics().Settled(KeyOf(unit));
}

void PagedBlock::HandleRemove(FaultQueue& queue, Hva start, Hva end) {
  const uint64_t host = Hva(block_->host()).value;
  const uint64_t lo_at = std::max({start.value, queue.start().value, host});
  const uint64_t hi_at = std::min({end.value, queue.end().value, host + block_->size()});
  if (lo_at >= hi_at) return;
  ctx_.metrics().remove_events.Add();
  const uint64_t lo = lo_at - host;
  const uint64_t hi = hi_at - host;
  for (uint64_t u = lo / unit(); u < (hi + unit() - 1) / unit(); ++u) {
    PageState s = states_.Load(u);
    while (true) {
      // A zero fill reads as zeros either way.
      if (s == PageState::kFetchingDiscarded || s == PageState::kZero ||
          s == PageState::kZeroFilling) {
        break;
      }
      const PageState next =
          s == PageState::kFetching ? PageState::kFetchingDiscarded : PageState::kZero;
      if (states_.CompareExchange(u, s, next)) break;
    }
  }
}

Destination PagedBlock::BeginFetch(uint64_t unit, const Origin& origin, bool may_wait) {
  ctx_.FetchStarted();
  ctx_.metrics().Activity();
  ctx_.metrics().fetches.Add();
  if (origin.reason == Reason::kPush) ctx_.metrics().pushes.Add();
  if (origin.reason == Reason::kVmm) ctx_.metrics().vmm_fetches.Add();
  return installer_->Acquire(OffsetOf(unit), may_wait);
}

void PagedBlock::StartFetch(uint64_t unit, Origin origin, bool may_wait) {
  IssueFetch(unit, BeginFetch(unit, origin, may_wait), origin, 0);
}

void PagedBlock::IssueFetch(uint64_t unit, Destination dest, Origin origin, uint32_t attempt) {
  FetchRequest request;
  request.block_id = source_block_;
  request.offset = OffsetOf(unit);
  request.dest = dest.data;
  request.priority = origin.reason == Reason::kPush ? FetchPriority::kPush : FetchPriority::kFault;
  ctx_.source().Fetch(request, [this, unit, dest, origin, attempt](FetchResult result) {
    OnFetched(unit, dest, std::move(result), origin, attempt);
  });
}

template <typename Op>
Result<PagedBlock::Placed> PagedBlock::Place(uint64_t unit, uint64_t* bytes_copied, Op&& op) {
  FaultQueue& queue = QueueFor(unit);
  while (true) {
    sys::ReaderLock lock(queue.event_mu());
    if (states_.Load(unit) == PageState::kFetchingDiscarded) return Placed::kDiscarded;
    ASSIGN_OR_RETURN(InstallResult r, op(queue.uffd()));
    if (r.fill.done() || r.fill.bytes >= this->unit()) {
      *bytes_copied = r.bytes_copied;
      return Placed::kInstalled;
    }
    if (r.fill.outcome == sys::UffdFill::Outcome::kExists) {
      // Nothing installed, nobody woken: whoever mapped the page may have
      // done so without waking (or before this unit's faulters arrived).
      lock.Unlock();
      RETURN_IF_ERROR(queue.uffd().Wake(installer_->host(OffsetOf(unit)), this->unit()));
      return Placed::kExisted;
    }
    // EAGAIN: an event (REMOVE) is pending. Let go of the lock so that a
    // handler can read it, then try again.
    ctx_.metrics().install_retries.Add();
    lock.Unlock();
    sched_yield();
  }
}

void PagedBlock::OnFetched(uint64_t unit, Destination dest, FetchResult result, Origin origin,
                           uint32_t attempt) {
  switch (result.kind) {
    case FetchResult::Kind::kFilled: {
      ctx_.metrics().bytes_fetched.Add(this->unit());
      uint64_t copied = 0;
      auto placed = Place(unit, &copied, [&](const sys::Userfaultfd& uffd) {
        return installer_->Install(uffd, OffsetOf(unit), dest);
      });
      installer_->Release(dest);
      Finish(unit, std::move(placed), copied, /*zero=*/false, origin);
      break;
    }
    case FetchResult::Kind::kFailed:
      if (attempt + 1 < std::max<uint32_t>(ctx_.options().fetch_attempts, 1)) {
        ctx_.metrics().fetch_retries.Add();
        IssueFetch(unit, std::move(dest), origin, attempt + 1);
        return;  // still in flight
      }
      RecordError(
          result.error.WithContext(fmt::format("block '{}' offset {:#x}: fetch failed {} times",
                                               block_->name(), OffsetOf(unit), attempt + 1)));
      installer_->Release(dest);
      PoisonUnit(unit, result.error, origin);
      break;
    case FetchResult::Kind::kUnavailable:
      installer_->Release(dest);
      PoisonUnit(unit, result.error, origin);
      break;
  }
  ctx_.FetchDone();
}

void PagedBlock::Finish(uint64_t unit, Result<Placed> placed, uint64_t bytes_copied, bool zero,
                        const Origin& origin) {
  if (!placed.has_value()) {
    // The kernel refused the install itself. Poisoning is the one way left
    // not to leave the faulting threads blocked forever.
    RecordError(placed.error().WithContext(
        fmt::format("installing block '{}' offset {:#x}", block_->name(), OffsetOf(unit))));
    PoisonUnit(unit, placed.error(), origin);
    return;
  }
  switch (*placed) {
    case Placed::kInstalled:
      ctx_.metrics().Installed(this->unit(), bytes_copied, zero);
      Settle(unit, PageState::kPresent, origin);
      break;
    case Placed::kExisted:
      ctx_.metrics().already_present.Add();
      Settle(unit, PageState::kPresent, origin);
      break;
    case Placed::kDiscarded:
      DropDiscarded(unit, origin);
      break;
  }
}

void PagedBlock::ZeroFill(uint64_t unit, bool minor, Origin origin) {
  uint64_t copied = 0;
  auto placed = Place(unit, &copied, [&](const sys::Userfaultfd& uffd) {
    return installer_->InstallZero(uffd, OffsetOf(unit), minor);
  });
  Finish(unit, std::move(placed), copied, /*zero=*/true, origin);
}

void PagedBlock::PoisonUnit(uint64_t unit, const Status& why, const Origin& origin) {
  // Installed without waking: whoever waits on the unit (a faulting thread,
  // which then gets SIGBUS, or EnsurePresent) must find it recorded as
  // poisoned when it wakes, so the wake comes last.
  uint64_t copied = 0;
  auto placed = Place(unit, &copied, [&](const sys::Userfaultfd& uffd) -> Result<InstallResult> {
    ASSIGN_OR_RETURN(sys::UffdFill fill,
                     installer_->Poison(uffd, OffsetOf(unit), sys::UffdWake::kDontWake));
    return InstallResult{fill, 0};
  });
  if (!placed.has_value()) {
    RecordError(placed.error().WithContext(
        fmt::format("poisoning block '{}' offset {:#x}", block_->name(), OffsetOf(unit))));
    // Not woken: with nothing installed, a woken thread would only fault
    // again, forever. It waits until paging stops.
    Settle(unit, PageState::kPoisoned, origin);
    return;
  }
  if (*placed == Placed::kDiscarded) return DropDiscarded(unit, origin);
  if (*placed == Placed::kExisted) return Settle(unit, PageState::kPresent, origin);
  PoisonedUnit poisoned;
  poisoned.block = block_->name();
  poisoned.offset = OffsetOf(unit);
  poisoned.length = this->unit();
  poisoned.hva = installer_->host(poisoned.offset);
  poisoned.reason = why.ToString();
  ctx_.RecordPoison(std::move(poisoned));
  states_.Settle(unit, PageState::kPoisoned);
  if (Status s = QueueFor(unit).uffd().Wake(installer_->host(OffsetOf(unit)), this->unit());
      !s.ok()) {
    RecordError(s.WithContext(fmt::format("waking the faults on poisoned block '{}' offset {:#x}",
                                          block_->name(), OffsetOf(unit))));
  }
  // Timed once woken (the state was settled before the wake, see above).
  if (origin.reason == Reason::kFault) ctx_.metrics().Latency(origin.slot, NsSince(origin.start));
  ctx_.metrics().Settled(KeyOf(unit));
}

void PagedBlock::DropDiscarded(uint64_t unit, const Origin& origin) {
  if (installer_->kind() == InstallerKind::kContinue) {
    // The fetch wrote the page cache through the alias, possibly after the
    // discard freed it: free it again, without a REMOVE event.
    if (Status s = block_->Discard(OffsetOf(unit), this->unit()); !s.ok()) RecordError(s);
  }
  states_.Settle(unit, PageState::kZero);
  (void)QueueFor(unit).uffd().Wake(installer_->host(OffsetOf(unit)), this->unit());
  if (origin.reason == Reason::kFault) ctx_.metrics().Latency(origin.slot, NsSince(origin.start));
  ctx_.metrics().Settled(KeyOf(unit));
}

Status PagedBlock::EnsurePresent(uint64_t offset, uint64_t length) {
  if (offset > block_->size() || length > block_->size() - offset) {
    return Error("block '{}': [{:#x}, +{:#x}) is outside its {:#x} bytes", block_->name(), offset,
                 length, block_->size());
  }
  if (length == 0) return Status::Ok();
  const uint64_t first = offset / unit();
  const uint64_t end = (offset + length - 1) / unit() + 1;
  // Start every fetch first, so that they overlap, then wait for each.
  for (int pass = 0; pass < 2; ++pass) {
    for (uint64_t u = first; u < end; ++u) {
      PageState s = states_.Load(u);
      while (s != PageState::kPresent) {
        if (s == PageState::kPoisoned) {
          return Error(
              "block '{}' offset {:#x}: the page is poisoned (its source could not "
              "supply it)",
              block_->name(), OffsetOf(u));
        }
        if (s == PageState::kMissing || s == PageState::kZero) {
          const PageState was = s;
          const PageState owned =
              was == PageState::kMissing ? PageState::kFetching : PageState::kZeroFilling;
          if (!states_.CompareExchange(u, s, owned)) continue;
          const Origin vmm{Reason::kVmm, Clock::now()};
          if (was == PageState::kMissing) {
            StartFetch(u, vmm, /*may_wait=*/true);
          } else {
            ZeroFill(u, /*minor=*/false, vmm);
          }
        }
        if (pass == 0) break;
        s = states_.Load(u);
        if (s == PageState::kFetching || s == PageState::kFetchingDiscarded ||
            s == PageState::kZeroFilling) {
          states_.WaitWhile(u, s);
          s = states_.Load(u);
        }
      }
    }
  }
  return Status::Ok();
}

std::vector<PushSlot> PagedBlock::Claim(uint64_t offset, uint64_t length) {
  std::vector<PushSlot> slots;
  if (offset >= block_->size() || length == 0) return slots;
  length = std::min(length, block_->size() - offset);
  for (uint64_t u = offset / unit(); u < (offset + length - 1) / unit() + 1; ++u) {
    PageState s = PageState::kMissing;
    if (!states_.CompareExchange(u, s, PageState::kFetching)) continue;
    const Origin origin{Reason::kPush, Clock::now()};
    Destination dest = BeginFetch(u, origin, /*may_wait=*/true);
    const std::span<uint8_t> bytes = dest.data;
    slots.push_back({source_block_, OffsetOf(u), bytes,
                     [this, u, dest = std::move(dest), origin](FetchResult result) {
                       OnFetched(u, dest, std::move(result), origin, 0);
                     }});
  }
  return slots;
}

void PagedBlock::Push(uint64_t offset, uint64_t length) {
  if (offset >= block_->size() || length == 0) return;
  length = std::min(length, block_->size() - offset);
  for (uint64_t u = offset / unit(); u < (offset + length - 1) / unit() + 1; ++u) {
    PageState s = PageState::kMissing;
    if (states_.CompareExchange(u, s, PageState::kFetching)) {
      StartFetch(u, Origin{Reason::kPush, Clock::now()}, /*may_wait=*/true);
    }
  }
}

}  // namespace faultline::paging
