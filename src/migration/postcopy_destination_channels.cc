// The post-copy destination's receiving threads: each page channel in
// pre-copy (precopy_receiver.h: pages into place, the pass barrier, up to
// the switchover) and after it (pushed pages), and the priority channel's
// replies to page requests. The main channel is in postcopy_destination.cc,
// the switchover in postcopy_destination_switchover.cc.
#include <cerrno>

#include "src/migration/network_page_source.h"
#include "src/migration/postcopy_destination.h"
#include "src/sys/sched.h"

namespace faultline::migration {

// Pre-copy pages of a block with an alias mapping (memfd, hugetlb,
// guest_memfd) are written through it: they land in the page cache without
// being mapped where the guest runs, so the continue installer maps the
// present ones in one UFFDIO_CONTINUE per run (no page is in the way), and
// a stale one needs no drop: it is not marked present, so it faults.
uint8_t* PostcopyDestination::Target(uint32_t block) const {
  RamBlock& b = *blocks_[block];
  return b.alias() != nullptr ? b.alias() : b.host();
}

void PostcopyDestination::StartPageChannels(Attempt& a) {
  target_ = PrecopyTarget{};
  for (uint32_t b = 0; b < blocks_.size(); ++b) target_.blocks.push_back(Target(b));
  target_.record = true;    // present at the switchover unless dirty
  target_.postcopy = true;  // see PrecopyTarget for why zeros are written
  receivers_.clear();
  for (size_t c = 0; c < a.page_channels(); ++c) {
    receivers_.push_back(std::make_unique<PrecopyReceiver>(a, c, target_));
  }
  a.StartChannels([this, &a](size_t c) -> Status {
    ASSIGN_OR_RETURN(const PrecopyReceiver::End end, receivers_[c]->Run());
    if (end != PrecopyReceiver::End::kSwitchover) {
      return Error("ChannelEnd: stop-and-copy on a post-copy page channel");
    }
    // Every page this channel wrote is in place (it ended the last pass);
    // the main thread drops the stale ones and starts the guest. The push
    // goes into the network page source, which exists from then on.
    if (!a.Await(Milestone::kGuestRuns, 1)) return a.failure();
    return ReceivePushChannel(a, c);
  });
}

Status PostcopyDestination::ReceivePushChannel(Attempt& a, size_t c) {
  Link& link = a.page(c);
  uint64_t data = 0, zero = 0;
  while (true) {
    Result<Message> m = link.reader().Read();
    if (!m && m.error().code() == EAGAIN) continue;
    if (!m) return m.error();
    if (const auto* pages = std::get_if<PagesHeader>(&*m)) {
      if (pages->pass != final_pass_) return Error("pushed Pages of pass {}", pages->pass);
      RETURN_IF_ERROR(network_->ReceivePages(link, *pages, false));
      data += pages->pages.size();
    } else if (const auto* zeros = std::get_if<ZeroPages>(&*m)) {
      if (zeros->pass != final_pass_) return Error("pushed ZeroPages of pass {}", zeros->pass);
      network_->ApplyZeroPages(*zeros);
      zero += zeros->page_count();
    } else if (const auto* end = std::get_if<PassEnd>(&*m)) {
      if (end->pass != final_pass_ || end->data_pages != data || end->zero_pages != zero) {
        return Error("push end: pass {} with {} + {} pages, received {} + {} in pass {}", end->pass,
                     end->data_pages, end->zero_pages, data, zero, final_pass_);
      }
      return Status::Ok();  // the channel's thread ends: Milestone::kChannelEnded
    } else if (const auto* e = std::get_if<ErrorMessage>(&*m)) {
      return a.FailByPeer(*e, fmt::format("page channel {}", c));
    } else {
      return Error("post-copy page channel: unexpected {}", MessageTypeName(TypeOf(*m)));
    }
  }
}

Status PostcopyDestination::ReceiveReplies(Attempt& a) {
  if (options_.realtime_priority != 0 && sys::SetRealtime(options_.realtime_priority).ok()) {
    sys::MutexLock lock(mu_);
    stats_.realtime = true;
  }
  Link& link = a.priority();
  while (true) {
    Result<Message> m = link.reader().Read();
    if (!m && m.error().code() == EAGAIN) continue;
    if (!m) return m.error();
    if (const auto* pages = std::get_if<PagesHeader>(&*m)) {
      RETURN_IF_ERROR(network_->ReceivePages(link, *pages, true));
    } else if (const auto* e = std::get_if<ErrorMessage>(&*m)) {
      return a.FailByPeer(*e, "priority channel");
    } else {
      return Error("priority channel: unexpected {}", MessageTypeName(TypeOf(*m)));
    }
  }
}

}  // namespace faultline::migration
