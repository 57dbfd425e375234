// The destination's view of an incoming migration, for people and scripts:
// the post-copy figures (pager fault latency per vCPU, blocked time, pages
// demanded and pushed) in the demo report, in `faultline run --incoming
// --json` and in query-migrate on the destination's control socket, which
// IncomingStatus serves while the migration runs and after it ended
// (IncomingControl, incoming.h, keeps it up to date).
//
// Fault latency here is the pager's (paging/fault_metrics.h: fault read ->
// installed and woken, every fault by its own vCPU), the latency the guest
// sees; the network page source's request -> data-in-place time is reported
// beside it as request_p50_us / request_p99_us.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "src/control/types.h"
#include "src/migration/postcopy_destination.h"
#include "src/sys/mutex.h"

namespace faultline::control {

// The post-copy keys: fault_p50_us, fault_p99_us, faults, blocked_ms,
// request_p50_us, request_p99_us, pages_demanded, pages_pushed,
// present_at_start, vcpus [{vcpu, faults, fault_p50_us, fault_p99_us,
// max_us, blocked_ms}], other_faults. Latencies are null without faults.
nlohmann::json PostcopyFiguresJson(const migration::PostcopyDestinationStats& s);
// One line for people: "N pages demanded, M pushed; fault latency ...".
std::string PostcopyFiguresLine(const migration::PostcopyDestinationStats& s);

MigrationPhase ToMigrationPhase(migration::PostcopyPhase phase);

// The incoming migration as query-migrate reports it on the destination:
// the keys of a MigrationStatus (phase, mode, pass, bytes_total,
// bytes_sent, bytes_remaining, elapsed_ms, ...; ParseMigrationStatus
// reads it) plus "direction": "incoming" and, in post-copy, the keys of
// PostcopyFiguresJson. Thread-safe: the control socket's threads call
// Status() while the migration's thread attaches, detaches and finishes.
class IncomingStatus {
 public:
  IncomingStatus(MigrationMode mode, uint64_t bytes_total);

  // A post-copy destination to query live from now on, until Detach (which
  // must come before it is destroyed).
  void Attach(const migration::PostcopyDestination* destination);
  void Detach();
  // Without a destination to query: the phase to report.
  void SetPhase(MigrationPhase phase);
  // The end: its final phase and, for post-copy, its final figures.
  void Finish(MigrationPhase phase, std::string error = "",
              const migration::PostcopyDestinationStats* stats = nullptr);

  MigrationPhase phase() const;
  nlohmann::json Status() const;

 private:
  using Clock = std::chrono::steady_clock;
  nlohmann::json StatusLocked(const migration::PostcopyDestinationStats* stats,
                              MigrationPhase phase) const REQUIRES(mu_);

  const MigrationMode mode_;
  const uint64_t bytes_total_;
  const Clock::time_point start_;
  // Held while Status() and phase() query the attached destination, so
  // taken before PostcopyDestination's own locks (a module below: not
  // expressible as ACQUIRED_BEFORE).
  mutable sys::Mutex mu_;
  const migration::PostcopyDestination* destination_ GUARDED_BY(mu_) = nullptr;
  MigrationPhase phase_ GUARDED_BY(mu_) = MigrationPhase::kSetup;
  std::string error_ GUARDED_BY(mu_);
  nlohmann::json final_ GUARDED_BY(mu_);
};

// A query-migrate reply (either side's) as a few lines for people.
std::string FormatMigrationStatus(const nlohmann::json& status);

}  // namespace faultline::control
