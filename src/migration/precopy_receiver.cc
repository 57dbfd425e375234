#include "src/migration/precopy_receiver.h"

#include <cerrno>
#include <cstring>

namespace faultline::migration {

PrecopyReceiver::PrecopyReceiver(Attempt& attempt, size_t channel, const PrecopyTarget& target)
    : attempt_(attempt),
      channel_(channel),
      target_(target),
      state_(static_cast<uint16_t>(channel)) {
  if (target_.record) {
    for (const BlockInfo& b : *attempt_.session().blocks) {
      received_.emplace_back(b.size / kWirePageSize);
    }
  }
}

Result<PrecopyReceiver::End> PrecopyReceiver::Run() {
  Link& link = attempt_.page(channel_);
  while (state_.phase() != ChannelReceiver::Phase::kEnded) {
    Result<Message> m = link.reader().Read();
    if (!m && m.error().code() == EAGAIN) continue;  // quiet, not cut: a cut ends in an error
    if (!m) return m.error();
    if (const auto* e = std::get_if<ErrorMessage>(&*m)) {
      return attempt_.FailByPeer(*e, fmt::format("page channel {}", channel_));
    }
    if (const auto* s = std::get_if<Switchover>(&*m); s != nullptr && target_.postcopy) {
      RETURN_IF_ERROR(CheckSwitchover(*s));
      return End::kSwitchover;
    }
    RETURN_IF_ERROR(state_.OnMessage(*m));
    if (const auto* pages = std::get_if<PagesHeader>(&*m)) {
      RETURN_IF_ERROR(ReceivePages(link, *pages));
    } else if (const auto* zeros = std::get_if<ZeroPages>(&*m)) {
      WriteZeros(*zeros);
    } else if (state_.phase() == ChannelReceiver::Phase::kPassEnded) {
      // Every page of this pass is in place (and recorded): wait for the
      // other channels before writing anything of the next one.
      if (!attempt_.barrier().Arrive(state_.pass())) {
        return Status(ECANCELED, "migration abandoned");
      }
      RETURN_IF_ERROR(state_.BeginNextPass());
    }
  }
  return End::kChannelEnd;
}

Status PrecopyReceiver::ReceivePages(Link& link, const PagesHeader& pages) {
  // The decoder checked block and indices against the block list: every
  // destination lies inside the block's target mapping.
  uint8_t* host = target_.blocks[pages.block];
  DirtyBitmap* received = target_.record ? &received_[pages.block] : nullptr;
  destinations_.clear();
  for (uint32_t p : pages.pages) {
    destinations_.push_back(MutableBuffer(host + uint64_t{p} * kWirePageSize, kWirePageSize));
    if (received != nullptr) received->Set(p);
  }
  return link.reader().ReceivePageData(destinations_);
}

void PrecopyReceiver::WriteZeros(const ZeroPages& zeros) {
  if (target_.record) {
    for (const PageRun& run : zeros.runs) received_[zeros.block].SetRange(run.first, run.count);
  }
  if (zeros.pass == 0 && target_.skip_first_zeros) return;  // zero already; written at most once
  uint8_t* host = target_.blocks[zeros.block];
  for (const PageRun& run : zeros.runs) {
    std::memset(host + uint64_t{run.first} * kWirePageSize, 0, uint64_t{run.count} * kWirePageSize);
  }
}

// The source sends its Switchover on each page channel right after the last
// pre-copy pass ended there: nothing of the next pass may have arrived.
Status PrecopyReceiver::CheckSwitchover(const Switchover& s) const {
  if (s.mode != SwitchoverMode::kPostcopy || s.final_pass != state_.pass() ||
      !state_.at_pass_start()) {
    return Error("Switchover on a page channel in pass {}: not at a pass boundary", state_.pass());
  }
  return Status::Ok();
}

}  // namespace faultline::migration
