// PostcopyDestination: the receiving side of a post-copy live migration
// (docs/protocol.md §7).
//
//   - pre-copy passes are received by the same PrecopyReceiver as
//     MigrationDestination's (straight into guest memory, the pass barrier),
//     remembering which pages arrived;
//   - at Switchover{kPostcopy}: once each page channel has reached the
//     switchover (every pre-copy page is in place) and the dirty set, vCPU
//     and device state have arrived, the pages that arrived and are clean
//     are marked present in bulk, demand paging starts from a
//     NetworkPageSource and the vCPUs run at once;
//   - then faults become requests on the priority channel and pushed pages
//     are received into place (network_page_source.h); on Complete (every
//     page pushed) whatever is still missing is fetched, paging ends and
//     CompleteAck is sent.
//
// A broken link during post-copy pauses the migration: Run() (or Resume())
// returns an error and phase() is kPaused; the guest keeps running on the
// pages it has and its vCPUs wait for the others. Resume(acceptor) accepts
// the source's new session, says which pages are here (PresentBitmap),
// requests again what the vCPUs wait for, and finishes.
//
// Failures before the vCPUs run: the source is told (Error, attempt.h) and
// the VM must not be started. Once they may run, it is never told.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>

#include "faultline/status.h"
#include "src/migration/attempt.h"
#include "src/migration/destination.h"
#include "src/migration/network_page_source.h"
#include "src/migration/postcopy_source.h"
#include "src/migration/postcopy_vm.h"
#include "src/migration/precopy_receiver.h"
#include "src/migration/receiver_state.h"
#include "src/sys/mutex.h"

namespace faultline::migration {

struct PostcopyDestinationStats {
  uint32_t passes = 0;            // pre-copy passes received
  uint64_t precopy_pages = 0;     // data and zero pages received in them
  uint64_t present_at_start = 0;  // 4 KiB pages marked present at the switchover
  uint64_t dirty_at_switchover = 0;
  uint32_t sessions = 0;  // 1 + resumes
  bool realtime =
      false;  // the reply reader ran SCHED_FIFO (pager handlers: paging.realtime_threads)
  // Switchover message received -> vCPUs running (the destination's part of
  // the switchover pause), and the moment they ran (for the pause measured
  // from the source's stop, in one process).
  std::chrono::microseconds start_vm{0};
  std::chrono::steady_clock::time_point vm_started_at{};
  // Its parts: receiving the dirty set and vCPU state, waiting for the page
  // channels to end the last pre-copy pass and dropping the stale pages,
  // and StartPostcopy (marking present, loading state, starting the vCPUs).
  std::chrono::microseconds state_wait{0};
  std::chrono::microseconds channels_wait{0};
  std::chrono::microseconds start_paging{0};
  double mark_present_seconds = 0;
  NetworkSourceStats network;  // fault latency, blocked time, demanded vs pushed
  paging::PagingStats paging;
  uint64_t bytes_received = 0;
  std::chrono::microseconds postcopy{0};  // vCPUs running -> every page present
  std::chrono::microseconds total{0};
};

class PostcopyDestination {
 public:
  // `vm` must outlive this object.
  PostcopyDestination(PostcopyDestinationVm& vm, DestinationOptions options);
  ~PostcopyDestination();

  // Accepts one migration and runs it to the end (CompleteAck sent), or
  // fails. An error with phase() == kPaused: the guest runs and the link is
  // gone; call Resume(). Any other error: the VM was not started.
  Result<PostcopyDestinationStats> Run(Acceptor& acceptor);
  Result<PostcopyDestinationStats> Resume(Acceptor& acceptor);

  // Any thread: breaks the current session (pre-copy: the migration fails;
  // post-copy: it pauses).
  void Cancel();

  PostcopyPhase phase() const { return phase_.load(std::memory_order_acquire); }
  // A snapshot for status queries (any thread).
  PostcopyDestinationStats stats() const;

 private:
  // What the main channel carries in the pause, after the Switchover.
  struct SwitchoverState {
    std::vector<DirtyBitmap> dirty;  // by block: dirty since sent (stale here)
    std::vector<std::vector<uint8_t>> vcpus;
    std::vector<DeviceBlob> devices;
  };

  // What this destination accepts in a handshake (blocks_ set).
  ReceiverConfig MakeReceiverConfig() const;

  // The first session, with its priority channel, adopted by `a`.
  Status Accept(Attempt& a, Acceptor& acceptor);
  // Each page channel's thread: pre-copy, then (once the guest runs) the
  // push (postcopy_destination_channels.cc).
  void StartPageChannels(Attempt& a);
  Status ReceivePushChannel(Attempt& a, size_t c);
  Status ReceiveReplies(Attempt& a);
  // The network page source over the priority channel and its reply reader.
  void CreateNetworkSource(const std::vector<DirtyBitmap>& present);
  Status ConnectPriority(Attempt& a);

  Status FollowPrecopy(Attempt& a);
  Status CheckSwitchover(const migration::Switchover& s, uint32_t passes);
  // Drops the stale pages of one early DirtyPages message.
  Status DropEarly(Attempt& a, uint32_t passes, const DirtyPages& dirty);
  // The switchover (postcopy_destination_switchover.cc).
  Status StartGuest(Attempt& a);
  Result<SwitchoverState> ReceiveSwitchoverState(Attempt& a);
  // Drops the pages written in pre-copy and dirty at the switchover (but
  // those the early dirty set dropped already).
  Status DropStale(const std::vector<DirtyBitmap>& dirty);
  // Present at the switchover: arrived in pre-copy and clean.
  std::vector<DirtyBitmap> PresentPages(const std::vector<DirtyBitmap>& dirty,
                                        uint64_t& precopy_pages) const;
  Status RunGuest(Attempt& a, const std::vector<DirtyBitmap>& present, SwitchoverState& state);
  uint8_t* Target(uint32_t block) const;  // where pre-copy pages of `block` are written

  // Post-copy on `a`'s channels until Complete is handled (every page here).
  Status FollowPostcopy(Attempt& a);
  Result<PostcopyDestinationStats> FailBeforeGuest(Attempt& a, Status status);
  Result<PostcopyDestinationStats> Finish(Attempt& a, Status status);
  // Resume: the new session's handshake, then what is here (PresentBitmap).
  Status AcceptResume(Attempt& a, Acceptor& acceptor);
  Status SendPresent(Link& main);

  PostcopyDestinationVm& vm_;
  const DestinationOptions options_;
  std::atomic<PostcopyPhase> phase_{PostcopyPhase::kNotStarted};
  std::vector<std::shared_ptr<RamBlock>> blocks_;
  std::shared_ptr<NetworkPageSource> network_;
  uint64_t session_id_ = 0;  // the first session's
  uint32_t final_pass_ = 0;
  uint32_t switchover_vcpus_ = 0;    // VcpuState messages the Switchover announced
  uint32_t switchover_devices_ = 0;  // DeviceState messages the Switchover announced
  std::chrono::steady_clock::time_point start_;
  // The first session's pre-copy: where pages go, and each page channel's
  // receiver (its thread's until it reached the switchover; the pages it
  // received are read by the main thread once every channel ended a pass).
  PrecopyTarget target_;
  std::vector<std::unique_ptr<PrecopyReceiver>> receivers_;
  // The early dirty set (dropped before the pause); main thread, before
  // the Switchover, then only read.
  std::vector<DirtyBitmap> early_;

  // Taken before Attempt::mu_ (Cancel fails the active attempt under it).
  mutable sys::Mutex mu_;
  Attempt* active_ GUARDED_BY(mu_) = nullptr;
  bool cancelled_ GUARDED_BY(mu_) = false;
  PostcopyDestinationStats stats_ GUARDED_BY(mu_);
};

}  // namespace faultline::migration
