// faultline run --restore DIR: the reference VM from a snapshot
// (docs/snapshot.md), its machine (RAM size and backing, vCPUs, accelerator)
// from the manifest.
//
//   eager   checks every checksum, reads all memory, then runs the guest;
//   lazy    runs the guest at once: its data pages are demand-paged from the
//           snapshot's files by the post-copy pager (at most one copy), zero
//           pages (holes) are present from the start, and a background
//           reader brings in the rest;
//   --prefetch FILE   lazy: the background reader loads that working set
//           first, in its order, then the rest;
//   --verify  lazy: every memory chunk's checksum is checked before the guest
//           starts (an eager restore always does; a lazy one otherwise
//           reads only what the guest and the background reader need);
//   --memory-backend uffd:PATH  the memory comes from a page server (the
//           handshake of Firecracker's page-fault handlers, sent by this
//           VMM with its userfaultfd); if the server dies, this VMM says so
//           and exits 1 at once (its guest would wait forever otherwise);
//   --record-ws FILE  lazy: pages arrive only when the guest touches them
//           (no background reader), and the order of first touches is saved
//           to FILE when the guest has finished (migration/working_set.h).
//
// Figures, in the run's report ("restore"), all from the start of the
// restore: the first guest instruction (the vCPUs started), the end of the
// guest's hot-set phase (its report, the last vCPU's), and every page
// resident.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "faultline/status.h"
#include "src/migration/snapshot.h"
#include "src/migration/uffd_backend.h"
#include "src/migration/working_set.h"
#include "src/sys/mutex.h"
#include "src/vmm/vm.h"

namespace faultline::cli {

struct RestoreOptions {
  std::string dir;
  bool lazy = false;
  std::string prefetch;   // a working set to load first (lazy)
  std::string record_ws;  // where to save this run's working set (lazy)
  std::string installer;  // lazy: empty or auto, or a name
  bool verify = false;    // lazy: check every memory checksum before starting
  // "uffd:PATH": the memory is paged by the page server at PATH (`faultline
  // serve-pages`) through a userfaultfd this VMM hands it; the vCPU and
  // device state come from the snapshot.
  std::string memory_backend;
  int realtime_priority = 0;
  bool quiet = false;
};

class RestoredVm {
 public:
  using Clock = std::chrono::steady_clock;

  // Opens and checks the snapshot (and the working set to prefetch), and
  // makes `config` its machine: RAM size, vCPUs, the backing (unless
  // `keep_backing`: a 4 KiB-page backing may replace another) and, when
  // config.accel is auto, the accelerator whose vCPU state it holds. Nothing
  // is started.
  static Result<std::unique_ptr<RestoredVm>> Open(RestoreOptions options, vmm::VmConfig& config,
                                                  bool keep_backing);
  ~RestoredVm();  // stops and joins the background reader
  RestoredVm(const RestoredVm&) = delete;
  RestoredVm& operator=(const RestoredVm&) = delete;

  // Loads `vm` (created from the config, not started) and runs the guest;
  // `vm` must outlive this object's use of it (until destruction).
  Status Start(vmm::Vm& vm);
  // For LiveVm::Options::memory_ready: waits for the background reader
  // (lazy), then OK or why the memory cannot be read as a whole.
  Status MemoryReady();
  // Once the guest has finished: saves the working set (--record-ws), waits
  // for the background reader, and returns the figures.
  Result<nlohmann::json> Finish();

  Clock::time_point started() const { return opened_; }

 private:
  RestoredVm(RestoreOptions options, migration::SnapshotReader snapshot);
  void OnGuestEvent(const GuestEvent& event);
  Status StartLazy(vmm::Vm& vm);
  Status StartServed(vmm::Vm& vm);
  void Background();
  double MsSinceOpen(Clock::time_point t) const {
    return std::chrono::duration<double, std::milli>(t - opened_).count();
  }

  const RestoreOptions options_;
  const migration::SnapshotReader snapshot_;
  const Clock::time_point opened_ = Clock::now();
  std::vector<migration::MemoryRange> prefetch_;
  std::unique_ptr<migration::WorkingSetRecorder> recorder_;
  std::unique_ptr<migration::DestinationVm> eager_;
  std::unique_ptr<migration::PostcopyDestinationVm> lazy_;
  std::unique_ptr<migration::UffdBackend> backend_;  // --memory-backend uffd:PATH
  nlohmann::json calibration_;
  std::optional<Clock::time_point> first_instruction_;
  std::atomic<Clock::rep> hotset_done_{0};  // the last hot-set phase report, or 0
  std::atomic<bool> stop_{false};
  std::thread background_;

  sys::Mutex mu_;
  std::condition_variable cv_;
  bool resident_ GUARDED_BY(mu_) = false;  // the background reader has finished
  Status background_status_ GUARDED_BY(mu_);
  std::optional<Clock::time_point> resident_at_ GUARDED_BY(mu_);
  migration::PrefetchStats prefetched_ GUARDED_BY(mu_);
  double prefetch_ms_ GUARDED_BY(mu_) = 0;
};

}  // namespace faultline::cli
