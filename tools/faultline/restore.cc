#include "tools/faultline/restore.h"

#include <cstdio>

#include <fmt/format.h>

#include "src/control/incoming.h"
#include "src/vmm/vm_adapter.h"

namespace faultline::cli {

RestoredVm::RestoredVm(RestoreOptions options, migration::SnapshotReader snapshot)
    : options_(std::move(options)), snapshot_(std::move(snapshot)) {}

RestoredVm::~RestoredVm() {
  stop_.store(true);
  if (background_.joinable()) background_.join();
}

namespace {

// The snapshot's machine into `config`; errors say what does not fit.
Status ApplyManifest(const migration::SnapshotManifest& m, vmm::VmConfig& config,
                     bool keep_backing) {
  if (m.blocks.size() != 1 || m.blocks[0].name != vmm::kRamBlockName) {
    return Error(
        "the snapshot has {} RAM block(s){}: not one of the reference VMM's (one block named "
        "'{}'); restore it with the VMM that wrote it",
        m.blocks.size(), m.blocks.empty() ? "" : fmt::format(", the first '{}'", m.blocks[0].name),
        vmm::kRamBlockName);
  }
  const migration::SnapshotBlock& ram = m.blocks[0];
  config.mem_size = ram.size;
  config.vcpus = static_cast<uint32_t>(m.vcpus.size());
  if (!keep_backing) config.backing = ram.backing;
  const uint64_t page_size = config.backing == Backing::kHugetlb ? kHugePageSize : kPageSize;
  if (page_size != ram.page_size) {
    return Error(
        "the snapshot's RAM has {} KiB pages, --backing {} has {} KiB pages: restore with a "
        "backing of the snapshot's page size",
        ram.page_size >> 10, BackingName(config.backing), page_size >> 10);
  }
  if (config.accel == hv::AccelChoice::kAuto) {
    if (m.accelerator == migration::HelloAccel::kKvm) config.accel = hv::AccelChoice::kKvm;
    if (m.accelerator == migration::HelloAccel::kTcg) config.accel = hv::AccelChoice::kTcg;
  }
  config.boot = false;  // the guest, its command line included, is in the memory
  return vmm::ValidateConfig(config).WithContext("the snapshot's machine");
}

}  // namespace

Result<std::unique_ptr<RestoredVm>> RestoredVm::Open(RestoreOptions options, vmm::VmConfig& config,
                                                     bool keep_backing) {
  if (!options.lazy && (!options.prefetch.empty() || !options.record_ws.empty())) {
    return Error("--prefetch and --record-ws go with --lazy: an eager restore reads everything");
  }
  if (!options.prefetch.empty() && !options.record_ws.empty()) {
    return Error(
        "--record-ws records the pages the guest faults on, --prefetch loads pages before it "
        "does: give one of them");
  }
  if ((!options.installer.empty() || options.verify) && !options.lazy) {
    return Error("--installer and --verify go with --lazy (an eager restore always verifies)");
  }
  if (!options.memory_backend.empty()) {
    if (!options.memory_backend.starts_with("uffd:") || options.memory_backend.size() == 5) {
      return Error(
          "--memory-backend {}: expected uffd:PATH (the socket of `faultline serve-pages`)",
          options.memory_backend);
    }
    if (options.lazy) {
      return Error(
          "--memory-backend uffd:PATH pages the memory in from the page server: not with "
          "--lazy, which pages it in from the snapshot's files here");
    }
  }
  ASSIGN_OR_RETURN(migration::SnapshotReader snapshot,
                   migration::SnapshotReader::Open(options.dir));
  RETURN_IF_ERROR(ApplyManifest(snapshot.manifest(), config, keep_backing));
  std::unique_ptr<RestoredVm> r(new RestoredVm(std::move(options), std::move(snapshot)));
  if (!r->options_.prefetch.empty()) {
    ASSIGN_OR_RETURN(r->prefetch_,
                     migration::LoadWorkingSet(r->options_.prefetch, config.mem_size));
  }
  if (!r->options_.record_ws.empty()) {
    r->recorder_ = std::make_unique<migration::WorkingSetRecorder>(r->snapshot_.manifest());
  }
  auto on_event = std::move(config.on_event);
  RestoredVm* self = r.get();
  config.on_event = [self, on_event](const GuestEvent& event) {
    self->OnGuestEvent(event);
    if (on_event) on_event(event);
  };
  return r;
}

void RestoredVm::OnGuestEvent(const GuestEvent& event) {
  if (event.kind == GuestEvent::Kind::kPhase && event.phase != nullptr &&
      event.phase->phase == static_cast<uint32_t>(GuestPhaseKind::kHotset)) {
    hotset_done_.store(Clock::now().time_since_epoch().count(), std::memory_order_relaxed);
  }
}

Status RestoredVm::Start(vmm::Vm& vm) {
  if (options_.lazy) return StartLazy(vm);
  if (!options_.memory_backend.empty()) return StartServed(vm);
  eager_ = vmm::MakeDestinationVm(vm);
  RETURN_IF_ERROR(migration::RestoreEager(snapshot_, *eager_));
  RETURN_IF_ERROR(vm.Start());
  first_instruction_ = Clock::now();
  sys::MutexLock lock(mu_);
  resident_ = true;
  resident_at_ = first_instruction_;
  return Status::Ok();
}

Status RestoredVm::StartLazy(vmm::Vm& vm) {
  migration::PostcopyVmOptions vm_options;
  ASSIGN_OR_RETURN(vm_options.installer,
                   control::ChooseInstaller(options_.installer, vm.config().backing, calibration_,
                                            options_.quiet));
  vm_options.realtime_priority = options_.realtime_priority;
  if (recorder_) {
    migration::WorkingSetRecorder* recorder = recorder_.get();
    vm_options.pager.on_demand_fetch = [recorder](uint32_t block, uint64_t offset,
                                                  uint64_t length) {
      recorder->Record(block, offset, length);
    };
  }
  if (options_.verify) RETURN_IF_ERROR(snapshot_.Verify());
  lazy_ = vmm::MakePostcopyDestinationVm(vm, vm_options);
  RETURN_IF_ERROR(migration::StartLazyRestore(snapshot_, *lazy_));
  first_instruction_ = Clock::now();
  // Recording: the guest's faults alone bring pages in, so that each first
  // touch is seen.
  if (!recorder_) background_ = std::thread([this] { Background(); });
  return Status::Ok();
}

Status RestoredVm::StartServed(vmm::Vm& vm) {
  const std::string path = options_.memory_backend.substr(5);
  Result<std::unique_ptr<migration::UffdBackend>> backend =
      migration::ConnectUffdBackend(path, vm.memory().blocks(), [path](const Status& why) {
        // The vCPUs would wait forever on the next missing page: stop now.
        fmt::print(stderr,
                   "faultline run: error: the page server at {} is gone ({}); it served the "
                   "guest's memory, so the guest cannot go on: stopping\n",
                   path, why.ToString());
        std::fflush(stderr);
        std::_Exit(1);
      });
  if (!backend.has_value()) return backend.error().WithContext("--memory-backend");
  backend_ = std::move(*backend);
  eager_ = vmm::MakeDestinationVm(vm);
  RETURN_IF_ERROR(migration::RestoreState(snapshot_, *eager_));
  RETURN_IF_ERROR(vm.Start());
  first_instruction_ = Clock::now();
  return Status::Ok();
}

void RestoredVm::Background() {
  Status status;
  migration::PrefetchStats prefetched;
  const Clock::time_point started = Clock::now();
  double prefetch_ms = 0;
  if (!prefetch_.empty()) {
    Result<migration::PrefetchStats> p = migration::Prefetch(snapshot_, *lazy_, prefetch_, stop_);
    prefetch_ms = std::chrono::duration<double, std::milli>(Clock::now() - started).count();
    if (p.has_value()) {
      prefetched = *p;
    } else {
      status = p.error().WithContext("--prefetch");
    }
  }
  if (status.ok() && !stop_.load()) status = lazy_->FetchMissing();
  if (status.ok() && !stop_.load()) status = lazy_->FinishPaging();
  sys::MutexLock lock(mu_);
  resident_ = true;
  resident_at_ = Clock::now();
  background_status_ = status;
  prefetched_ = prefetched;
  prefetch_ms_ = prefetch_ms;
  cv_.notify_all();
}

Status RestoredVm::MemoryReady() {
  if (backend_) {
    return Error(
        "this VM's memory is paged by the page server at {} (--memory-backend): it cannot be "
        "read as a whole here",
        options_.memory_backend.substr(5));
  }
  if (recorder_) {
    return Error(
        "this VM records its working set (--record-ws): pages come only when the guest touches "
        "them, so its memory cannot be read as a whole until it has finished");
  }
  sys::MutexLock lock(mu_);
  cv_.wait(lock.native(), [&]() REQUIRES(mu_) { return resident_; });
  return background_status_.WithContext("the lazy restore's background reader");
}

Result<nlohmann::json> RestoredVm::Finish() {
  const char* mode = options_.lazy ? "lazy" : backend_ ? "page-server" : "eager";
  nlohmann::json j = {{"dir", options_.dir}, {"mode", mode}};
  if (backend_) j["memory_backend"] = options_.memory_backend;
  if (first_instruction_) j["first_instruction_ms"] = MsSinceOpen(*first_instruction_);
  if (const Clock::rep t = hotset_done_.load(); t != 0) {
    j["hotset_done_ms"] = MsSinceOpen(Clock::time_point(Clock::duration(t)));
  }
  if (recorder_) {
    const std::vector<migration::MemoryRange> ranges = recorder_->ranges();
    RETURN_IF_ERROR(
        migration::SaveWorkingSet(options_.record_ws, ranges).WithContext("--record-ws"));
    j["working_set"] = {{"file", options_.record_ws},
                        {"pages", recorder_->bytes() / kPageSize},
                        {"ranges", ranges.size()}};
  }
  if (background_.joinable()) background_.join();
  if (lazy_) {
    const paging::PagingStats s = lazy_->paging_stats();
    j["installer"] = paging::InstallerName(lazy_->installer());
    if (!calibration_.is_null()) j["installer_calibration"] = calibration_;
    j["faults"] = s.faults;
    j["demand_fetches"] = s.fetches - s.pushes - s.vmm_fetches;
    j["pages_fetched"] = s.bytes_fetched / kPageSize;
    j["fault_p50_us"] = s.latency.p50_us;
    j["fault_p99_us"] = s.latency.p99_us;
  }
  sys::MutexLock lock(mu_);
  if (resident_at_) j["resident_ms"] = MsSinceOpen(*resident_at_);
  if (!prefetch_.empty()) {
    j["prefetch"] = {{"file", options_.prefetch},
                     {"pages", prefetched_.bytes / kPageSize},
                     {"units", prefetched_.units},
                     {"ms", prefetch_ms_}};
  }
  RETURN_IF_ERROR(background_status_.WithContext("the lazy restore's background reader"));
  return j;
}

}  // namespace faultline::cli
