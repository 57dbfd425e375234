// The embedding API's snapshots (include/faultline/embed.h) over
// migration/snapshot.h: the VMM's RAM and VmHandle as a SourceVm, a
// DestinationVm (eager) or a PostcopyDestinationVm (lazy).
#include "src/migration/snapshot.h"

#include "faultline/embed.h"
#include "src/embed/vm_glue.h"

namespace faultline {
namespace {

using Clock = std::chrono::steady_clock;

uint64_t UsSince(Clock::time_point start) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start).count());
}

}  // namespace

Result<SnapshotStats> WriteSnapshot(VmHandle& vm, std::vector<GuestRegion> ram,
                                    const std::string& dir, SnapshotOptions options) {
  embed::Ram memory;
  RETURN_IF_ERROR(memory.Init(ram));
  auto source = migration::MakeMemorySource(
      *memory.memory, std::make_unique<embed::HandleControl>(vm, /*memory_is_zero=*/false));
  migration::SnapshotOptions o;
  o.live = options.live;
  o.resume = options.resume;
  ASSIGN_OR_RETURN(migration::SnapshotStats s, migration::WriteSnapshot(*source, dir, o));
  return SnapshotStats{s.passes, s.data_pages, s.zero_pages, static_cast<uint64_t>(s.pause.count()),
                       static_cast<uint64_t>(s.total.count())};
}

Result<RestoreStats> RestoreSnapshot(VmHandle& vm, std::vector<GuestRegion> ram,
                                     const std::string& dir, RestoreOptions options) {
  const auto start = Clock::now();
  ASSIGN_OR_RETURN(migration::SnapshotReader snapshot, migration::SnapshotReader::Open(dir));
  embed::Ram memory;
  RETURN_IF_ERROR(memory.Init(ram));
  auto control = std::make_unique<embed::HandleControl>(vm, /*memory_is_zero=*/true);
  RestoreStats stats;
  if (!options.lazy) {
    auto destination = migration::MakeMemoryDestination(*memory.memory, std::move(control));
    RETURN_IF_ERROR(migration::RestoreEager(snapshot, *destination));
    RETURN_IF_ERROR(vm.Start());
    stats.start_us = stats.resident_us = UsSince(start);
    return stats;
  }
  auto destination = migration::MakeMemoryPostcopyDestination(*memory.memory, std::move(control));
  RETURN_IF_ERROR(migration::StartLazyRestore(snapshot, *destination));
  stats.start_us = UsSince(start);
  RETURN_IF_ERROR(destination->FetchMissing());
  RETURN_IF_ERROR(destination->FinishPaging());
  stats.resident_us = UsSince(start);
  const paging::PagingStats paging = destination->paging_stats();
  stats.faults = paging.faults;
  stats.pages_read = paging.bytes_fetched / 4096;
  return stats;
}

}  // namespace faultline
