// PrecopyReceiver: one page channel's pre-copy on the destination, for both
// destinations (MigrationDestination to the end of the migration,
// PostcopyDestination up to the switchover). Its thread:
//
//   - checks each message against the channel's state (ChannelReceiver,
//     receiver_state.h);
//   - receives a Pages message's data straight into guest memory: once the
//     index list is validated, one scatter receive puts each page at its
//     place in the block's target mapping (no intermediate buffer);
//   - writes zero pages as zeros (see ZeroPolicy);
//   - at each PassEnd waits at the attempt's pass barrier;
//   - ends at ChannelEnd (stop-and-copy), or at a Switchover{post-copy} at a
//     pass boundary (a post-copy destination's channel then carries the
//     push);
//   - an Error from the source fails the attempt with the source's words
//     (not told back); any other failure is returned, and the thread that
//     runs the receiver fails the attempt with it (Attempt::StartChannels).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "faultline/status.h"
#include "src/memory/dirty_bitmap.h"
#include "src/migration/attempt.h"
#include "src/migration/receiver_state.h"

namespace faultline::migration {

struct PrecopyTarget {
  // By block: where page p of the block is written (targets[b] + p * 4 KiB),
  // valid for the block's size.
  std::vector<uint8_t*> blocks;
  // Zero pages of pass 0 are not written when the memory reads as zero
  // already and the guest will read it where it is written: a stop-and-copy
  // destination's fresh VM. Writing them would only allocate memory to hold
  // zeros. A post-copy destination writes them even into fresh memory,
  // because a page it marks present must be in place: in the page cache
  // for the continue installer, mapped for the others. Later passes always
  // write them (the page held other data before).
  bool skip_first_zeros = false;
  // Keep the set of pages received, by block (post-copy: they are present
  // at the switchover unless dirty since).
  bool record = false;
  // A Switchover{post-copy} at a pass boundary ends the channel's
  // pre-copy. Otherwise a Switchover is refused on a page channel.
  bool postcopy = false;
};

class PrecopyReceiver {
 public:
  enum class End { kChannelEnd, kSwitchover };

  // `target` and `attempt` must outlive the receiver; `attempt` has adopted
  // its session.
  PrecopyReceiver(Attempt& attempt, size_t channel, const PrecopyTarget& target);

  // Receives until the channel's pre-copy ends. Its thread only.
  Result<End> Run();

  // After Run returned, or (record) for the passes this channel's thread
  // ended at the barrier.
  ChannelTotals totals() const { return state_.totals(); }
  const std::vector<DirtyBitmap>& received() const { return received_; }

 private:
  Status ReceivePages(Link& link, const PagesHeader& pages);
  void WriteZeros(const ZeroPages& zeros);
  Status CheckSwitchover(const Switchover& switchover) const;

  Attempt& attempt_;
  const size_t channel_;
  const PrecopyTarget& target_;
  ChannelReceiver state_;
  std::vector<DirtyBitmap> received_;        // by block, when recording
  std::vector<MutableBuffer> destinations_;  // reused for each Pages message
};

}  // namespace faultline::migration
