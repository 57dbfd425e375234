// PageSource: where demand paging gets the pages it does not have yet.
//
// A fetch is asynchronous and writes straight into a destination the
// installer chose: the final page itself (through the RAM block's alias
// mapping, for the continue installer) or a staging page that the installer
// then moves or copies into place. A source therefore never owns a bounce
// buffer of its own; a network source receives into `dest`.
//
// Pages can also arrive that nobody fetched (post-copy's background push).
// For those the source asks the pager for a place (PushTarget::Claim): the
// pager hands it a destination per install unit, the source fills it and
// completes it, exactly as it completes a fetch. The pager never calls the
// source from inside a claim, and the source never calls Fetch for a push:
// each direction is one call, pager -> source (Fetch) or source -> pager
// (Claim), with a completion back.
//
// Contract, which every implementation keeps and the pager relies on:
//  - `done` is called exactly once per Fetch, on any thread, possibly before
//    Fetch returns (a source that has the bytes at hand completes inline);
//  - `dest` is written only before `done` is called, never after;
//  - after CancelAll() returns, every fetch started before it has completed
//    (with kFailed if it had not finished) and later fetches fail at once.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <utility>
#include <vector>

#include "faultline/status.h"

namespace faultline::paging {

enum class FetchPriority : uint8_t {
  kFault,  // a vCPU (or the VMM) is waiting for this page
  kPush,   // background transfer of a page nobody has asked for yet
};

struct FetchRequest {
  uint32_t block_id = 0;    // the source's name for the RAM block
  uint64_t offset = 0;      // bytes into the block; a multiple of dest.size()
  std::span<uint8_t> dest;  // where the block's bytes [offset, offset + size) go
  FetchPriority priority = FetchPriority::kFault;
};

struct FetchResult {
  enum class Kind : uint8_t {
    kFilled,       // dest holds the page(s)
    kUnavailable,  // the source has no good copy of them (a memory error at
                   // the source, a lost page): the pager installs poison
    kFailed,       // the fetch did not work (transport, cancellation); the
                   // pager may retry
  };
  Kind kind = Kind::kFilled;
  Status error;  // why, for kUnavailable and kFailed

  static FetchResult Filled() { return {}; }
  static FetchResult Unavailable(Status why) { return {Kind::kUnavailable, std::move(why)}; }
  static FetchResult Failed(Status why) { return {Kind::kFailed, std::move(why)}; }
};

using FetchCallback = std::function<void(FetchResult)>;

// A unit the pager handed out for pushed data: `dest` holds the block's
// bytes [offset, offset + dest.size()) once filled, and `done` is called
// exactly once, like a fetch's: kFilled when dest holds them, kFailed
// (cancellation) or kUnavailable otherwise. Until then the unit counts as
// being fetched: faults on it wait, and nobody else fetches it.
struct PushSlot {
  uint32_t block_id = 0;  // the source's name for the RAM block
  uint64_t offset = 0;
  std::span<uint8_t> dest;
  FetchCallback done;
};

// The pager's side of pushed data (DemandPager implements it).
class PushTarget {
 public:
  virtual ~PushTarget() = default;
  // Claims the install units overlapping block `block_id`'s bytes
  // [offset, offset + length) that are neither present nor being fetched,
  // and returns a slot for each, in offset order (none for a block it does
  // not page, or once paging stopped). A unit may be larger than the range
  // (a huge page): its slot covers all of it. May wait for a staging page.
  virtual std::vector<PushSlot> Claim(uint32_t block_id, uint64_t offset, uint64_t length) = 0;
};

class PageSource {
 public:
  virtual ~PageSource() = default;

  // Starts filling request.dest; see the contract at the top of this file.
  // Must not block for long: a source with latency queues the request.
  virtual void Fetch(const FetchRequest& request, FetchCallback done) = 0;

  // Completes every outstanding fetch (kFailed) and fails later ones.
  virtual void CancelAll() = 0;
};

}  // namespace faultline::paging
