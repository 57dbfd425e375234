// MigrationSource: the sending side of a pre-copy live migration.
//
//   1. Handshake (handshake.h): block list, page channels, authentication.
//   2. Pass 0 sends every page of every block; each later pass sends the
//      pages dirtied during the previous one. Page channels share a pass's
//      work (16 MiB regions handed out in order); zero pages go as markers.
//   3. When the dirty pages left would take at most the downtime target to
//      send at the rate measured in the last pass (or after
//      max_precopy_passes, or once passes stop shrinking the dirty
//      set), the VM is paused: Switchover, the final pass,
//      vCPU and device state, Complete.
//   4. The destination answers CompleteAck once it has everything and has
//      loaded the state; only then does it run the guest.
//
// Who runs the guest when something fails (docs/protocol.md §6):
//   before the pause                -> the VM never stopped: kept running
//   after the pause, before Complete -> the VM is resumed here
//   Error from the destination       -> resumed (it will not run the guest)
//   link lost after Complete         -> left paused, outcome unknown: the
//                                       destination may be running it
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <vector>

#include "faultline/status.h"
#include "src/migration/auth.h"
#include "src/migration/migratable.h"
#include "src/migration/source_state.h"
#include "src/migration/transport.h"
#include "src/sys/mutex.h"

namespace faultline::migration {

class Attempt;

struct SourceOptions {
  uint16_t page_channels = 4;
  AuthKey key;  // empty: no authentication
  // Switch over once the remaining dirty memory could be sent in this long.
  std::chrono::milliseconds downtime_target{50};
  uint32_t max_precopy_passes = 30;  // then switch over whatever is left
  uint64_t bandwidth_limit = 0;      // bytes/s of page data over all channels, 0: none
  uint32_t batch_pages = 256;        // pages per Pages message, 1..kMaxPagesPerBatch
};

struct PassStats {
  uint32_t pass = 0;
  uint64_t data_pages = 0;
  uint64_t zero_pages = 0;
  double seconds = 0;
  uint64_t dirty_after = 0;  // pages dirty when the pass ended (the next pass's work)
};

struct SourceStats {
  std::vector<PassStats> passes;  // the pre-copy passes, then the final one
  uint64_t data_pages = 0;
  uint64_t zero_pages = 0;
  uint64_t bytes_sent = 0;                // everything, framing included, all channels
  std::chrono::microseconds downtime{0};  // pause until CompleteAck
  std::chrono::microseconds total{0};
};

// A live view for status queries; any thread.
struct SourceProgress {
  uint32_t pass = 0;
  uint64_t pages_sent = 0;   // data and zero, all passes so far
  uint64_t dirty_pages = 0;  // at the last harvest
  bool paused = false;
};

class MigrationSource {
 public:
  // `vm` must outlive this object.
  MigrationSource(SourceVm& vm, SourceOptions options);

  // Migrates the VM to wherever `connector` dials. Blocks until it is done;
  // outcome() then says who runs the guest. Call once.
  Result<SourceStats> Run(Connector& connector);

  // From any thread: abandons the migration (the session is shut down, Run
  // returns an error). Too late once Complete is sent.
  void Cancel();

  SourceOutcome outcome() const;
  SourceProgress progress() const;

 private:
  // One run's state besides the attempt (source.cc).
  struct Outgoing;

  Result<SourceStats> Migrate(Attempt& a, Connector& connector);
  Status Precopy(Outgoing& out);
  Status Switchover(Outgoing& out);
  // Ends a failed run: who runs the guest now (source_state.h), the VM
  // resumed here if it must be.
  Status Fail(Outgoing& out, Status status);
  // Takes step `event` of the state machine (under mu_, which it takes).
  Status Step(Status (SourceState::*event)()) EXCLUDES(mu_);

  SourceVm& vm_;
  const SourceOptions options_;
  std::atomic<uint64_t> pages_sent_{0};
  std::atomic<uint64_t> dirty_pages_{0};
  // Taken before Attempt::mu_ (Cancel fails the active attempt under it).
  mutable sys::Mutex mu_;
  SourceState state_ GUARDED_BY(mu_){SourceMode::kStopAndCopy};
  Attempt* active_ GUARDED_BY(mu_) = nullptr;  // set while Run() runs
};

}  // namespace faultline::migration
