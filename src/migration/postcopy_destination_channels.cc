// The post-copy destination's receiving threads: each page channel in
// pre-copy (pages into place, the pass barrier, up to the switchover) and
// after it (pushed pages), and the priority channel's replies to page
// requests. The main channel and the switchover are in
// postcopy_destination.cc.
#include <cerrno>
#include <cstring>

#include "src/migration/network_page_source.h"
#include "src/migration/postcopy_attempt.h"
#include "src/migration/receiver_state.h"
#include "src/sys/sched.h"

namespace faultline::migration {

Status PostcopyDestination::ReceivePrecopyChannel(Attempt& a, size_t c) {
  Link& link = *a.session.pages[c];
  ChannelReceiver state(static_cast<uint16_t>(c));
  std::vector<MutableBuffer> dests;
  while (true) {
    Result<Message> m = link.reader().Read();
    if (!m && m.error().code() == EAGAIN) continue;
    if (!m) return m.error();
    if (const auto* s = std::get_if<migration::Switchover>(&*m)) {
      if (s->mode != SwitchoverMode::kPostcopy || s->final_pass != state.pass() ||
          (state.pass() > 0 && state.phase() != ChannelReceiver::Phase::kStreaming)) {
        return Error("Switchover on a page channel in pass {}: not at a pass boundary",
                     state.pass());
      }
      // Every page this channel wrote is in place (it ended the last pass);
      // the main thread drops the stale ones and starts the guest.
      a.Notify([&] { ++a.at_switchover; });
      if (!a.WaitFor([&] { return a.postcopy_go; })) return Status(ECANCELED, "abandoned");
      return Status::Ok();
    }
    RETURN_IF_ERROR(state.OnMessage(*m));
    if (const auto* pages = std::get_if<PagesHeader>(&*m)) {
      uint8_t* host = Target(pages->block);
      dests.clear();
      for (uint32_t p : pages->pages) {
        dests.push_back(MutableBuffer(host + uint64_t{p} * kWirePageSize, kWirePageSize));
        a.received[c][pages->block].Set(p);
      }
      RETURN_IF_ERROR(link.reader().ReceivePageData(dests));
    } else if (const auto* zeros = std::get_if<ZeroPages>(&*m)) {
      uint8_t* host = Target(zeros->block);
      // Zeros are written even in pass 0 into a VM's fresh memory: a page
      // marked present must be in place (mapped, or in the page cache for
      // the continue installer), not merely read as zero when untouched.
      for (const PageRun& run : zeros->runs) {
        a.received[c][zeros->block].SetRange(run.first, run.count);
        std::memset(host + uint64_t{run.first} * kWirePageSize, 0,
                    uint64_t{run.count} * kWirePageSize);
      }
    } else if (state.phase() == ChannelReceiver::Phase::kPassEnded) {
      // The pass barrier: no page of pass p + 1 before every page of pass p.
      const uint32_t pass = state.pass();
      const size_t n = a.session.pages.size();
      a.Notify([&] {
        if (a.pass_arrivals.size() <= pass) a.pass_arrivals.resize(pass + 1, 0);
        ++a.pass_arrivals[pass];
      });
      if (!a.WaitFor([&] { return a.pass_arrivals[pass] == n; })) {
        return Status(ECANCELED, "abandoned");
      }
      RETURN_IF_ERROR(state.BeginNextPass());
    }
  }
}

// Pre-copy pages of a block with an alias mapping (memfd, hugetlb,
// guest_memfd) are written through it: they land in the page cache without
// being mapped where the guest runs, so the continue installer maps the
// present ones in one UFFDIO_CONTINUE per run (no page is in the way), and
// a stale one needs no drop: it is not marked present, so it faults.
uint8_t* PostcopyDestination::Target(uint32_t block) const {
  RamBlock& b = *blocks_[block];
  return b.alias() != nullptr ? b.alias() : b.host();
}

Status PostcopyDestination::ReceivePushChannel(Attempt& a, size_t c) {
  Link& link = *a.session.pages[c];
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
      a.Notify([&] { ++a.push_ended; });
      return Status::Ok();
    } else if (const auto* e = std::get_if<ErrorMessage>(&*m)) {
      return PeerError(*e);
    } else {
      return Error("post-copy page channel: unexpected {}", MessageTypeName(TypeOf(*m)));
    }
  }
}

Status PostcopyDestination::ReceiveReplies(Attempt& a) {
  if (options_.realtime_priority != 0 && sys::SetRealtime(options_.realtime_priority).ok()) {
    std::lock_guard lock(mu_);
    stats_.realtime = true;
  }
  Link& link = *a.priority;
  while (true) {
    Result<Message> m = link.reader().Read();
    if (!m && m.error().code() == EAGAIN) continue;
    if (!m) return m.error();
    if (const auto* pages = std::get_if<PagesHeader>(&*m)) {
      RETURN_IF_ERROR(network_->ReceivePages(link, *pages, true));
    } else if (const auto* e = std::get_if<ErrorMessage>(&*m)) {
      return PeerError(*e);
    } else {
      return Error("priority channel: unexpected {}", MessageTypeName(TypeOf(*m)));
    }
  }
  (void)a;
}

}  // namespace faultline::migration
