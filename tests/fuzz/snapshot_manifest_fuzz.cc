// libFuzzer target: a snapshot's manifest.json, as a damaged or hostile
// snapshot directory holds it. ParseSnapshotManifest must answer every
// input with a manifest or an error; an accepted manifest's blocks must be
// consistent enough to size files and checksums from (the reader relies on
// it): page sizes it supports, whole pages, one checksum per chunk, and
// files inside the snapshot directory.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "src/migration/snapshot.h"

namespace fm = faultline::migration;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto m = fm::ParseSnapshotManifest(std::string_view(reinterpret_cast<const char*>(data), size));
  if (!m) return 0;
  auto outside = [](const std::string& file) {
    return file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos;
  };
  if (m->chunk == 0) std::abort();
  for (const fm::SnapshotBlock& b : m->blocks) {
    if (b.page_size == 0 || b.size % b.page_size != 0) std::abort();
    if (b.chunks.size() != (b.size + m->chunk - 1) / m->chunk) std::abort();
    if (outside(b.file)) std::abort();
  }
  for (const auto* list : {&m->vcpus, &m->devices}) {
    for (const fm::SnapshotBlob& blob : *list) {
      if (outside(blob.file)) std::abort();
    }
  }
  return 0;
}
