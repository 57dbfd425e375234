// AdoptedUffd: a userfaultfd that another process opened and registered
// over several ranges of its own memory, then handed to us (a VMM's, through
// the page server's handshake). One FaultQueue reads it with several
// threads; each message goes to the PagedBlock whose range holds its
// address, a REMOVE event to every block it overlaps. Internal to
// DemandPager.
//
// The memory is the other process's: its addresses are only ever passed to
// the userfaultfd's ioctls (COPY, ZEROPAGE, POISON, WAKE), never
// dereferenced here (see ForeignBlock).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "faultline/status.h"
#include "src/paging/fault_queue.h"
#include "src/paging/pager_context.h"
#include "src/sys/userfaultfd.h"

namespace faultline::paging {

class AdoptedUffd final : public FaultSink {
 public:
  static Result<std::unique_ptr<AdoptedUffd>> Create(PagerContext& ctx, sys::Userfaultfd uffd);

  FaultQueue& queue() const { return *queue_; }
  // Before Start(); `block` is served through queue(). Blocks may not
  // overlap.
  Status Add(PagedBlock& block);
  Status Start();
  void Stop() { queue_->Stop(); }

  PagerContext& ctx() const override { return ctx_; }
  uint64_t unit_at(Hva address) const override;
  void HandleFault(FaultQueue& queue, const sys::UffdMessage& msg,
                   Clock::time_point read_at) override;
  void JoinedFault(FaultQueue& queue, const sys::UffdMessage& msg,
                   Clock::time_point read_at) override;
  void HandleRemove(FaultQueue& queue, Hva start, Hva end) override REQUIRES(queue.event_mu());
  void RecordError(Status status) override { ctx_.RecordError(std::move(status)); }

 private:
  explicit AdoptedUffd(PagerContext& ctx) : ctx_(ctx) {}
  PagedBlock* Find(Hva address) const;

  PagerContext& ctx_;
  std::unique_ptr<FaultQueue> queue_;
  // Sorted by address; written before Start() only, read-only afterwards
  // (so not guarded).
  std::vector<PagedBlock*> blocks_;
};

}  // namespace faultline::paging
