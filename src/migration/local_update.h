// Local update: the guest moves to a new VMM process on the same host over
// a Unix socket (a unix: address), and its memory does not move at all. The
// source passes each RAM block's file descriptor (memfd, hugetlbfs memfd)
// with the LocalOffer; the destination maps the same pages and gets only
// the vCPU and device state. docs/protocol.md section 11 has the sequence.
//
//   S: LocalOffer{fds} + SCM_RIGHTS     D: checks layout and fds, maps them
//   D: LocalReady                       (the guest still runs at S)
//   S: pause; VcpuState..., DeviceState..., Complete
//   D: loads the state; CompleteAck; only then starts the vCPUs
//
// Who runs the guest (the same rule as pre-copy's, docs/protocol.md §6):
// before the source has read CompleteAck the destination has not run a
// guest instruction (it starts only once its CompleteAck was queued on the
// socket, and a Unix socket delivers what was queued even if its sender
// dies), so any failure before it - the destination refuses, dies or
// closes - resumes the guest at the source. After it the source never
// touches the memory again. A destination that stays silent after Complete
// for the whole I/O timeout leaves the outcome unknown: the guest stays
// paused at the source (SourceOutcome::kUnknownPaused).
//
// Memory without a descriptor (anonymous) cannot be passed: LocalOffer{copy}
// says that an ordinary pre-copy or post-copy migration follows on new
// connections to the same socket. guest_memfd cannot be passed either (KVM
// binds it to the VM that created it) and is refused before anything is
// sent.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "faultline/status.h"
#include "src/migration/message_io.h"
#include "src/migration/migratable.h"
#include "src/migration/source.h"
#include "src/migration/transport.h"
#include "src/migration/wire.h"
#include "src/sys/mutex.h"

namespace faultline::migration {

// How `vm`'s memory can move to another process on this host: kFds when
// every block has a descriptor to pass (memfd, hugetlb), kCopy when one is
// anonymous; an error that says why for guest_memfd.
Result<LocalMemory> LocalMemoryFor(SourceVm& vm);

// Waits for the destination's answers use the transport's I/O timeout.
struct LocalUpdateOptions {
  // Test hook: the offer goes without its descriptors (a destination must
  // refuse it).
  bool withhold_fds = false;
};

struct LocalUpdateStats {
  uint32_t fds_passed = 0;
  uint64_t bytes_sent = 0;             // on the socket: the offer and the state
  uint64_t pages_copied = 0;           // guest pages copied: none, they were passed
  std::chrono::microseconds pause{0};  // the guest stopped: pause to CompleteAck
  // The pause in parts: until every vCPU was out, until the state was
  // saved and sent, and until the destination had loaded it and confirmed.
  std::chrono::microseconds pause_stop{0};
  std::chrono::microseconds pause_state{0};
  std::chrono::microseconds pause_confirm{0};
  std::chrono::microseconds total{0};
};

// The source side. One Run (or OfferCopy) per object.
class LocalUpdateSource {
 public:
  enum class Phase { kNotStarted, kSetup, kPaused, kCompleted, kFailed };

  LocalUpdateSource(SourceVm& vm, LocalUpdateOptions options = {});

  // The update with descriptors (LocalMemoryFor(vm) must be kFds). On
  // error, outcome() says who runs the guest.
  Result<LocalUpdateStats> Run(Connector& connector);
  // Memory that must be copied: offers kCopy with `mode` and returns once
  // the destination is ready for the migration that the caller then runs
  // on `connector`. The guest is not paused.
  Status OfferCopy(Connector& connector, SwitchoverMode mode);

  // Ends a Run or OfferCopy before the pause (the guest keeps running);
  // after it, the exchange is too short to need one.
  void Cancel();

  Phase phase() const { return phase_.load(std::memory_order_acquire); }
  SourceOutcome outcome() const { return outcome_.load(std::memory_order_acquire); }

 private:
  Result<std::unique_ptr<Link>> Offer(Connector& connector, LocalMemory memory, SwitchoverMode mode,
                                      uint32_t& fds_passed);
  // The offer and the destination's answer, on `link`.
  Status SendOffer(Link& link, LocalMemory memory, SwitchoverMode mode, uint32_t& fds_passed);
  Result<LocalUpdateStats> Handover(Link& link);

  SourceVm& vm_;
  const LocalUpdateOptions options_;
  std::atomic<Phase> phase_{Phase::kNotStarted};
  std::atomic<SourceOutcome> outcome_{SourceOutcome::kNotStarted};
  std::atomic<bool> cancelled_{false};
  sys::Mutex mu_;
  Channel* channel_ GUARDED_BY(mu_) = nullptr;  // what Cancel shuts down
};

// The destination side: the first connection on a unix: socket, whose
// offer says how the guest arrives. The caller checks the offer against
// the VM it will create (CheckLocalOffer), creates it (with the passed
// descriptors, or its own memory for kCopy), then answers Ready or Refuse.
class LocalUpdateDestination {
 public:
  // Accepts one connection and reads its LocalOffer with its descriptors.
  static Result<std::unique_ptr<LocalUpdateDestination>> Accept(Acceptor& acceptor,
                                                                std::chrono::milliseconds timeout);

  const LocalOffer& offer() const { return offer_; }
  // The descriptors that came with the offer, in block order.
  std::vector<sys::UniqueFd>& fds() { return fds_; }
  std::string peer() const { return link_->channel().name(); }

  // Tells the source why not (an Error message) and closes the connection;
  // returns `why` for the caller to report.
  Status Refuse(const Status& why, ErrorCode code);
  Status Ready();
  // kFds, after Ready: receives the vCPU and device state, loads it into
  // `vm` and confirms with CompleteAck. When this returns OK the source has
  // let go of the guest: the caller must start it now. On error the source
  // resumes the guest (and the caller must not start it).
  Status ReceiveState(DestinationVm& vm);

  uint64_t bytes_received() const { return link_->channel().stats().bytes_received; }

 private:
  explicit LocalUpdateDestination(std::unique_ptr<Channel> channel)
      : link_(std::make_unique<Link>(std::move(channel))) {}

  std::unique_ptr<Link> link_;
  LocalOffer offer_;
  std::vector<sys::UniqueFd> fds_;
};

// The destination's checks of an offer against what it will run: the same
// blocks (names, sizes, page sizes; for kFds also the backing) in the same
// order, the same vCPU count and accelerator, and for kFds exactly one
// descriptor per block. The error says what differs and how to start the
// destination instead.
Status CheckLocalOffer(const LocalOffer& offer, size_t fds, std::span<const BlockInfo> local,
                       uint32_t vcpus, HelloAccel accel);
// The accelerator part of it alone, for a destination that knows its
// accelerator only once its VM exists.
Status CheckLocalAccel(const LocalOffer& offer, HelloAccel accel);

}  // namespace faultline::migration
