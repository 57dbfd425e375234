// SourceMigrationControl: the control socket's MigrationControl on top of the
// pre-copy engine (migration::MigrationSource), the post-copy engine
// (migration::PostcopySource, for mode postcopy) and, to a unix: target, the
// local update (migration::LocalUpdateSource: the RAM passed by descriptor,
// or an offer before one of the engines copies it). Each "migrate" runs one
// engine on a thread of its own; query-migrate turns the engine's live
// counters into a MigrationStatus, estimating the rates and the ETA from
// successive samples. The destination's counterpart is IncomingControl
// (incoming.h).
//
// Estimates, and what they rest on: bytes count 4 KiB pages handled (a zero
// page counts, though it travels as a marker); a pass after the first has
// the work the engine harvested at its start (SourceProgress::dirty_pages);
// the dirty rate is that work over the previous pass's duration, as seen by
// the polls. Nothing here is needed for correctness, only for the display.
//
// Post-copy: migrate-start-postcopy switches after the pass under way;
// migrate-cancel before the switchover fails the migration (the VM keeps
// running here), after it breaks the link and pauses the migration, as a
// broken link does (nothing is lost: the guest at the destination waits for
// its missing pages); migrate-resume then reconnects, to the original
// destination or a new address, and the migration completes.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "faultline/status.h"
#include "src/control/migration.h"
#include "src/migration/auth.h"
#include "src/migration/fault_transport.h"
#include "src/migration/local_update.h"
#include "src/migration/migratable.h"
#include "src/migration/postcopy_source.h"
#include "src/migration/source.h"
#include "src/migration/transport.h"
#include "src/sys/mutex.h"
#include "src/sys/sched.h"

namespace faultline::control {

class SourceMigrationControl final : public MigrationControl {
 public:
  struct Options {
    migration::AuthKey key;  // empty: no authentication
    migration::TransportOptions transport;
    uint32_t max_precopy_passes = 30;
    // Post-copy: the SCHED_FIFO priority of the request responder and the
    // switchover (PostcopySourceOptions::realtime_priority; 0: none).
    int realtime_priority = sys::kDefaultRealtimePriority;
    // Called on the migration's thread when it has ended, with the engine's
    // verdict on who runs the guest (completed: the destination does, and
    // the VM here stays paused for the VMM to retire).
    std::function<void(migration::SourceOutcome)> on_done;
    // A test hook: the first session of each migration goes through a
    // simulated link (fault_transport.h) with this plan, e.g. one that
    // breaks after so many bytes; sessions made by migrate-resume do not.
    std::optional<migration::FaultPlan> first_link_fault;
    // A test hook: a local update's offer goes without its descriptors.
    bool local_withhold_fds = false;
  };

  // `vm` must outlive this object.
  SourceMigrationControl(migration::SourceVm& vm, Options options);
  // Cancels an active migration and waits for its thread.
  ~SourceMigrationControl() override;

  // OK if this build can migrate in `mode`; otherwise why not (NotSupported).
  static Status CheckMode(MigrationMode mode);

  Status Start(const MigrateRequest& request) override;
  MigrationStatus Query() override;
  Status Cancel() override;
  Status Resume(const std::optional<MigrationTarget>& to) override;
  Status StartPostcopy() override;

 private:
  // Where a request goes: the connector to dial and, for a unix: target,
  // how the guest's memory can go there.
  struct Route {
    // Options::transport, with the request's TLS directory if it has one
    // (a migrate-resume dials with the same).
    migration::TransportOptions transport;
    std::unique_ptr<migration::Connector> connector;
    bool unix_target = false;
    migration::LocalMemory local_memory = migration::LocalMemory::kCopy;
  };
  Result<Route> MakeRoute(const MigrateRequest& request);
  // The engine for `request` (and for a unix: target the local update's
  // offer), replacing the previous migration's.
  void MakeEnginesLocked(const MigrateRequest& request, bool unix_target) REQUIRES(mu_);
  // The migration's thread, one of these three. Start hands it its engine
  // (and `local`, the offer before a copy, or null) under mu_; an engine is
  // not replaced while running_ is true, so the thread uses it without mu_.
  void RunMigration(migration::Connector* connector, migration::MigrationSource* source,
                    migration::LocalUpdateSource* local);
  void RunPostcopy(migration::Connector* connector, migration::PostcopySource* postcopy,
                   migration::LocalUpdateSource* local);
  void RunLocal(migration::Connector* connector, migration::LocalUpdateSource* local);
  // unix: targets whose memory is copied: the offer before the migration
  // (none without `local`).
  static Status OfferCopy(migration::Connector* connector, migration::LocalUpdateSource* local,
                          migration::SwitchoverMode mode);
  // Publishes a migration that ended before its engine ran.
  void FailEarly(const Status& why);
  // A status with what every phase has: mode, target, size, time so far.
  MigrationStatus BaseStatus() const REQUIRES(mu_);
  // A local update whose RAM is passed by descriptor (no engine runs).
  bool PassesFds() const REQUIRES(mu_) {
    return request_.local && local_memory_ == migration::LocalMemory::kFds;
  }
  // The local-update fields of a status (request_.local).
  void AddLocal(MigrationStatus& s) const REQUIRES(mu_);
  MigrationStatus PostcopyStatus() REQUIRES(mu_);
  // The phase of an active migration from the engine's counters.
  MigrationStatus Estimate(const migration::SourceProgress& p) REQUIRES(mu_);

  migration::SourceVm& vm_;
  const Options options_;
  const uint64_t bytes_total_;

  // Taken before the engines' outer locks: Cancel, Query, Resume and
  // StartPostcopy call into the engine with it held. Those locks are
  // private to module migration, so the order is written here and in
  // docs/architecture.md section 4, not as ACQUIRED_BEFORE.
  sys::Mutex mu_;
  // One migration at a time; the previous one's thread is joined when the
  // next starts, or by the destructor.
  std::thread thread_ GUARDED_BY(mu_);
  std::unique_ptr<migration::Connector> connector_ GUARDED_BY(mu_);
  migration::TransportOptions transport_ GUARDED_BY(mu_);                // the migration's (Route)
  std::unique_ptr<migration::MigrationSource> source_ GUARDED_BY(mu_);   // mode precopy
  std::unique_ptr<migration::PostcopySource> postcopy_ GUARDED_BY(mu_);  // mode postcopy
  // unix: targets: the offer, and for memory passed by fd the whole update.
  std::unique_ptr<migration::LocalUpdateSource> local_ GUARDED_BY(mu_);
  migration::LocalMemory local_memory_ GUARDED_BY(mu_) = migration::LocalMemory::kCopy;
  // Post-copy paused: the connector a migrate-resume has made, for the
  // migration's thread to take; stopping_ ends a paused migration's wait.
  std::condition_variable resume_cv_;
  std::unique_ptr<migration::Connector> resume_connector_ GUARDED_BY(mu_);
  MigrationTarget resume_to_ GUARDED_BY(mu_);
  bool stopping_ GUARDED_BY(mu_) = false;
  std::string paused_error_ GUARDED_BY(mu_);  // why the post-copy link broke
  std::optional<migration::PostcopySourceStats> postcopy_stats_ GUARDED_BY(mu_);
  MigrateRequest request_ GUARDED_BY(mu_);
  bool running_ GUARDED_BY(mu_) = false;
  bool cancel_requested_ GUARDED_BY(mu_) = false;
  std::optional<MigrationStatus> final_ GUARDED_BY(mu_);  // once the migration has ended
  std::chrono::steady_clock::time_point started_ GUARDED_BY(mu_);
  // Samples for the estimates.
  std::chrono::steady_clock::time_point sample_time_ GUARDED_BY(mu_);
  uint64_t sample_pages_ GUARDED_BY(mu_) = 0;
  uint64_t send_rate_ GUARDED_BY(mu_) = 0;  // bytes/s
  uint32_t pass_seen_ GUARDED_BY(mu_) = 0;
  uint64_t pass_start_pages_ GUARDED_BY(mu_) = 0;
  std::chrono::steady_clock::time_point pass_start_time_ GUARDED_BY(mu_);
  uint64_t dirty_rate_ GUARDED_BY(mu_) = 0;  // bytes/s
};

}  // namespace faultline::control
