// Snapshots: a VM's memory and state written to a directory, and read back
// eagerly (everything, then run) or lazily (the guest runs at once; its
// pages are demand-paged from the files by the post-copy pager).
//
//   DIR/manifest.json   format "faultline-snapshot", version, accelerator,
//                       vCPU count, chunk size, per block: name, size, page
//                       size, backing, file, SHA-256 of every chunk; per vCPU
//                       and device: file, size, SHA-256
//   DIR/block-N.mem     the block's bytes; zero pages are holes (sparse)
//   DIR/vcpu-N.bin, DIR/device-N.bin   the opaque state blobs
//
// A snapshot is written to a temporary directory beside DIR, synced, and
// renamed to DIR, so that a crash mid-write never leaves a directory that
// looks like a valid snapshot. Live, it copies memory while the guest runs
// (dirty passes, as pre-copy) and pauses it only for the last dirty pages
// and the state.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "faultline/status.h"
#include "src/memory/dirty_bitmap.h"
#include "src/migration/migratable.h"
#include "src/migration/postcopy_vm.h"
#include "src/migration/wire.h"
#include "src/paging/snapshot_page_source.h"

namespace faultline::migration {

inline constexpr uint32_t kSnapshotVersion = 1;
inline constexpr uint64_t kSnapshotChunk = 2ull << 20;  // bytes per checksum

struct SnapshotOptions {
  // Copy while the guest runs, then pause for the rest; otherwise pause
  // for the whole write.
  bool live = true;
  uint32_t max_passes = 8;
  // The pause comes once a pass leaves fewer dirty pages than this.
  uint64_t stop_below_pages = 2048;
  // The guest runs again afterwards (false: it stays paused).
  bool resume = true;
};

struct SnapshotStats {
  uint32_t passes = 0;      // memory passes, the one inside the pause included
  uint64_t data_pages = 0;  // 4 KiB pages written (a page written twice counts twice)
  uint64_t zero_pages = 0;  // pages left as holes in the final files
  std::chrono::microseconds pause{0};
  std::chrono::microseconds total{0};
};

// Writes `vm` to `dir`, which must not exist (its parent must).
Result<SnapshotStats> WriteSnapshot(SourceVm& vm, const std::string& dir,
                                    const SnapshotOptions& options = {});

struct SnapshotBlock {
  std::string name;
  uint64_t size = 0;
  uint64_t page_size = 0;
  Backing backing = Backing::kAnonymous;
  std::string file;                 // relative to the snapshot directory
  std::vector<std::string> chunks;  // SHA-256 (hex) of each kSnapshotChunk
};

struct SnapshotBlob {
  std::string name;  // devices; vCPUs are named by index
  std::string file;
  uint64_t size = 0;
  std::string sha256;
};

struct SnapshotManifest {
  uint32_t version = kSnapshotVersion;
  HelloAccel accelerator = HelloAccel::kUnspecified;
  uint64_t chunk = kSnapshotChunk;
  std::vector<SnapshotBlock> blocks;
  std::vector<SnapshotBlob> vcpus;
  std::vector<SnapshotBlob> devices;
};

// Parses and checks manifest.json's text (format, version, every field's
// type and range); the files are not looked at.
Result<SnapshotManifest> ParseSnapshotManifest(std::string_view text);

// A snapshot directory, opened: its manifest read and checked (format,
// version, every file there with its size). Nothing is started or changed
// by any check that fails.
class SnapshotReader {
 public:
  static Result<SnapshotReader> Open(const std::string& dir);

  const SnapshotManifest& manifest() const { return manifest_; }
  const std::string& dir() const { return dir_; }

  // `blocks` match the snapshot's (names, sizes, page sizes, in order).
  Status CheckBlocks(std::span<const std::shared_ptr<RamBlock>> blocks) const;
  // Every chunk's and blob's checksum; reads every byte.
  Status Verify() const;
  // Eager: the data of every block into `blocks` (host()), which read as
  // zero now; holes are skipped.
  Status LoadMemory(std::span<const std::shared_ptr<RamBlock>> blocks) const;
  // The state blobs, each checked against its checksum.
  Result<std::vector<std::vector<uint8_t>>> ReadVcpus() const;
  Result<std::vector<DeviceBlob>> ReadDevices() const;

  // Lazy: the pages of each block that hold data (the rest are holes: zero),
  // in 4 KiB pages, and a page source that reads them from the files.
  Result<std::vector<DirtyBitmap>> DataPages() const;
  Result<std::shared_ptr<paging::SnapshotPageSource>> MakePageSource() const;

 private:
  SnapshotReader(std::string dir, SnapshotManifest manifest)
      : dir_(std::move(dir)), manifest_(std::move(manifest)) {}
  std::string Path(const std::string& file) const { return dir_ + "/" + file; }
  // A state blob, its checksum checked.
  Result<std::vector<uint8_t>> ReadBlob(const SnapshotBlob& blob) const;

  std::string dir_;
  SnapshotManifest manifest_;
};

// An eager restore into `vm` (created for it: its memory reads as zero):
// checks the layout and every checksum, then loads memory, vCPUs and
// devices. The caller runs the guest.
Status RestoreEager(const SnapshotReader& snapshot, DestinationVm& vm);

// A restore whose memory another process pages in (a page server, through
// the VMM's userfaultfd: `faultline run --restore DIR --memory-backend
// uffd:PATH`): the checks of the others, then the vCPU and device state.
// The caller has connected the memory before and runs the guest after.
Status RestoreState(const SnapshotReader& snapshot, DestinationVm& vm);

// A lazy restore into `vm`: checks the layout, the state's checksums and
// the vCPU count, then starts the guest at once with every data page
// demand-paged from the files (holes are zero pages: present from the
// start). The caller then fetches the rest in the background
// (vm.FetchMissing()) and ends paging (vm.FinishPaging()). Memory checksums
// are not read first (that would read every byte): Verify() separately.
Status StartLazyRestore(const SnapshotReader& snapshot, PostcopyDestinationVm& vm);

}  // namespace faultline::migration
