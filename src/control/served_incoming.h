// ServedIncomingVm: the destination of an incoming migration that has
// memory and no vCPUs, for `faultline serve-pages --from tcp:`: the
// guest's RAM arrives here (pre-copy passes, then post-copy with demand
// fetch and background push) and is served to VMMs that hand over their
// userfaultfd (migration::PageServer), which run the guest instead.
//
//   auto vm = ServedIncomingVm::Create({{.name = "ram0", .size = 1 << 30,
//                                        .backing = Backing::kMemfd}},
//                                      [&] { /* start the page server */ });
//   IncomingControl incoming(listener, options);
//   incoming.Prepare(**vm);
//   incoming.Run();  // on_servable is called at the switchover
//
// The memory may be served from on_servable on: at the switchover in
// post-copy (a page not here yet is fetched from the source when a client
// faults on it, through the post-copy pager's EnsurePresent), when the
// migration completes in pre-copy. The migration's vCPU and device state
// are dropped: the VMMs served bring their own (a snapshot's).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "faultline/ram_block.h"
#include "faultline/status.h"
#include "src/control/incoming.h"
#include "src/memory/guest_memory.h"
#include "src/memory/memslot_backend.h"
#include "src/migration/served_memory.h"
#include "src/paging/guest_pager.h"
#include "src/sys/mutex.h"

namespace faultline::control {

class ServedIncomingVm final : public IncomingVm {
 public:
  // Creates the blocks (in order, each placed after the last) with their
  // memory zero. `on_servable` is called once, on the migration's thread.
  static Result<std::unique_ptr<ServedIncomingVm>> Create(std::vector<RamBlockOptions> blocks,
                                                          std::function<void()> on_servable);
  ~ServedIncomingVm() override;

  // IncomingVm. The post-copy destination made here calls back into this
  // object, which must outlive it.
  Backing backing() const override { return blocks_.front()->backing(); }
  std::unique_ptr<migration::DestinationVm> MakeDestination() override;
  std::unique_ptr<migration::PostcopyDestinationVm> MakePostcopyDestination(
      migration::PostcopyVmOptions options) override;
  Status PrepareVcpus() override { return Status::Ok(); }
  Status Start() override;  // pre-copy: the memory is all here

  // The memory as the page server serves it: the blocks end to end, each
  // fetch made present first. It must not outlive this object.
  Result<std::shared_ptr<const migration::ServedMemory>> Served();
  const std::vector<std::shared_ptr<RamBlock>>& blocks() const { return blocks_; }

 private:
  class Control;  // migration::VmControl over this object

  explicit ServedIncomingVm(std::function<void()> on_servable)
      : on_servable_(std::move(on_servable)) {}
  Status EnsurePresent(uint32_t block, uint64_t offset, uint64_t length);
  void AttachPager(paging::GuestPager* pager);
  void Servable();

  VmmOwnedMemslots backend_;
  std::unique_ptr<GuestMemory> memory_;
  std::vector<std::shared_ptr<RamBlock>> blocks_;
  std::vector<Gpa> bases_;  // where block i is placed
  const std::function<void()> on_servable_;
  // A page server's fetches hold it shared while they use the pager; the
  // destination attaching or detaching it holds it exclusively.
  mutable sys::SharedMutex pager_mu_;
  paging::GuestPager* pager_ GUARDED_BY(pager_mu_) = nullptr;
  bool served_ GUARDED_BY(pager_mu_) = false;  // on_servable_ called
};

}  // namespace faultline::control
