// NetworkPageSource: the post-copy destination's PageSource. Pages the
// pager fetches come from the migration source over the network:
//
//  - a fetch for a vCPU fault (or the VMM's own access) becomes a PageRequest
//    on the priority channel, which carries nothing but requests and their
//    replies, so a request never waits behind bulk data;
//  - the reply (a Pages message on the priority channel) and the source's
//    background push (Pages on the page channels) are received straight into
//    the destination the installer chose for the fetch: the final page
//    through the alias (continue), a staging page (move, copy) or the
//    block's memory (hole). There is no buffer of this class's own;
//  - for pushed pages nobody asked for yet, the pager hands out a place
//    (paging::PushTarget::Claim: a destination per install unit, which the
//    data is received into and then completed, like a fetch) or, for blocks
//    paged through memslot holes, they are written straight into the
//    block's memory (a missing chunk has no memslot, so the guest cannot
//    see it) and handed over when the pager fetches that chunk, without a
//    copy. The pager never re-enters the source from a claim;
//  - a page that arrives twice (a push and a reply crossing) lands in a
//    scratch page the second time.
//
// Recovery: when the link breaks, outstanding fetches stay outstanding (the
// vCPUs that wait for them keep waiting; nothing is lost or poisoned) and
// new ones queue; Connect() with the new session's priority channel sends
// every outstanding request again. have() says which pages arrived, for the
// destination's PresentBitmap.
//
// Threads: Fetch from the pager's threads; ReceivePages/ApplyZeroPages from
// the destination's channel threads; Connect/Disconnect from its main
// thread. mu_ guards the pending fetches and the page bitmaps; send_mu_
// the priority channel's writer. Callbacks run without either lock.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "src/memory/dirty_bitmap.h"
#include "src/migration/message_io.h"
#include "src/migration/wire.h"
#include "src/paging/fault_metrics.h"
#include "src/paging/page_source.h"
#include "src/sys/mutex.h"

namespace faultline::migration {

struct NetworkBlock {
  uint64_t size = 0;  // bytes; a multiple of kWirePageSize
  // Non-null: pushed pages of this block nobody waits for are written here
  // (the block's memory, paged through memslot holes).
  uint8_t* direct = nullptr;
};

// Every page that arrives (into place, the first time) counts once, as
// demanded or pushed, whichever channel brought it; with the pages held at
// the start they add up to every page of the guest.
struct NetworkSourceStats {
  uint64_t requests_sent = 0;    // PageRequest messages, resends included
  uint64_t pages_requested = 0;  // pages asked for by fetches (first request)
  // Pages that arrived for a fetch that had asked for them (by reply, or by
  // a push that crossed the request).
  uint64_t pages_demanded = 0;
  // Pages that arrived unasked for: pushed into a fetch the push itself
  // claimed from the pager (PushTarget), or straight into a hole block's
  // memory.
  uint64_t pages_pushed = 0;
  uint64_t pages_replied = 0;  // of those, pages that came on the priority channel
  uint64_t pages_duplicate = 0;
  uint64_t fetches_inline = 0;           // completed from pages already written (hole)
  paging::LatencySummary fault_latency;  // kFault fetches: request to data in place
  double blocked_seconds = 0;            // summed over every kFault fetch
};

class NetworkPageSource final : public paging::PageSource {
 public:
  explicit NetworkPageSource(std::vector<NetworkBlock> blocks);
  ~NetworkPageSource() override;

  // Where pushed pages of blocks without `direct` go (the pager, once it
  // runs); without one they are dropped and come again when a fetch asks.
  // `target` must stay valid until replaced or the source is destroyed.
  void SetPushTarget(paging::PushTarget* target);
  // Pages the destination holds already (4 KiB pages of block `block`).
  void MarkHave(uint32_t block, const DirtyBitmap& pages);

  void Fetch(const paging::FetchRequest& request, paging::FetchCallback done) override;
  void CancelAll() override;

  // The priority link of a (new) session: every outstanding request is sent
  // on it again. `link` must stay valid until Disconnect().
  Status Connect(Link* link);
  // The link broke: requests wait for the next Connect().
  void Disconnect();

  // The data of a Pages message whose header `header` was just read from
  // `link`, into the places waiting for it.
  Status ReceivePages(Link& link, const PagesHeader& header, bool reply);
  void ApplyZeroPages(const ZeroPages& zeros);

  // The pages that arrived (or were held at the start), per block.
  std::vector<DirtyBitmap> have() const;
  uint64_t outstanding_fetches() const;
  NetworkSourceStats stats() const;

 private:
  using Clock = std::chrono::steady_clock;
  struct Pending {
    uint32_t block = 0;
    uint64_t first = 0;  // wire page
    uint32_t count = 0;
    std::span<uint8_t> dest;
    paging::FetchCallback done;
    paging::FetchPriority priority{};
    Clock::time_point start;
    std::vector<uint8_t> claimed;  // per page: kWanted, kArriving, kFilled
    uint32_t filled = 0;           // pages kFilled
    bool requested = false;        // PageRequests went out for it
  };
  enum class Target : uint8_t { kScratch, kPending, kDirect };
  static constexpr uint8_t kWanted = 0, kArriving = 1, kFilled = 2;

  Pending* FindLocked(uint32_t block, uint64_t page) REQUIRES(mu_);
  // Requests for the pages of `p` not claimed yet, in runs of at most
  // kMaxRequestPages.
  std::vector<PageRequest> RequestsFor(const Pending& p) REQUIRES(mu_);
  void SendRequests(std::vector<PageRequest> requests);
  // Page `page` of `block` is in place (`reply`: it came on the priority
  // channel); returns the fetch it completed, if any (to be called back
  // without the lock).
  std::unique_ptr<Pending> SettleLocked(uint32_t block, uint64_t page, bool reply) REQUIRES(mu_);
  void Complete(std::unique_ptr<Pending> p);
  // Claims places from the pager for the runs of `pages` nobody waits for
  // yet, as fetches that send no request.
  void ClaimPushed(uint32_t block, std::span<const uint32_t> pages);
  // Why `request` cannot be served (outside the migrated memory), or OK.
  Status Check(const paging::FetchRequest& request) const;
  static std::unique_ptr<Pending> NewPending(const paging::FetchRequest& request,
                                             paging::FetchCallback done);

  const std::vector<NetworkBlock> blocks_;

  mutable sys::Mutex mu_ ACQUIRED_AFTER(send_mu_);
  // By (block, first).
  std::map<std::pair<uint32_t, uint64_t>, std::unique_ptr<Pending>> pending_ GUARDED_BY(mu_);
  std::vector<DirtyBitmap> have_ GUARDED_BY(mu_);
  std::vector<DirtyBitmap> arriving_ GUARDED_BY(mu_);  // direct writes under way
  bool cancelled_ GUARDED_BY(mu_) = false;
  paging::PushTarget* push_target_ GUARDED_BY(mu_) = nullptr;
  uint64_t next_request_id_ GUARDED_BY(mu_) = 1;
  NetworkSourceStats stats_ GUARDED_BY(mu_);  // but the latency
  paging::LatencyHistogram latency_;

  sys::Mutex send_mu_;
  // Its writer is used only under send_mu_ (its reader by a channel thread).
  Link* link_ GUARDED_BY(send_mu_) = nullptr;
};

}  // namespace faultline::migration
