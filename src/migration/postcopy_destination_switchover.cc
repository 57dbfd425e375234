// The post-copy destination's switchover, inside the source's pause: the
// dirty set and the vCPU and device state from the main channel, the stale
// pre-copy pages dropped, and the present set the guest starts with.
// StartGuest, which runs these and then the guest, is in
// postcopy_destination.cc.
#include <vector>

#include "src/migration/postcopy_destination.h"

namespace faultline::migration {

// DirtyPages*, then VcpuState for each vCPU in order, then DeviceState*;
// the counts were announced in the Switchover.
Result<PostcopyDestination::SwitchoverState> PostcopyDestination::ReceiveSwitchoverState(
    Attempt& a) {
  MessageReader& reader = a.main().reader();
  uint64_t dirty_count;
  {
    sys::MutexLock lock(mu_);
    dirty_count = stats_.dirty_at_switchover;
  }
  SwitchoverState state;
  for (const auto& b : blocks_) state.dirty.emplace_back(b->size() / kWirePageSize);
  state.vcpus.resize(switchover_vcpus_);
  uint64_t dirty_seen = 0;
  uint32_t vcpus_seen = 0;
  while (dirty_seen < dirty_count || vcpus_seen < state.vcpus.size() ||
         state.devices.size() < switchover_devices_) {
    Result<Message> m = reader.Read();
    if (!m && m.error().code() == EAGAIN) continue;
    if (!m) return m.error();
    if (const auto* d = std::get_if<DirtyPages>(&*m)) {
      if (vcpus_seen > 0) return Error("DirtyPages after VcpuState");
      DirtyBitmap& bits = state.dirty[d->block];
      const uint64_t before = bits.CountRange(d->first_page, d->page_count);
      bits.MergeRaw(d->words, d->page_count, d->first_page);
      dirty_seen += bits.CountRange(d->first_page, d->page_count) - before;
      if (dirty_seen > dirty_count) {
        return Error("DirtyPages: more than the {} dirty pages announced", dirty_count);
      }
    } else if (auto* v = std::get_if<VcpuStateMessage>(&*m)) {
      if (dirty_seen != dirty_count) {
        return Error("{} dirty pages announced, {} received", dirty_count, dirty_seen);
      }
      if (vcpus_seen == state.vcpus.size()) {
        return Error("VcpuState for more than {} vCPUs", vcpus_seen);
      }
      if (v->index != vcpus_seen) return Error("VcpuState {}, expected {}", v->index, vcpus_seen);
      state.vcpus[vcpus_seen++] = std::move(v->state);
    } else if (auto* d = std::get_if<DeviceState>(&*m)) {
      if (vcpus_seen != state.vcpus.size()) {
        return Error("DeviceState '{}' before the state of every vCPU", d->name);
      }
      state.devices.push_back(DeviceBlob{std::move(d->name), std::move(d->state)});
    } else if (const auto* e = std::get_if<ErrorMessage>(&*m)) {
      return a.FailByPeer(*e);
    } else {
      return Error("switchover: unexpected {}", MessageTypeName(TypeOf(*m)));
    }
  }
  return state;
}

Status PostcopyDestination::DropStale(const std::vector<DirtyBitmap>& dirty) {
  for (uint32_t b = 0; b < blocks_.size(); ++b) {
    if (blocks_[b]->page_size() != kWirePageSize) continue;  // StartPostcopy's
    const DirtyBitmap* early = early_.empty() ? nullptr : &early_[b];
    // Written in pre-copy, dirty since, and not dropped with the early set.
    auto stale = [&](uint64_t page) {
      if (early != nullptr && early->Test(page)) return false;
      for (const auto& r : receivers_) {
        if (r->received()[b].Test(page)) return true;
      }
      return false;
    };
    uint64_t run = 0, count = 0;
    Status status;
    dirty[b].ForEachSet([&](uint64_t page) {
      if (!status.ok() || !stale(page)) return;
      if (count > 0 && run + count == page) {
        ++count;
        return;
      }
      if (count > 0) status = vm_.DropPages(b, run, count);
      run = page;
      count = 1;
    });
    if (status.ok() && count > 0) status = vm_.DropPages(b, run, count);
    RETURN_IF_ERROR(status);
  }
  return Status::Ok();
}

std::vector<DirtyBitmap> PostcopyDestination::PresentPages(const std::vector<DirtyBitmap>& dirty,
                                                           uint64_t& precopy_pages) const {
  std::vector<DirtyBitmap> present;
  for (size_t b = 0; b < blocks_.size(); ++b) {
    DirtyBitmap p(blocks_[b]->size() / kWirePageSize);
    for (const auto& r : receivers_) p.Merge(r->received()[b]);
    precopy_pages += p.Count();
    dirty[b].ForEachSet([&](uint64_t page) { p.Clear(page); });
    // A huge page is installed whole: present only if all of it is; the
    // source pushes every page of a huge page with a dirty one.
    const uint64_t unit = blocks_[b]->page_size() / kWirePageSize;
    if (unit > 1) {
      for (uint64_t u = 0; u < p.pages(); u += unit) {
        if (p.CountRange(u, unit) != unit) p.ClearRange(u, unit);
      }
    }
    present.push_back(std::move(p));
  }
  return present;
}

}  // namespace faultline::migration
