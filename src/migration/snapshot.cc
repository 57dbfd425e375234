#include "src/migration/snapshot.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "src/migration/page_sender.h"
#include "src/migration/snapshot_files.h"
#include "src/sys/unique_fd.h"

namespace faultline::migration {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

constexpr const char* kFormat = "faultline-snapshot";

std::chrono::microseconds Since(Clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start);
}

// One block's file while it is written: pages go in at their offsets; a
// page that is zero now becomes (or stays) a hole.
class BlockWriter {
 public:
  BlockWriter(RamBlock& block, sys::UniqueFd fd, std::string path)
      : block_(block), fd_(std::move(fd)), path_(std::move(path)) {}

  // Writes the pages set in `pages` (4 KiB pages) from the block's memory,
  // in runs. `fresh`: the file holds nothing yet (zero pages need no hole).
  Status Write(const DirtyBitmap& pages, bool fresh, SnapshotStats& stats) {
    Status status;
    pages.ForEachRun([&](uint64_t first, uint64_t count) {
      for (uint64_t p = first; p < first + count && status.ok();) {
        const bool zero = IsZeroPage(block_.host() + p * kWirePageSize);
        uint64_t end = p + 1;
        while (end < first + count && IsZeroPage(block_.host() + end * kWirePageSize) == zero) {
          ++end;
        }
        status = zero ? (fresh ? Status::Ok() : Punch(p, end - p)) : Copy(p, end - p);
        if (!zero) stats.data_pages += end - p;
        p = end;
      }
    });
    return status;
  }

  Status Sync() {
    if (::fsync(fd_.get()) != 0) return ErrnoError(errno, "snapshot: syncing {}", path_);
    return Status::Ok();
  }

  Result<DirtyBitmap> DataPages() const { return FileDataPages(fd_.get(), block_.size(), path_); }

  // The checksum of every chunk of the file as written (read back).
  Result<std::vector<std::string>> Checksums(uint64_t chunk) const {
    std::vector<std::string> out;
    std::vector<uint8_t> buffer(chunk);
    for (uint64_t offset = 0; offset < block_.size(); offset += chunk) {
      const uint64_t n = std::min(chunk, block_.size() - offset);
      RETURN_IF_ERROR(ReadAll(fd_.get(), buffer.data(), n, offset, path_));
      out.push_back(Sha256(std::span(buffer).first(n)));
    }
    return out;
  }

 private:
  Status Copy(uint64_t first, uint64_t count) {
    return WriteAll(fd_.get(), block_.host() + first * kWirePageSize, count * kWirePageSize,
                    first * kWirePageSize, path_);
  }
  Status Punch(uint64_t first, uint64_t count) {
    if (::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(first * kWirePageSize),
                    static_cast<off_t>(count * kWirePageSize)) != 0) {
      return ErrnoError(errno, "snapshot: punching zero pages into {}", path_);
    }
    return Status::Ok();
  }

  RamBlock& block_;
  sys::UniqueFd fd_;
  std::string path_;
};

Result<SnapshotBlob> WriteBlob(const std::string& dir, std::string file, std::string name,
                               std::span<const uint8_t> bytes) {
  const std::string path = dir + "/" + file;
  ASSIGN_OR_RETURN(sys::UniqueFd fd, OpenFile(path, O_WRONLY | O_CREAT | O_EXCL));
  RETURN_IF_ERROR(WriteAll(fd.get(), bytes.data(), bytes.size(), 0, path));
  if (::fsync(fd.get()) != 0) return ErrnoError(errno, "snapshot: syncing {}", path);
  return SnapshotBlob{std::move(name), std::move(file), bytes.size(), Sha256(bytes)};
}

nlohmann::json ManifestJson(const SnapshotManifest& m) {
  nlohmann::json blocks = nlohmann::json::array();
  for (const SnapshotBlock& b : m.blocks) {
    blocks.push_back({{"name", b.name},
                      {"size", b.size},
                      {"page_size", b.page_size},
                      {"backing", BackingName(b.backing)},
                      {"file", b.file},
                      {"chunks", b.chunks}});
  }
  auto blobs = [](const std::vector<SnapshotBlob>& list) {
    nlohmann::json out = nlohmann::json::array();
    for (const SnapshotBlob& b : list) {
      out.push_back({{"name", b.name}, {"file", b.file}, {"size", b.size}, {"sha256", b.sha256}});
    }
    return out;
  };
  return {{"format", kFormat},
          {"version", m.version},
          {"accelerator", static_cast<int>(m.accelerator)},
          {"chunk", m.chunk},
          {"blocks", blocks},
          {"vcpus", blobs(m.vcpus)},
          {"devices", blobs(m.devices)}};
}

Status SyncDir(const std::string& dir) {
  ASSIGN_OR_RETURN(sys::UniqueFd fd, OpenFile(dir, O_RDONLY | O_DIRECTORY));
  if (::fsync(fd.get()) != 0) return ErrnoError(errno, "snapshot: syncing {}", dir);
  return Status::Ok();
}

// The memory passes: everything once, then what the guest dirtied, until
// little is left or the passes run out; the last pass runs paused.
Status CopyMemory(SourceVm& vm, std::vector<BlockWriter>& writers,
                  std::span<const std::shared_ptr<RamBlock>> blocks, const SnapshotOptions& options,
                  SnapshotStats& stats, Clock::time_point& paused_at) {
  if (options.live) RETURN_IF_ERROR(vm.StartDirtyTracking());
  if (!options.live) {
    vm.Pause();
    paused_at = Clock::now();
  }
  for (size_t b = 0; b < blocks.size(); ++b) {
    DirtyBitmap all(blocks[b]->size() / kWirePageSize);
    all.SetAll();
    RETURN_IF_ERROR(writers[b].Write(all, /*fresh=*/true, stats));
  }
  stats.passes = 1;
  if (!options.live) return Status::Ok();
  for (bool paused = false; !paused; ++stats.passes) {
    std::vector<DirtyBitmap> dirty;
    uint64_t dirty_pages = 0;
    paused = stats.passes >= options.max_passes;
    if (paused) {
      vm.Pause();
      paused_at = Clock::now();
    }
    for (const auto& block : blocks) {
      dirty.emplace_back(block->size() / kWirePageSize);
      RETURN_IF_ERROR(vm.TakeDirty(*block, dirty.back()));
      dirty_pages += dirty.back().Count();
    }
    for (size_t b = 0; b < blocks.size(); ++b) {
      RETURN_IF_ERROR(writers[b].Write(dirty[b], /*fresh=*/false, stats));
    }
    if (!paused && dirty_pages < options.stop_below_pages) {
      // Little left: pause and take the last of it.
      stats.passes += 1;
      vm.Pause();
      paused_at = Clock::now();
      for (size_t b = 0; b < blocks.size(); ++b) {
        DirtyBitmap last(blocks[b]->size() / kWirePageSize);
        RETURN_IF_ERROR(vm.TakeDirty(*blocks[b], last));
        RETURN_IF_ERROR(writers[b].Write(last, /*fresh=*/false, stats));
      }
      paused = true;
    }
  }
  return vm.StopDirtyTracking();
}

Status WriteState(SourceVm& vm, const std::string& dir, SnapshotManifest& manifest) {
  ASSIGN_OR_RETURN(auto vcpus, vm.SaveVcpus());
  ASSIGN_OR_RETURN(auto devices, vm.SaveDevices());
  for (size_t i = 0; i < vcpus.size(); ++i) {
    ASSIGN_OR_RETURN(SnapshotBlob blob,
                     WriteBlob(dir, fmt::format("vcpu-{}.bin", i), fmt::format("{}", i), vcpus[i]));
    manifest.vcpus.push_back(std::move(blob));
  }
  for (size_t i = 0; i < devices.size(); ++i) {
    ASSIGN_OR_RETURN(SnapshotBlob blob, WriteBlob(dir, fmt::format("device-{}.bin", i),
                                                  devices[i].name, devices[i].state));
    manifest.devices.push_back(std::move(blob));
  }
  return Status::Ok();
}

}  // namespace

Result<SnapshotStats> WriteSnapshot(SourceVm& vm, const std::string& dir,
                                    const SnapshotOptions& options) {
  const auto start = Clock::now();
  std::error_code ec;
  if (fs::exists(dir, ec)) {
    return Error(
        "snapshot: {} exists already — choose a new directory (a snapshot is never "
        "written over another)",
        dir);
  }
  const std::string tmp = fmt::format("{}.tmp-{}", dir, ::getpid());
  fs::remove_all(tmp, ec);
  if (!fs::create_directory(tmp, ec)) {
    return Error("snapshot: cannot create {}: {}", tmp, ec.message());
  }
  struct Cleanup {
    const std::string& path;
    bool keep = false;
    ~Cleanup() {
      std::error_code ignored;
      if (!keep) fs::remove_all(path, ignored);
    }
  } cleanup{tmp};

  SnapshotManifest manifest;
  manifest.accelerator = vm.accelerator();
  const std::vector<std::shared_ptr<RamBlock>> blocks = vm.blocks();
  std::vector<BlockWriter> writers;
  for (size_t b = 0; b < blocks.size(); ++b) {
    const RamBlock& block = *blocks[b];
    const std::string file = fmt::format("block-{}.mem", b);
    ASSIGN_OR_RETURN(sys::UniqueFd fd, OpenFile(tmp + "/" + file, O_RDWR | O_CREAT | O_EXCL));
    if (::ftruncate(fd.get(), static_cast<off_t>(block.size())) != 0) {
      return ErrnoError(errno, "snapshot: sizing {}/{}", tmp, file);
    }
    writers.emplace_back(*blocks[b], std::move(fd), tmp + "/" + file);
    manifest.blocks.push_back(
        {block.name(), block.size(), block.page_size(), block.backing(), file, {}});
  }

  SnapshotStats stats;
  Clock::time_point paused_at{};
  Status copied = CopyMemory(vm, writers, blocks, options, stats, paused_at);
  // A failed copy leaves tracking on (a successful one stopped it).
  if (!copied.ok() && options.live) (void)vm.StopDirtyTracking();
  if (copied.ok()) copied = WriteState(vm, tmp, manifest);
  if (paused_at != Clock::time_point{}) {
    stats.pause = Since(paused_at);
    if (options.resume) vm.Resume();
  }
  RETURN_IF_ERROR(copied);

  for (size_t b = 0; b < blocks.size(); ++b) {
    RETURN_IF_ERROR(writers[b].Sync());
    ASSIGN_OR_RETURN(manifest.blocks[b].chunks, writers[b].Checksums(manifest.chunk));
    ASSIGN_OR_RETURN(DirtyBitmap data, writers[b].DataPages());
    stats.zero_pages += data.pages() - data.Count();
  }
  {
    std::ofstream out(tmp + "/manifest.json");
    out << ManifestJson(manifest).dump(1) << "\n";
    if (!out.flush()) return Error("snapshot: writing {}/manifest.json", tmp);
  }
  ASSIGN_OR_RETURN(sys::UniqueFd manifest_fd, OpenFile(tmp + "/manifest.json", O_RDONLY));
  if (::fsync(manifest_fd.get()) != 0) return ErrnoError(errno, "snapshot: syncing the manifest");
  RETURN_IF_ERROR(SyncDir(tmp));
  if (::rename(tmp.c_str(), dir.c_str()) != 0) {
    return ErrnoError(errno, "snapshot: renaming {} to {}", tmp, dir);
  }
  cleanup.keep = true;
  RETURN_IF_ERROR(SyncDir(fs::absolute(dir).parent_path().string()));
  stats.total = Since(start);
  return stats;
}

}  // namespace faultline::migration
