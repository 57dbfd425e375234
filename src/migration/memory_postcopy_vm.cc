// The post-copy destination for a VMM whose RAM is a GuestMemory: a
// GuestPager over its blocks, attached to the VMM through VmControl.
#include <fcntl.h>

#include <algorithm>
#include <cerrno>

#include "src/migration/memory_vm.h"
#include "src/migration/wire.h"
#include "src/paging/guest_pager.h"
#include "src/paging/present_map.h"

namespace faultline::migration {

namespace {

Backing FirstBacking(const GuestMemory& memory) {
  auto blocks = memory.blocks();
  return blocks.empty() ? Backing::kAnonymous : blocks[0]->backing();
}

class MemoryPostcopyDestination final : public PostcopyDestinationVm {
 public:
  MemoryPostcopyDestination(GuestMemory& memory, std::unique_ptr<VmControl> vm,
                            PostcopyVmOptions options)
      : memory_(memory),
        vm_(*vm),
        options_(std::move(options)),
        precopy_(MakeMemoryDestination(memory, std::move(vm))) {
    installer_ = options_.installer.value_or(paging::BestInstaller(FirstBacking(memory_)));
    // Hole: the memslots are cut at the chunk size now, while the VM here
    // does not run yet, not inside the switchover pause: a layout change of
    // hundreds of slots takes about a second on this host (the pause of a
    // 256 MiB guest was 0.6-1.6 s on anon, memfd and hugetlb). HolePager
    // then only punches the missing chunks; FinishPaging restores the
    // granule.
    original_granule_ = memory_.memslot_granule();
    if (installer_ == paging::InstallerKind::kHole) {
      prepared_ = memory_.SetMemslotGranule(options_.hole_chunk);
    }
    // Continue on hugetlb allocates every huge page of the file before
    // paging starts (the kernel clears each, 2 MiB at a time), so that a
    // fault pays for one copy only: do it now too, not inside the pause
    // (about 300 ms for 2 GiB here). The pages were reserved when the block
    // was mapped: this takes no memory it did not hold already.
    if (installer_ == paging::InstallerKind::kContinue && prepared_.ok()) {
      for (const auto& block : memory_.blocks()) {
        if (block->backing() != Backing::kHugetlb) continue;
        if (::fallocate(block->fd(), 0, 0, static_cast<off_t>(block->size())) != 0) {
          const int err = errno;
          prepared_ = ErrnoError(err, "allocating the huge pages of block '{}'", block->name());
          break;
        }
      }
    }
  }
  ~MemoryPostcopyDestination() override {
    if (pager_) vm_.AttachPager(nullptr);
  }

  // What pre-copy needs of the VM is the pre-copy destination's.
  std::vector<std::shared_ptr<RamBlock>> blocks() override { return precopy_->blocks(); }
  HelloAccel accelerator() const override { return precopy_->accelerator(); }
  bool memory_is_zero() const override { return precopy_->memory_is_zero(); }
  uint32_t vcpu_count() const override { return precopy_->vcpu_count(); }
  Status LoadVcpus(std::span<const std::vector<uint8_t>> blobs) override {
    return precopy_->LoadVcpus(blobs);
  }
  Status LoadDevices(std::span<const DeviceBlob> devices) override {
    return precopy_->LoadDevices(devices);
  }

  Status DropPages(uint32_t block, uint64_t first, uint64_t count) override {
    auto blocks = memory_.blocks();
    if (block >= blocks.size()) return Error("post-copy: no block {}", block);
    // Hole: missing pages are fetched into the block whatever it holds.
    // Continue: pre-copy wrote through the alias, so a stale page is in the
    // page cache but not mapped: not marked present, it faults (MINOR) and
    // is fetched over.
    if (installer_ == paging::InstallerKind::kHole ||
        (installer_ == paging::InstallerKind::kContinue && blocks[block]->alias() != nullptr) ||
        blocks[block]->page_size() != kWirePageSize) {
      return Status::Ok();
    }
    return blocks[block]->Discard(first * kWirePageSize, count * kWirePageSize);
  }

  uint8_t* direct_push_target(uint32_t block) override {
    auto blocks = memory_.blocks();
    if (installer_ != paging::InstallerKind::kHole || block >= blocks.size()) return nullptr;
    return blocks[block]->host();
  }

  Status StartPostcopy(std::shared_ptr<paging::PageSource> source,
                       std::span<const DirtyBitmap> present,
                       std::span<const std::vector<uint8_t>> vcpus,
                       std::span<const DeviceBlob> devices) override {
    auto blocks = memory_.blocks();
    if (present.size() != blocks.size()) {
      return Error("post-copy: {} present maps for {} blocks", present.size(), blocks.size());
    }
    std::vector<paging::BlockToPage> to_page;
    for (uint32_t b = 0; b < blocks.size(); ++b) {
      RamBlock& block = *blocks[b];
      const uint64_t per_unit = block.page_size() / kWirePageSize;
      // A block page (2 MiB on hugetlb) is present if all its wire pages are.
      // Run by run: a bit at a time costs milliseconds of the pause at 2 GiB.
      DirtyBitmap units(block.pages());
      present[b].ForEachRun([&](uint64_t first, uint64_t count) {
        const uint64_t from = (first + per_unit - 1) / per_unit;
        const uint64_t to = (first + count) / per_unit;
        if (to > from) units.SetRange(from, to - from);
      });
      // Stale copies (dirtied at the source since they were sent) must fault:
      // drop them. Memory never written reads as zeros and is dropped cheaply.
      // Not for continue through the alias: pre-copy wrote there, so a stale
      // page is in the page cache but not mapped where the guest runs, and
      // it faults (MINOR) unless marked present; its fetch overwrites it.
      if (installer_ != paging::InstallerKind::kHole && per_unit > 1 &&
          !(installer_ == paging::InstallerKind::kContinue && block.alias() != nullptr)) {
        for (uint64_t u = units.FindNextClear(0); u < units.pages();) {
          const uint64_t end = std::min(units.FindNextSet(u), units.pages());
          RETURN_IF_ERROR(block.Discard(u * block.page_size(), (end - u) * block.page_size())
                              .WithContext("dropping stale pages before post-copy"));
          u = end < units.pages() ? units.FindNextClear(end) : units.pages();
        }
      }
      to_page.push_back({blocks[b], b, paging::PresentMap::FromBitmap(units)});
    }
    paging::GuestPagingOptions options;
    options.installer = installer_;
    options.pager = options_.pager;
    options.pager.realtime_priority = options_.realtime_priority;
    // Each page channel claims places for up to a batch of pushed pages at
    // once and fills their staging pages itself: there must be slots for
    // all of them and for the faults besides.
    if (options.pager.staging_slots == 0) options.pager.staging_slots = 2048;
    options.hole_chunk = options_.hole_chunk;
    ASSIGN_OR_RETURN(pager_, paging::GuestPager::Create(memory_, std::move(source),
                                                        std::move(to_page), options));
    vm_.AttachPager(pager_.get());
    RETURN_IF_ERROR(LoadVcpus(vcpus));
    RETURN_IF_ERROR(LoadDevices(devices));
    RETURN_IF_ERROR(vm_.PrepareVcpus(*pager_));
    RETURN_IF_ERROR(pager_->Start());
    return vm_.Start();
  }

  paging::PushTarget* push_target() override { return pager_ ? pager_->demand_pager() : nullptr; }
  Status FetchMissing() override { return pager_ ? pager_->PushAll() : Status::Ok(); }
  // Hole: the chunk memslots are merged back. Userfaultfd installers
  // unregister, so that the VM can be migrated on or snapshotted (a
  // write-protect dirty tracker needs the memory for its own userfaultfd);
  // the VMM's own accesses go on finding every page.
  Status FinishPaging() override {
    if (!pager_) return Status::Ok();
    if (!pager_->complete()) return Error("post-copy: pages are still missing");
    RETURN_IF_ERROR(pager_->Finish());
    if (installer_ == paging::InstallerKind::kHole) {
      return memory_.SetMemslotGranule(original_granule_);
    }
    return Status::Ok();
  }
  bool paging_complete() override { return !pager_ || pager_->complete(); }
  paging::PagingStats paging_stats() override {
    return pager_ ? pager_->stats() : paging::PagingStats{};
  }
  paging::InstallerKind installer() const override { return installer_; }
  Status CheckPaging() override {
    RETURN_IF_ERROR(prepared_.WithContext("post-copy destination: preparing for the installer"));
    for (const auto& block : memory_.blocks()) {
      const Backing backing = block->backing();
      // The zero installer answers every fault with zeros and never asks
      // the source: a floor for benchmarks, wrong for a migration.
      if (installer_ == paging::InstallerKind::kZero) {
        return Error(
            "installer 'zero' installs zero pages without asking the source (a benchmark floor) "
            "and cannot receive a migration of {} memory — use {} (the default for {})",
            BackingName(backing), paging::InstallerName(paging::BestInstaller(backing)),
            BackingName(backing));
      }
      RETURN_IF_ERROR(
          paging::CheckInstaller(installer_, backing)
              .WithContext(fmt::format("post-copy destination, block '{}'", block->name())));
    }
    return Status::Ok();
  }

 private:
  GuestMemory& memory_;
  VmControl& vm_;  // owned by precopy_
  const PostcopyVmOptions options_;
  const std::unique_ptr<DestinationVm> precopy_;
  paging::InstallerKind installer_;
  uint64_t original_granule_ = 0;
  Status prepared_;  // the hole installer's memslot cut, continue's huge page allocation
  std::unique_ptr<paging::GuestPager> pager_;
};

}  // namespace

std::unique_ptr<PostcopyDestinationVm> MakeMemoryPostcopyDestination(GuestMemory& memory,
                                                                     std::unique_ptr<VmControl> vm,
                                                                     PostcopyVmOptions options) {
  return std::make_unique<MemoryPostcopyDestination>(memory, std::move(vm), std::move(options));
}

}  // namespace faultline::migration
