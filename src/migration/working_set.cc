#include "src/migration/working_set.h"

#include <fcntl.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <thread>

#include <fmt/format.h>

#include "src/migration/snapshot_files.h"
#include "src/migration/wire.h"

namespace faultline::migration {

namespace {
constexpr char kHeader[] = "# faultline working set v1";
// Bytes claimed at once: a claim may wait for staging pages, which only
// completions free, so a prefetch claims a little and fills it before more.
constexpr uint64_t kClaimBytes = 256ull << 10;
}  // namespace

std::vector<uint64_t> BlockBases(const SnapshotManifest& manifest) {
  std::vector<uint64_t> bases;
  uint64_t at = 0;
  for (const SnapshotBlock& b : manifest.blocks) {
    bases.push_back(at);
    at += b.size;
  }
  return bases;
}

void WorkingSetRecorder::Record(uint32_t block, uint64_t offset, uint64_t length) {
  if (block >= bases_.size()) return;
  const uint64_t at = bases_[block] + offset;
  sys::MutexLock lock(mu_);
  bytes_ += length;
  if (!ranges_.empty() && ranges_.back().offset + ranges_.back().length == at) {
    ranges_.back().length += length;
  } else {
    ranges_.push_back({at, length});
  }
}

std::vector<MemoryRange> WorkingSetRecorder::ranges() const {
  sys::MutexLock lock(mu_);
  return ranges_;
}

uint64_t WorkingSetRecorder::bytes() const {
  sys::MutexLock lock(mu_);
  return bytes_;
}

Status SaveWorkingSet(const std::string& path, std::span<const MemoryRange> ranges) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (!out) return ErrnoError(errno, "working set: cannot create {}", tmp);
    out << kHeader << "\n";
    for (const MemoryRange& r : ranges) out << r.offset << ' ' << r.length << '\n';
    out.flush();
    if (!out) return ErrnoError(errno, "working set: writing {}", tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return ErrnoError(errno, "working set: renaming {} to {}", tmp, path);
  }
  return Status::Ok();
}

namespace {

// One "OFFSET LENGTH" line without its comment; false if it is not one.
// Numbers are decimal or 0x hexadecimal.
bool ParseRange(const std::string& text, MemoryRange& r, bool& blank) {
  const char* p = text.c_str();
  while (*p == ' ' || *p == '\t') ++p;
  blank = *p == '\0';
  if (blank) return true;
  char* end = nullptr;
  r.offset = std::strtoull(p, &end, 0);
  if (end == p) return false;
  p = end;
  r.length = std::strtoull(p, &end, 0);
  if (end == p) return false;
  for (p = end; *p == ' ' || *p == '\t' || *p == '\r'; ++p) {
  }
  return *p == '\0';
}

}  // namespace

Result<std::vector<MemoryRange>> LoadWorkingSet(const std::string& path, uint64_t memory_size) {
  std::ifstream in(path);
  if (!in) return ErrnoError(errno, "working set: cannot open {}", path);
  std::vector<MemoryRange> out;
  std::string line;
  for (uint64_t number = 1; std::getline(in, line); ++number) {
    if (line.starts_with("# faultline working set v") && line != kHeader) {
      return Error("working set {}: line {} says \"{}\"; this Faultline reads \"{}\"", path, number,
                   line, kHeader);
    }
    MemoryRange r;
    bool blank = false;
    if (!ParseRange(line.substr(0, line.find('#')), r, blank)) {
      return Error("working set {}: line {} is not \"OFFSET LENGTH\" in bytes: '{}'", path, number,
                   line);
    }
    if (blank) continue;
    if (r.length == 0 || r.offset % kWirePageSize != 0 || r.length % kWirePageSize != 0 ||
        r.offset > memory_size || r.length > memory_size - r.offset) {
      return Error(
          "working set {}: line {}: {:#x} bytes at {:#x} is not a page-aligned range of the "
          "snapshot's {:#x} bytes of memory — was it recorded from another snapshot?",
          path, number, r.length, r.offset, memory_size);
    }
    out.push_back(r);
  }
  return out;
}

namespace {

// Fills `slots` (claimed in offset order) from the block's file, one
// preadv per run of adjacent slots, and completes them.
void FillSlots(int fd, const std::string& path, std::vector<paging::PushSlot>& slots) {
  for (size_t i = 0; i < slots.size();) {
    size_t j = i + 1;
    while (j < slots.size() && slots[j].offset == slots[j - 1].offset + slots[j - 1].dest.size()) {
      ++j;
    }
    std::vector<std::span<uint8_t>> dests;
    for (size_t k = i; k < j; ++k) dests.push_back(slots[k].dest);
    const Status read = ReadScattered(fd, dests, slots[i].offset, path);
    for (size_t k = i; k < j; ++k) {
      slots[k].done(read.ok() ? paging::FetchResult::Filled() : paging::FetchResult::Failed(read));
    }
    i = j;
  }
}

// Claims and fills block `block`'s bytes [offset, offset + length).
void PrefetchInBlock(int fd, const std::string& path, paging::PushTarget& target, uint32_t block,
                     uint64_t offset, uint64_t length, PrefetchStats& stats) {
  for (uint64_t at = offset; at < offset + length; at += kClaimBytes) {
    const uint64_t n = std::min(kClaimBytes, offset + length - at);
    std::vector<paging::PushSlot> slots = target.Claim(block, at, n);
    for (const paging::PushSlot& slot : slots) {
      ++stats.units;
      stats.bytes += slot.dest.size();
    }
    FillSlots(fd, path, slots);
  }
}

// Starts the kernel reading the ranges' file extents, in order, before the
// prefetch reads them one by one: from a cold page cache, one synchronous
// read per scattered page would wait for the disk each time. Ranges of a
// block closer than kReadaheadGap are read as one extent.
constexpr uint64_t kReadaheadGap = 128ull << 10;

void StartReadahead(std::span<const MemoryRange> ranges, const std::vector<uint64_t>& bases,
                    const std::vector<SnapshotBlock>& blocks,
                    const std::vector<sys::UniqueFd>& files) {
  struct Extent {
    uint32_t block = UINT32_MAX;
    uint64_t begin = 0, end = 0;
  } open;
  auto flush = [&] {
    if (open.block != UINT32_MAX)
      AdviseWillNeed(files[open.block].get(), open.begin, open.end - open.begin);
  };
  for (const MemoryRange& r : ranges) {
    for (uint32_t b = 0; b < blocks.size(); ++b) {
      const uint64_t begin = std::max(r.offset, bases[b]);
      const uint64_t end = std::min(r.offset + r.length, bases[b] + blocks[b].size);
      if (begin >= end) continue;
      const uint64_t lo = begin - bases[b], hi = end - bases[b];
      if (b == open.block && lo >= open.begin && lo <= open.end + kReadaheadGap) {
        open.end = std::max(open.end, hi);
        continue;
      }
      flush();
      open = {b, lo, hi};
    }
  }
  flush();
}

}  // namespace

Result<PrefetchStats> Prefetch(const SnapshotReader& snapshot, PostcopyDestinationVm& vm,
                               std::span<const MemoryRange> ranges, const std::atomic<bool>& stop,
                               uint32_t threads) {
  paging::PushTarget* target = vm.push_target();
  if (target == nullptr) {
    return Error("prefetch: the {} installer takes no pushed pages; use copy, move or continue",
                 paging::InstallerName(vm.installer()));
  }
  const std::vector<SnapshotBlock>& blocks = snapshot.manifest().blocks;
  std::vector<sys::UniqueFd> files;
  for (const SnapshotBlock& b : blocks) {
    ASSIGN_OR_RETURN(sys::UniqueFd fd, OpenFile(snapshot.dir() + "/" + b.file, O_RDONLY));
    files.push_back(std::move(fd));
  }
  const std::vector<uint64_t> bases = BlockBases(snapshot.manifest());
  // Beside the workers: on a warm page cache the hints only cost time.
  std::thread readahead([&] { StartReadahead(ranges, bases, blocks, files); });
  // Worker k takes ranges k, k + n, k + 2n...: all of them go in order.
  const uint32_t n = std::max<uint32_t>(1, threads);
  std::vector<PrefetchStats> stats(n);
  auto work = [&](uint32_t k) {
    for (size_t i = k; i < ranges.size() && !stop.load(std::memory_order_relaxed); i += n) {
      const MemoryRange& r = ranges[i];
      for (uint32_t b = 0; b < blocks.size(); ++b) {
        const uint64_t begin = std::max(r.offset, bases[b]);
        const uint64_t end = std::min(r.offset + r.length, bases[b] + blocks[b].size);
        if (begin < end) {
          PrefetchInBlock(files[b].get(), blocks[b].file, *target, b, begin - bases[b], end - begin,
                          stats[k]);
        }
      }
    }
  };
  std::vector<std::thread> workers;
  for (uint32_t k = 1; k < n; ++k) workers.emplace_back(work, k);
  work(0);
  for (std::thread& t : workers) t.join();
  readahead.join();
  PrefetchStats total;
  for (const PrefetchStats& s : stats) {
    total.units += s.units;
    total.bytes += s.bytes;
  }
  return total;
}

}  // namespace faultline::migration
