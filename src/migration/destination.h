// MigrationDestination: the receiving side of a pre-copy live migration.
//
// Accepts one session (handshake.h), then runs one thread per page channel
// (precopy_receiver.h: pages straight into guest memory, the pass barrier,
// zero pages of the first pass skipped in the VM's fresh memory) and
// follows the main channel in the caller's thread. On Complete, every page
// channel must have ended, the page counts must match the source's, and the
// vCPU and device state must load; only then is CompleteAck sent and Run()
// returns success. The caller then starts the VM. On any failure the source
// is told with an Error message (attempt.h), and the VM must not be
// started.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

#include "faultline/status.h"
#include "src/migration/attempt.h"
#include "src/migration/auth.h"
#include "src/migration/handshake.h"
#include "src/migration/migratable.h"
#include "src/migration/transport.h"
#include "src/sys/mutex.h"
#include "src/sys/sched.h"

namespace faultline::migration {

struct DestinationOptions {
  AuthKey key;  // non-empty: the source must authenticate with the same key
  AcceptOptions accept;
  uint16_t max_page_channels = kMaxPageChannels;
  // Post-copy: non-zero runs the priority channel's reply reader, and the
  // threads starting the guest at the switchover, SCHED_FIFO at this
  // priority (src/sys/sched.h; the pager's fault handlers take theirs from
  // PostcopyVmOptions). Without permission they run as before.
  int realtime_priority = sys::kDefaultRealtimePriority;
};

struct DestinationStats {
  uint32_t passes = 0;
  uint64_t data_pages = 0;
  uint64_t zero_pages = 0;
  uint64_t bytes_received = 0;         // everything, framing included
  std::chrono::microseconds total{0};  // from the first connection to CompleteAck
};

class MigrationDestination {
 public:
  // `vm` must outlive this object.
  MigrationDestination(DestinationVm& vm, DestinationOptions options);

  // Accepts one migration from `acceptor` and receives it into the VM.
  // Blocks until CompleteAck is sent (success: start the VM) or it fails.
  Result<DestinationStats> Run(Acceptor& acceptor);

  // From any thread: abandons the migration; Run() returns an error.
  void Cancel();

 private:
  struct Incoming;  // one run's state (destination.cc)

  Result<DestinationStats> Receive(Attempt& a, Acceptor& acceptor);
  Status FollowMain(Incoming& in);
  Status FinishChannels(Incoming& in);
  Status LoadState(Incoming& in, const Complete& complete);

  DestinationVm& vm_;
  const DestinationOptions options_;
  // Taken before Attempt::mu_ (Cancel fails the active attempt under it).
  sys::Mutex mu_;
  Attempt* active_ GUARDED_BY(mu_) = nullptr;
  bool cancelled_ GUARDED_BY(mu_) = false;
};

}  // namespace faultline::migration
