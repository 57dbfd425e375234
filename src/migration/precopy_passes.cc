#include "src/migration/precopy_passes.h"

#include <chrono>

namespace faultline::migration {

PrecopyPasses::PrecopyPasses(SourceVm& vm, std::vector<std::shared_ptr<RamBlock>> blocks,
                             Session& session, const SourceOptions& options,
                             std::atomic<uint64_t>& pages_sent)
    : vm_(vm), blocks_(std::move(blocks)), sender_(session, blocks_, options, pages_sent) {
  for (const auto& b : blocks_) {
    dirty_.emplace_back(b->size() / kWirePageSize);
    dirty_.back().SetAll();  // pass 0: everything
    total_pages_ += b->size() / kWirePageSize;
  }
}

Result<PassStats> PrecopyPasses::Send(uint32_t pass, bool final) {
  const auto start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(PageSender::PassTotals totals, sender_.SendPass(dirty_, pass, final));
  for (DirtyBitmap& d : dirty_) d.ClearAll();
  PassStats s;
  s.pass = pass;
  s.data_pages = totals.data_pages;
  s.zero_pages = totals.zero_pages;
  s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return s;
}

Result<PassStats> PrecopyPasses::Run(uint32_t pass, Link& main) {
  ASSIGN_OR_RETURN(PassStats s, Send(pass, false));
  ASSIGN_OR_RETURN(s.dirty_after, Harvest());
  RETURN_IF_ERROR(main.writer().Send(PassEnd{pass, s.data_pages, s.zero_pages, s.dirty_after}));
  return s;
}

Result<uint64_t> PrecopyPasses::Harvest() {
  uint64_t count = 0;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    RETURN_IF_ERROR(vm_.TakeDirty(*blocks_[i], taken_));
    if (taken_.pages() != dirty_[i].pages()) {
      return Error("dirty bitmap of block '{}' has {} pages, expected {}", blocks_[i]->name(),
                   taken_.pages(), dirty_[i].pages());
    }
    dirty_[i].Merge(taken_);
    count += dirty_[i].Count();
  }
  return count;
}

}  // namespace faultline::migration
