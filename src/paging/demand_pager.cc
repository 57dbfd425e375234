#include "src/paging/demand_pager.h"

#include <utility>

#include "src/paging/adopted_uffd.h"
#include "src/paging/paged_block.h"

namespace faultline::paging {

DemandPager::DemandPager(std::shared_ptr<PageSource> source, PagerOptions options)
    : ctx_(std::move(source), std::move(options)) {}

Result<std::unique_ptr<DemandPager>> DemandPager::Create(std::shared_ptr<PageSource> source,
                                                         PagerOptions options) {
  if (source == nullptr) return Error("demand paging: no page source");
  if (options.queues_per_block == 0 || options.threads_per_queue == 0) {
    return Error("demand paging: {} queues per block with {} threads each (need at least 1)",
                 options.queues_per_block, options.threads_per_queue);
  }
  return std::unique_ptr<DemandPager>(new DemandPager(std::move(source), std::move(options)));
}

DemandPager::~DemandPager() { Stop(); }

Status DemandPager::AddBlock(std::shared_ptr<RamBlock> block, InstallerKind kind,
                             uint32_t source_block, const PresentMap& present) {
  if (started_) return Error("demand paging: add blocks before Start()");
  if (block != nullptr && Find(*block) != nullptr) {
    return Error("demand paging: block '{}' is already paged", block->name());
  }
  ASSIGN_OR_RETURN(auto paged,
                   PagedBlock::Create(ctx_, std::move(block), kind, source_block, present));
  blocks_.push_back(std::move(paged));
  return Status::Ok();
}

Status DemandPager::AdoptUserfaultfd(sys::Userfaultfd uffd) {
  if (started_) return Error("demand paging: adopt the userfaultfd before Start()");
  if (adopted_ != nullptr) return Error("demand paging: a userfaultfd is adopted already");
  ASSIGN_OR_RETURN(adopted_, AdoptedUffd::Create(ctx_, std::move(uffd)));
  return Status::Ok();
}

Status DemandPager::AddAdoptedBlock(std::shared_ptr<RamBlock> block, uint32_t source_block,
                                    const PresentMap& zero) {
  if (started_) return Error("demand paging: add blocks before Start()");
  if (adopted_ == nullptr) return Error("demand paging: no adopted userfaultfd (AdoptUserfaultfd)");
  ASSIGN_OR_RETURN(auto paged, PagedBlock::CreateOnQueue(ctx_, std::move(block), source_block,
                                                         adopted_->queue(), zero));
  RETURN_IF_ERROR(adopted_->Add(*paged));
  blocks_.push_back(std::move(paged));
  return Status::Ok();
}

Status DemandPager::Start() {
  if (started_) return Error("demand paging: already started");
  started_ = true;
  for (auto& b : blocks_) RETURN_IF_ERROR(b->Start());
  if (adopted_ != nullptr) RETURN_IF_ERROR(adopted_->Start());
  return Status::Ok();
}

void DemandPager::Stop() {
  // Before stopped_ is seen: a VMM access after a Stop of a complete pager
  // finds every page there.
  complete_at_stop_.store(started_ && complete(), std::memory_order_relaxed);
  if (stopped_.exchange(true)) return;
  for (auto& b : blocks_) b->Stop();
  if (adopted_ != nullptr) adopted_->Stop();
  // Completions install through the registrations: unregister only once the
  // last one has run.
  ctx_.source().CancelAll();
  ctx_.WaitIdle();
  for (auto& b : blocks_) {
    if (Status s = b->Unregister(); !s.ok()) ctx_.RecordError(s);
  }
}

PagedBlock* DemandPager::Find(const RamBlock& block) const {
  for (const auto& b : blocks_) {
    if (&b->block() == &block) return b.get();
  }
  return nullptr;
}

Status DemandPager::EnsurePresent(const RamBlock& block, uint64_t offset, uint64_t length) {
  PagedBlock* paged = Find(block);
  if (paged == nullptr) return Status::Ok();  // not demand-paged: always present
  if (stopped_) {
    if (complete_at_stop_.load(std::memory_order_relaxed)) return Status::Ok();
    return Error("demand paging of block '{}' has stopped with pages missing", block.name());
  }
  return paged->EnsurePresent(offset, length);
}

Status DemandPager::Push(const RamBlock& block, uint64_t offset, uint64_t length) {
  PagedBlock* paged = Find(block);
  if (paged == nullptr) return Error("demand paging: block '{}' is not paged", block.name());
  if (stopped_) return Error("demand paging of block '{}' has stopped", block.name());
  paged->Push(offset, length);
  return Status::Ok();
}

uint64_t DemandPager::missing_units() const {
  uint64_t n = 0;
  for (const auto& b : blocks_) n += b->missing_units();
  return n;
}

double DemandPager::mark_present_seconds() const {
  double s = 0;
  for (const auto& b : blocks_) s += b->mark_present_seconds();
  return s;
}

const UffdInstaller* DemandPager::installer(const RamBlock& block) const {
  PagedBlock* paged = Find(block);
  return paged != nullptr ? &paged->installer() : nullptr;
}

std::vector<PushSlot> DemandPager::Claim(uint32_t block_id, uint64_t offset, uint64_t length) {
  if (stopped_) return {};
  for (const auto& b : blocks_) {
    if (b->source_block() == block_id) return b->Claim(offset, length);
  }
  return {};
}

}  // namespace faultline::paging
