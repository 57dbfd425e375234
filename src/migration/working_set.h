// Working sets: the order in which a restored guest first touched pages it
// did not have, recorded in one lazy restore (`faultline run --restore DIR
// --lazy --record-ws FILE`) and loaded first, in that order, in the next
// (`--prefetch FILE`), as REAP (ASPLOS '21) does.
//
// The file is text: a first line "# faultline working set v1", then one
// range per line, "OFFSET LENGTH" in decimal bytes, in the order of first
// touch (a range continuing the one before is merged into it). Offsets are
// into the snapshot's memory as one file: its blocks back to back, in
// manifest order, which is the `offset` of Firecracker's page-fault handler
// handshake, so `faultline serve-pages --prefetch` reads the same file.
// Numbers may also be 0x hexadecimal; '#' starts a comment; the first line
// is optional (a hand-written list of ranges is a working set too), but a
// file that names another version is refused.
#pragma once

#include <atomic>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "faultline/status.h"
#include "src/migration/postcopy_vm.h"
#include "src/migration/snapshot.h"
#include "src/sys/mutex.h"

namespace faultline::migration {

struct MemoryRange {
  uint64_t offset = 0;  // into the snapshot's memory, blocks back to back
  uint64_t length = 0;
  bool operator==(const MemoryRange&) const = default;
};

// Where each block of `manifest` starts in its memory as one file.
std::vector<uint64_t> BlockBases(const SnapshotManifest& manifest);

class WorkingSetRecorder {
 public:
  explicit WorkingSetRecorder(const SnapshotManifest& manifest) : bases_(BlockBases(manifest)) {}

  // Thread-safe: what PagerOptions::on_demand_fetch calls.
  void Record(uint32_t block, uint64_t offset, uint64_t length);
  std::vector<MemoryRange> ranges() const;
  uint64_t bytes() const;

 private:
  const std::vector<uint64_t> bases_;
  mutable sys::Mutex mu_;  // a leaf
  std::vector<MemoryRange> ranges_ GUARDED_BY(mu_);
  uint64_t bytes_ GUARDED_BY(mu_) = 0;
};

// Writes `ranges` to `path` (through a temporary file and a rename).
Status SaveWorkingSet(const std::string& path, std::span<const MemoryRange> ranges);
// Reads a working set for memory of `memory_size` bytes: every range must be
// page-aligned and inside it. Errors give the line.
Result<std::vector<MemoryRange>> LoadWorkingSet(const std::string& path, uint64_t memory_size);

struct PrefetchStats {
  uint64_t units = 0;  // install units brought in by the prefetch
  uint64_t bytes = 0;
};

// Brings the pages of `ranges` into a lazily restored VM (StartLazyRestore),
// in order, from the snapshot's files, through the pager's PushTarget: pages
// the guest has already, or is fetching, are skipped, so none is read twice.
// `threads` read at once, each taking every `threads`-th range, in order.
// Returns early, with what it did, once `stop` is true.
Result<PrefetchStats> Prefetch(const SnapshotReader& snapshot, PostcopyDestinationVm& vm,
                               std::span<const MemoryRange> ranges, const std::atomic<bool>& stop,
                               uint32_t threads = 2);

}  // namespace faultline::migration
