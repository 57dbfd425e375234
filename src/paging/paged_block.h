// PagedBlock: demand paging of one RAM block through userfaultfd: the
// block's install-unit states, its installer, and K fault queues over its
// parts. Internal to DemandPager.
//
// Each unit is fetched at most once however many threads fault on it: the
// thread that moves it from kMissing to kFetching (compare-and-swap) fetches
// and installs; a fault on a unit being fetched only waits in the kernel,
// and the install's wake (the ioctl wakes every thread waiting on the
// range) releases them all.
//
// Fault latency (fault_metrics.h): the fault that started a fetch carries
// its read time and its thread's vCPU slot through the fetch (Origin) to
// the unit's settling; a fault that joins a fetch under way leaves an entry
// in FaultMetrics' join table, which the settling takes. So every fault is
// timed, by its own vCPU, joined or not.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "faultline/ram_block.h"
#include "faultline/status.h"
#include "src/paging/fault_queue.h"
#include "src/paging/installer.h"
#include "src/paging/page_state.h"
#include "src/paging/pager_context.h"
#include "src/paging/present_map.h"

namespace faultline::paging {

class PagedBlock final : public FaultSink {
 public:
  // Registers the block's parts with K userfaultfds and marks `present`
  // present. Faults wait (unread) until Start().
  static Result<std::unique_ptr<PagedBlock>> Create(PagerContext& ctx,
                                                    std::shared_ptr<RamBlock> block,
                                                    InstallerKind kind, uint32_t source_block,
                                                    const PresentMap& present);
  // A block that someone else registered on the userfaultfd `queue` reads
  // (an adopted one, shared with other blocks): installs go through it with
  // the copy installer, nothing is registered here. Units in `zero` read as
  // zeros: their faults get zero pages without the source.
  static Result<std::unique_ptr<PagedBlock>> CreateOnQueue(PagerContext& ctx,
                                                           std::shared_ptr<RamBlock> block,
                                                           uint32_t source_block, FaultQueue& queue,
                                                           const PresentMap& zero);
  PagedBlock(const PagedBlock&) = delete;
  PagedBlock& operator=(const PagedBlock&) = delete;

  // Start, Stop and Unregister act on the block's own queues only.
  Status Start();
  void Stop();  // handler threads only
  Status Unregister();

  RamBlock& block() const { return *block_; }
  PagerContext& ctx() const override { return ctx_; }
  uint64_t unit_at(Hva) const override { return unit(); }
  bool Contains(Hva address) const {
    return address.value >= Hva(block_->host()).value &&
           address.value - Hva(block_->host()).value < block_->size();
  }
  const UffdInstaller& installer() const { return *installer_; }
  uint64_t unit() const { return installer_->unit(); }
  // Units not yet settled (neither present, poisoned nor known zero).
  uint64_t missing_units() const;
  double mark_present_seconds() const { return mark_present_seconds_; }

  // From the fault queues' handler threads.
  void HandleFault(FaultQueue& queue, const sys::UffdMessage& msg,
                   Clock::time_point read_at) override;
  void JoinedFault(FaultQueue& queue, const sys::UffdMessage& msg,
                   Clock::time_point read_at) override;
  void HandleRemove(FaultQueue& queue, Hva start, Hva end) override REQUIRES(queue.event_mu());
  void RecordError(Status status) override { ctx_.RecordError(std::move(status)); }

  // Makes every unit overlapping [offset, offset + length) present, fetching
  // what is missing, and waits. An error names a poisoned unit.
  Status EnsurePresent(uint64_t offset, uint64_t length);
  // Starts fetching the missing units of the range; does not wait.
  void Push(uint64_t offset, uint64_t length);
  // Hands out the missing units of the range for pushed data to fill
  // (PushTarget::Claim): each is kFetching until its slot's done runs.
  std::vector<PushSlot> Claim(uint64_t offset, uint64_t length);
  uint32_t source_block() const { return source_block_; }

 private:
  enum class Reason { kFault, kVmm, kPush };
  enum class Placed { kInstalled, kExisted, kDiscarded };
  // Why a unit is fetched and, for a fault, since when and by whom (the
  // faulting thread's FaultMetrics slot).
  struct Origin {
    Reason reason = Reason::kPush;
    Clock::time_point start;
    uint32_t slot = FaultMetrics::kOtherSlot;
  };

  PagedBlock(PagerContext& ctx, std::shared_ptr<RamBlock> block,
             std::unique_ptr<UffdInstaller> installer, uint32_t source_block);
  Status MarkPresent(const PresentMap& present);
  // Before paging starts: `units` are in `state` (errors name `what`).
  Status SetInitial(const PresentMap& units, PageState state, const char* what);
  FaultQueue& QueueFor(uint64_t unit) const;
  uint64_t OffsetOf(uint64_t u) const { return u * unit(); }

  // The caller has moved `unit` to kFetching; these settle it.
  void StartFetch(uint64_t unit, Origin origin, bool may_wait);
  // The bookkeeping of a fetch that starts, and the place it fills.
  Destination BeginFetch(uint64_t unit, const Origin& origin, bool may_wait);
  void IssueFetch(uint64_t unit, Destination dest, Origin origin, uint32_t attempt);
  void OnFetched(uint64_t unit, Destination dest, FetchResult result, Origin origin,
                 uint32_t attempt);
  void ZeroFill(uint64_t unit, bool minor, Origin origin);
  void PoisonUnit(uint64_t unit, const Status& why, const Origin& origin);
  // The unit was discarded while it was being fetched: drop what was
  // fetched, let it read as zeros, and wake its faulters to fault again.
  void DropDiscarded(uint64_t unit, const Origin& origin);
  void Finish(uint64_t unit, Result<Placed> placed, uint64_t bytes_copied, bool zero,
              const Origin& origin);
  // Settles a unit this thread fetched (its faulters are woken already):
  // records the latency of the fault that started it and of those that
  // joined it.
  void Settle(uint64_t unit, PageState state, const Origin& origin);
  // A fault on `unit` while someone else fetches it: timed until it settles.
  void Join(uint64_t unit, uint32_t slot, Clock::time_point read_at);
  uint64_t KeyOf(uint64_t u) const { return installer_->host(OffsetOf(u)).value; }

  // Runs one install `op(uffd) -> Result<InstallResult>` for `unit` under
  // its queue's event lock, retrying EAGAIN, waking on EEXIST.
  template <typename Op>
  Result<Placed> Place(uint64_t unit, uint64_t* bytes_copied, Op&& op);

  PagerContext& ctx_;
  std::shared_ptr<RamBlock> block_;
  std::unique_ptr<UffdInstaller> installer_;
  const uint32_t source_block_;
  PageStateTable states_;
  std::vector<std::unique_ptr<FaultQueue>> own_queues_;
  std::vector<FaultQueue*> queues_;  // own_queues_, or the one adopted queue
  uint64_t part_units_ = 0;          // units per queue (the last may have fewer)
  PresentMap initial_present_;       // fixed after Create
  double mark_present_seconds_ = 0;
};

}  // namespace faultline::paging
