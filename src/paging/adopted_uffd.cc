#include "src/paging/adopted_uffd.h"

#include <algorithm>
#include <utility>

#include "src/paging/paged_block.h"

namespace faultline::paging {

Result<std::unique_ptr<AdoptedUffd>> AdoptedUffd::Create(PagerContext& ctx, sys::Userfaultfd uffd) {
  std::unique_ptr<AdoptedUffd> adopted(new AdoptedUffd(ctx));
  ASSIGN_OR_RETURN(adopted->queue_,
                   FaultQueue::Adopt(*adopted, ctx.metrics().AddQueue(), std::move(uffd)));
  return adopted;
}

Status AdoptedUffd::Add(PagedBlock& block) {
  const uint64_t start = Hva(block.block().host()).value;
  const uint64_t end = start + block.block().size();
  for (const PagedBlock* other : blocks_) {
    const uint64_t o = Hva(other->block().host()).value;
    if (start < o + other->block().size() && o < end) {
      return Error("demand paging: block '{}' [{:#x}, {:#x}) overlaps block '{}'",
                   block.block().name(), start, end, other->block().name());
    }
  }
  blocks_.push_back(&block);
  std::sort(blocks_.begin(), blocks_.end(), [](const PagedBlock* a, const PagedBlock* b) {
    return a->block().host() < b->block().host();
  });
  return Status::Ok();
}

Status AdoptedUffd::Start() {
  return queue_->Start(ctx_.options().threads_per_queue, ctx_.options().realtime_priority);
}

PagedBlock* AdoptedUffd::Find(Hva address) const {
  // The last block starting at or below the address.
  auto it = std::upper_bound(
      blocks_.begin(), blocks_.end(), address.value,
      [](uint64_t a, const PagedBlock* b) { return a < Hva(b->block().host()).value; });
  if (it == blocks_.begin()) return nullptr;
  PagedBlock* block = *(it - 1);
  return block->Contains(address) ? block : nullptr;
}

uint64_t AdoptedUffd::unit_at(Hva address) const {
  const PagedBlock* block = Find(address);
  return block != nullptr ? block->unit() : kPageSize;
}

void AdoptedUffd::HandleFault(FaultQueue& queue, const sys::UffdMessage& msg,
                              Clock::time_point read_at) {
  PagedBlock* block = Find(msg.fault_address());
  if (block == nullptr) {
    // Registered by the other process but not described to us: nothing
    // can serve it, and its thread stays blocked.
    RecordError(Error("adopted userfaultfd: fault at {:#x} outside every region described",
                      msg.fault_address().value));
    return;
  }
  block->HandleFault(queue, msg, read_at);
}

void AdoptedUffd::JoinedFault(FaultQueue& queue, const sys::UffdMessage& msg,
                              Clock::time_point read_at) {
  if (PagedBlock* block = Find(msg.fault_address()); block != nullptr) {
    block->JoinedFault(queue, msg, read_at);
  }
}

void AdoptedUffd::HandleRemove(FaultQueue& queue, Hva start, Hva end) {
  for (PagedBlock* block : blocks_) block->HandleRemove(queue, start, end);
}

}  // namespace faultline::paging
