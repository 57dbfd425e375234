// Reading a snapshot back: the manifest and its checks, eager loading, and
// what a lazy restore needs (the data pages and a page source over the
// files).
#include <fcntl.h>
#include <sys/stat.h>

#include <fstream>
#include <iterator>

#include <nlohmann/json.hpp>

#include "src/migration/snapshot.h"
#include "src/migration/snapshot_files.h"

namespace faultline::migration {
namespace {

Result<uint64_t> FileSize(const std::string& path) {
  struct stat st = {};
  if (::stat(path.c_str(), &st) != 0) return ErrnoError(errno, "snapshot: {}", path);
  return static_cast<uint64_t>(st.st_size);
}

// A file the manifest names must be one in the snapshot directory: a
// hostile manifest must not make a restore read elsewhere.
Status CheckFileName(const std::string& file) {
  if (file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos ||
      file.find('\0') != std::string::npos) {
    return Error(
        "the manifest names file '{}', which is not a file of the snapshot directory: "
        "the manifest is damaged",
        file);
  }
  return Status::Ok();
}

// `j[key]`, an unsigned integer no larger than `max` (nlohmann's get<>
// would convert a float or a negative number without a word).
Result<uint64_t> Unsigned(const nlohmann::json& j, const char* key, uint64_t max = UINT64_MAX) {
  const nlohmann::json& v = j.at(key);
  if (!v.is_number_unsigned() || v.get<uint64_t>() > max) {
    return Error("\"{}\" is {}, not an unsigned integer up to {}: the manifest is damaged", key,
                 v.dump(), max);
  }
  return v.get<uint64_t>();
}

Result<SnapshotManifest> ParseManifest(const nlohmann::json& j) {
  if (!j.is_object() || j.value("format", "") != "faultline-snapshot") {
    return Error("not a Faultline snapshot (no \"format\": \"faultline-snapshot\")");
  }
  SnapshotManifest m;
  ASSIGN_OR_RETURN(const uint64_t version, Unsigned(j, "version", UINT32_MAX));
  m.version = static_cast<uint32_t>(version);
  if (m.version != kSnapshotVersion) {
    return Error(
        "snapshot format version {}; this Faultline reads version {} — restore it with "
        "the Faultline that wrote it",
        m.version, kSnapshotVersion);
  }
  ASSIGN_OR_RETURN(const uint64_t accelerator, Unsigned(j, "accelerator", UINT8_MAX));
  m.accelerator = static_cast<HelloAccel>(accelerator);
  ASSIGN_OR_RETURN(m.chunk, Unsigned(j, "chunk"));
  // Verify() reads a chunk at a time into one buffer: bounded.
  if (m.chunk == 0 || m.chunk % kWirePageSize != 0 || m.chunk > (1ull << 30)) {
    return Error("bad chunk size {}: the manifest is damaged", m.chunk);
  }
  for (const auto& b : j.at("blocks")) {
    SnapshotBlock block;
    block.name = b.at("name").get<std::string>();
    ASSIGN_OR_RETURN(block.size, Unsigned(b, "size"));
    ASSIGN_OR_RETURN(block.page_size, Unsigned(b, "page_size"));
    ASSIGN_OR_RETURN(block.backing, ParseBacking(b.at("backing").get<std::string>()));
    block.file = b.at("file").get<std::string>();
    block.chunks = b.at("chunks").get<std::vector<std::string>>();
    RETURN_IF_ERROR(CheckFileName(block.file));
    if (block.page_size != kPageSize && block.page_size != kHugePageSize) {
      return Error("block '{}': page size {} (4096 or 2097152 expected): the manifest is damaged",
                   block.name, block.page_size);
    }
    if (block.size == 0 || block.size % block.page_size != 0 || block.size > (uint64_t{1} << 52) ||
        block.chunks.size() != (block.size + m.chunk - 1) / m.chunk) {
      return Error(
          "block '{}': the manifest says {} bytes but holds {} chunk checksums: the manifest is "
          "damaged",
          block.name, block.size, block.chunks.size());
    }
    m.blocks.push_back(std::move(block));
  }
  auto blobs = [](const nlohmann::json& list) -> Result<std::vector<SnapshotBlob>> {
    std::vector<SnapshotBlob> out;
    for (const auto& b : list) {
      ASSIGN_OR_RETURN(const uint64_t size, Unsigned(b, "size"));
      out.push_back({b.at("name").get<std::string>(), b.at("file").get<std::string>(), size,
                     b.at("sha256").get<std::string>()});
    }
    return out;
  };
  ASSIGN_OR_RETURN(m.vcpus, blobs(j.at("vcpus")));
  ASSIGN_OR_RETURN(m.devices, blobs(j.at("devices")));
  for (const auto* list : {&m.vcpus, &m.devices}) {
    for (const SnapshotBlob& blob : *list) RETURN_IF_ERROR(CheckFileName(blob.file));
  }
  return m;
}

}  // namespace

Result<SnapshotManifest> ParseSnapshotManifest(std::string_view text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Error("not valid JSON");
  try {
    return ParseManifest(j);
  } catch (const nlohmann::json::exception& e) {
    return Error("{}", e.what());
  }
}

Result<SnapshotReader> SnapshotReader::Open(const std::string& dir) {
  const std::string path = dir + "/manifest.json";
  std::ifstream in(path);
  if (!in) {
    return Error("{}: no snapshot manifest (not a snapshot directory, or an incomplete one)", path);
  }
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Result<SnapshotManifest> manifest = ParseSnapshotManifest(text);
  if (!manifest) return manifest.error().WithContext(path);
  SnapshotReader reader(dir, std::move(*manifest));
  // Every file there, with the size the manifest says.
  for (const SnapshotBlock& b : reader.manifest_.blocks) {
    ASSIGN_OR_RETURN(uint64_t size, FileSize(reader.Path(b.file)));
    if (size != b.size) {
      return Error(
          "snapshot: {} is {} bytes, block '{}' has {}: the file is truncated or "
          "damaged",
          reader.Path(b.file), size, b.name, b.size);
    }
  }
  for (const auto* list : {&reader.manifest_.vcpus, &reader.manifest_.devices}) {
    for (const SnapshotBlob& blob : *list) {
      ASSIGN_OR_RETURN(uint64_t size, FileSize(reader.Path(blob.file)));
      if (size != blob.size) {
        return Error("snapshot: {} is {} bytes, the manifest says {}: truncated or damaged",
                     reader.Path(blob.file), size, blob.size);
      }
    }
  }
  return reader;
}

Status SnapshotReader::CheckBlocks(std::span<const std::shared_ptr<RamBlock>> blocks) const {
  if (blocks.size() != manifest_.blocks.size()) {
    return Error("the snapshot has {} RAM blocks, this VM {}", manifest_.blocks.size(),
                 blocks.size());
  }
  for (size_t b = 0; b < blocks.size(); ++b) {
    const SnapshotBlock& s = manifest_.blocks[b];
    const RamBlock& r = *blocks[b];
    if (s.name != r.name() || s.size != r.size() || s.page_size != r.page_size()) {
      return Error(
          "block {}: the snapshot's is '{}' ({} bytes, {} KiB pages), this VM's '{}' "
          "({} bytes, {} KiB pages) — restore into a VM of the snapshot's layout",
          b, s.name, s.size, s.page_size >> 10, r.name(), r.size(), r.page_size() >> 10);
    }
  }
  return Status::Ok();
}

Status SnapshotReader::Verify() const {
  std::vector<uint8_t> buffer(manifest_.chunk);
  for (const SnapshotBlock& b : manifest_.blocks) {
    ASSIGN_OR_RETURN(sys::UniqueFd fd, OpenFile(Path(b.file), O_RDONLY));
    for (size_t c = 0; c < b.chunks.size(); ++c) {
      const uint64_t offset = c * manifest_.chunk;
      const uint64_t n = std::min(manifest_.chunk, b.size - offset);
      RETURN_IF_ERROR(ReadAll(fd.get(), buffer.data(), n, offset, Path(b.file)));
      if (Sha256(std::span(buffer).first(n)) != b.chunks[c]) {
        return Error(
            "snapshot: block '{}' bytes [{:#x}, +{:#x}) in {} do not match their "
            "checksum: the file is damaged",
            b.name, offset, n, Path(b.file));
      }
    }
  }
  RETURN_IF_ERROR(ReadVcpus().status());
  return ReadDevices().status();
}

Status SnapshotReader::LoadMemory(std::span<const std::shared_ptr<RamBlock>> blocks) const {
  RETURN_IF_ERROR(CheckBlocks(blocks));
  for (size_t b = 0; b < blocks.size(); ++b) {
    const std::string path = Path(manifest_.blocks[b].file);
    ASSIGN_OR_RETURN(sys::UniqueFd fd, OpenFile(path, O_RDONLY));
    ASSIGN_OR_RETURN(DirtyBitmap data, FileDataPages(fd.get(), blocks[b]->size(), path));
    Status status;
    data.ForEachRun([&](uint64_t first, uint64_t count) {
      if (!status.ok()) return;
      status = ReadAll(fd.get(), blocks[b]->host() + first * kWirePageSize, count * kWirePageSize,
                       first * kWirePageSize, path);
    });
    RETURN_IF_ERROR(status);
  }
  return Status::Ok();
}

Result<std::vector<uint8_t>> SnapshotReader::ReadBlob(const SnapshotBlob& blob) const {
  ASSIGN_OR_RETURN(sys::UniqueFd fd, OpenFile(Path(blob.file), O_RDONLY));
  std::vector<uint8_t> bytes(blob.size);
  RETURN_IF_ERROR(ReadAll(fd.get(), bytes.data(), bytes.size(), 0, Path(blob.file)));
  if (Sha256(bytes) != blob.sha256) {
    return Error("snapshot: {} does not match its checksum: the file is damaged", Path(blob.file));
  }
  return bytes;
}

Result<std::vector<std::vector<uint8_t>>> SnapshotReader::ReadVcpus() const {
  std::vector<std::vector<uint8_t>> out;
  for (const SnapshotBlob& blob : manifest_.vcpus) {
    ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, ReadBlob(blob));
    out.push_back(std::move(bytes));
  }
  return out;
}

Result<std::vector<DeviceBlob>> SnapshotReader::ReadDevices() const {
  std::vector<DeviceBlob> out;
  for (const SnapshotBlob& blob : manifest_.devices) {
    ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, ReadBlob(blob));
    out.push_back({blob.name, std::move(bytes)});
  }
  return out;
}

Result<std::vector<DirtyBitmap>> SnapshotReader::DataPages() const {
  std::vector<DirtyBitmap> out;
  for (const SnapshotBlock& b : manifest_.blocks) {
    ASSIGN_OR_RETURN(sys::UniqueFd fd, OpenFile(Path(b.file), O_RDONLY));
    ASSIGN_OR_RETURN(DirtyBitmap data, FileDataPages(fd.get(), b.size, Path(b.file)));
    out.push_back(std::move(data));
  }
  return out;
}

Result<std::shared_ptr<paging::SnapshotPageSource>> SnapshotReader::MakePageSource() const {
  auto source = std::make_shared<paging::SnapshotPageSource>();
  for (uint32_t b = 0; b < manifest_.blocks.size(); ++b) {
    const SnapshotBlock& block = manifest_.blocks[b];
    ASSIGN_OR_RETURN(sys::UniqueFd fd, OpenFile(Path(block.file), O_RDONLY));
    const uint32_t id = source->AddFile(block.name, std::move(fd), 0, block.size);
    if (id != b) return Error("snapshot page source: block {} got id {}", b, id);
  }
  return source;
}

namespace {

// What both restores check before anything is loaded.
Status CheckVm(const SnapshotReader& snapshot, DestinationVm& vm) {
  RETURN_IF_ERROR(snapshot.CheckBlocks(vm.blocks()));
  const SnapshotManifest& m = snapshot.manifest();
  if (m.vcpus.size() != vm.vcpu_count()) {
    return Error("the snapshot has {} vCPUs, this VM {} — restore with --vcpus {}", m.vcpus.size(),
                 vm.vcpu_count(), m.vcpus.size());
  }
  if (m.accelerator != HelloAccel::kUnspecified && vm.accelerator() != HelloAccel::kUnspecified &&
      m.accelerator != vm.accelerator()) {
    return Error(
        "the snapshot's vCPU state is {}'s, this VM runs on {} — restore with the same "
        "accelerator",
        HelloAccelName(m.accelerator), HelloAccelName(vm.accelerator()));
  }
  if (!vm.memory_is_zero()) return Error("restore: the VM's memory must be fresh (zero)");
  return Status::Ok();
}

// The continue installer maps present pages from the page cache, so a zero
// page it is told is present must be there: on memfd, fallocate puts zeroed
// pages in, in bulk. (On hugetlb the destination allocates the whole file
// already; anonymous memory and holes read as zero as they are.)
Status PopulateZeroPages(PostcopyDestinationVm& vm, std::span<const DirtyBitmap> present) {
  if (vm.installer() != paging::InstallerKind::kContinue) return Status::Ok();
  const std::vector<std::shared_ptr<RamBlock>> blocks = vm.blocks();
  for (size_t b = 0; b < blocks.size(); ++b) {
    if (blocks[b]->backing() != Backing::kMemfd) continue;
    Status status;
    present[b].ForEachRun([&](uint64_t first, uint64_t count) {
      if (status.ok() && ::fallocate(blocks[b]->fd(), 0, static_cast<off_t>(first * kWirePageSize),
                                     static_cast<off_t>(count * kWirePageSize)) != 0) {
        status = ErrnoError(errno, "lazy restore: allocating the zero pages of block '{}'",
                            blocks[b]->name());
      }
    });
    RETURN_IF_ERROR(status);
  }
  return Status::Ok();
}

}  // namespace

Status RestoreEager(const SnapshotReader& snapshot, DestinationVm& vm) {
  RETURN_IF_ERROR(CheckVm(snapshot, vm));
  RETURN_IF_ERROR(snapshot.Verify());
  ASSIGN_OR_RETURN(auto vcpus, snapshot.ReadVcpus());
  ASSIGN_OR_RETURN(auto devices, snapshot.ReadDevices());
  RETURN_IF_ERROR(snapshot.LoadMemory(vm.blocks()));
  RETURN_IF_ERROR(vm.LoadVcpus(vcpus));
  return vm.LoadDevices(devices);
}

Status RestoreState(const SnapshotReader& snapshot, DestinationVm& vm) {
  RETURN_IF_ERROR(CheckVm(snapshot, vm));
  ASSIGN_OR_RETURN(auto vcpus, snapshot.ReadVcpus());
  ASSIGN_OR_RETURN(auto devices, snapshot.ReadDevices());
  RETURN_IF_ERROR(vm.LoadVcpus(vcpus));
  return vm.LoadDevices(devices);
}

Status StartLazyRestore(const SnapshotReader& snapshot, PostcopyDestinationVm& vm) {
  RETURN_IF_ERROR(CheckVm(snapshot, vm));
  RETURN_IF_ERROR(vm.CheckPaging());
  ASSIGN_OR_RETURN(auto vcpus, snapshot.ReadVcpus());
  ASSIGN_OR_RETURN(auto devices, snapshot.ReadDevices());
  ASSIGN_OR_RETURN(std::vector<DirtyBitmap> present, snapshot.DataPages());
  // Holes read as zero in fresh memory: present from the start.
  for (DirtyBitmap& p : present) {
    DirtyBitmap zero(p.pages());
    zero.SetAll();
    p.ForEachRun([&](uint64_t first, uint64_t count) { zero.ClearRange(first, count); });
    p = std::move(zero);
  }
  RETURN_IF_ERROR(PopulateZeroPages(vm, present));
  ASSIGN_OR_RETURN(auto source, snapshot.MakePageSource());
  return vm.StartPostcopy(std::move(source), present, vcpus, devices);
}

}  // namespace faultline::migration
