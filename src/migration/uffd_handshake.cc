#include "src/migration/uffd_handshake.h"

#include <algorithm>
#include <optional>

#include <nlohmann/json.hpp>

#include "faultline/types.h"

namespace faultline::migration {
namespace {

using nlohmann::json;

// A field of region `i`: an unsigned integer, or absent (nullopt).
Result<std::optional<uint64_t>> Field(const json& region, size_t i, const char* name) {
  auto it = region.find(name);
  if (it == region.end()) return std::optional<uint64_t>{};
  if (!it->is_number_unsigned() && !(it->is_number_integer() && it->get<int64_t>() >= 0)) {
    return Error("uffd handshake: region {}: \"{}\" is {}, not an unsigned integer", i, name,
                 it->dump());
  }
  return std::optional<uint64_t>(it->get<uint64_t>());
}

Result<uint64_t> Required(const json& region, size_t i, const char* name) {
  ASSIGN_OR_RETURN(std::optional<uint64_t> v, Field(region, i, name));
  if (!v) return Error("uffd handshake: region {} has no \"{}\"", i, name);
  return *v;
}

// "page_size" (bytes) or the older "page_size_kib"; both must agree.
Result<uint64_t> PageSize(const json& region, size_t i) {
  ASSIGN_OR_RETURN(std::optional<uint64_t> bytes, Field(region, i, "page_size"));
  ASSIGN_OR_RETURN(std::optional<uint64_t> kib, Field(region, i, "page_size_kib"));
  if (!bytes && !kib) {
    return Error("uffd handshake: region {} has neither \"page_size\" nor \"page_size_kib\"", i);
  }
  if (kib && *kib > (~uint64_t{0} >> 10)) {
    return Error("uffd handshake: region {}: page_size_kib {} is too large", i, *kib);
  }
  if (bytes && kib && *bytes != *kib * 1024) {
    return Error("uffd handshake: region {}: page_size {} and page_size_kib {} disagree", i, *bytes,
                 *kib);
  }
  const uint64_t size = bytes ? *bytes : *kib * 1024;
  if (size != kPageSize && size != kHugePageSize) {
    return Error(
        "uffd handshake: region {}: page size {} bytes is not served (4096 for anonymous "
        "memory, 2097152 for 2 MiB hugetlbfs pages)",
        i, size);
  }
  return size;
}

Result<UffdRegion> ParseRegion(const json& region, size_t i, uint64_t memory_size) {
  if (!region.is_object()) return Error("uffd handshake: region {} is not a JSON object", i);
  UffdRegion r;
  ASSIGN_OR_RETURN(r.base_host_virt_addr, Required(region, i, "base_host_virt_addr"));
  ASSIGN_OR_RETURN(r.size, Required(region, i, "size"));
  ASSIGN_OR_RETURN(r.offset, Required(region, i, "offset"));
  ASSIGN_OR_RETURN(r.page_size, PageSize(region, i));
  if (r.size == 0) return Error("uffd handshake: region {} has size 0", i);
  if (r.base_host_virt_addr % r.page_size != 0 || r.size % r.page_size != 0 ||
      r.offset % r.page_size != 0) {
    return Error(
        "uffd handshake: region {} (base {:#x}, size {:#x}, offset {:#x}) is not aligned to its "
        "page size {:#x}",
        i, r.base_host_virt_addr, r.size, r.offset, r.page_size);
  }
  if (r.base_host_virt_addr + r.size < r.base_host_virt_addr) {
    return Error(
        "uffd handshake: region {} (base {:#x}, size {:#x}) wraps around the address "
        "space",
        i, r.base_host_virt_addr, r.size);
  }
  if (r.offset > memory_size || r.size > memory_size - r.offset) {
    return Error(
        "uffd handshake: region {} (offset {:#x}, size {:#x}) reaches past the end of the served "
        "memory ({:#x} bytes): restore from the snapshot this server serves",
        i, r.offset, r.size, memory_size);
  }
  return r;
}

Status CheckOverlaps(const std::vector<UffdRegion>& regions) {
  std::vector<size_t> order(regions.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return regions[a].base_host_virt_addr < regions[b].base_host_virt_addr;
  });
  for (size_t k = 1; k < order.size(); ++k) {
    const UffdRegion& prev = regions[order[k - 1]];
    const UffdRegion& next = regions[order[k]];
    if (prev.base_host_virt_addr + prev.size > next.base_host_virt_addr) {
      return Error(
          "uffd handshake: regions {} and {} overlap in the VMM's memory ({:#x} + {:#x} "
          "> {:#x})",
          order[k - 1], order[k], prev.base_host_virt_addr, prev.size, next.base_host_virt_addr);
    }
  }
  return Status::Ok();
}

}  // namespace

Result<std::vector<UffdRegion>> ParseUffdHandshake(std::string_view bytes, size_t fds,
                                                   uint64_t memory_size) {
  if (fds == 0) {
    return Error(
        "uffd handshake: no userfaultfd came with the message (send it as SCM_RIGHTS "
        "with the JSON)");
  }
  if (fds > 1) {
    return Error(
        "uffd handshake: {} descriptors came with the message; send exactly one "
        "userfaultfd",
        fds);
  }
  const json doc = json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) {
    return Error("uffd handshake: the message ({} bytes) is not valid JSON", bytes.size());
  }
  if (!doc.is_array() || doc.empty()) {
    return Error("uffd handshake: expected a non-empty JSON array of regions, got {}",
                 doc.is_array() ? "[]" : doc.type_name());
  }
  if (doc.size() > kMaxUffdRegions) {
    return Error("uffd handshake: {} regions, at most {}", doc.size(), kMaxUffdRegions);
  }
  std::vector<UffdRegion> regions;
  for (size_t i = 0; i < doc.size(); ++i) {
    ASSIGN_OR_RETURN(UffdRegion r, ParseRegion(doc[i], i, memory_size));
    regions.push_back(r);
  }
  RETURN_IF_ERROR(CheckOverlaps(regions));
  return regions;
}

std::string EncodeUffdHandshake(std::span<const UffdRegion> regions) {
  json doc = json::array();
  for (const UffdRegion& r : regions) {
    doc.push_back({{"base_host_virt_addr", r.base_host_virt_addr},
                   {"size", r.size},
                   {"offset", r.offset},
                   {"page_size", r.page_size}});
  }
  return doc.dump();
}

}  // namespace faultline::migration
