// The userfaultfd handshake that Firecracker defined for its page-fault
// handlers (docs/page_server.md): a VMM connects to the handler's Unix
// stream socket and sends ONE message whose bytes are a JSON array, one
// object per guest memory region,
//
//   [{"base_host_virt_addr": 140737...,  // the region in the VMM's memory
//     "size": 268435456,
//     "offset": 0,                       // the region in the memory file
//     "page_size": 4096}, ...]           // older VMMs: "page_size_kib": 4
//
// with its userfaultfd attached (SCM_RIGHTS). The VMM has done UFFDIO_API
// and registered every region (MISSING). Regions lie back to back in the
// guest memory file; the page server's file is a snapshot's blocks in order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "faultline/status.h"

namespace faultline::migration {

struct UffdRegion {
  uint64_t base_host_virt_addr = 0;  // in the VMM's address space
  uint64_t size = 0;
  uint64_t offset = 0;     // in the guest memory file
  uint64_t page_size = 0;  // bytes: 4096, or 2 MiB (hugetlbfs)
  friend bool operator==(const UffdRegion&, const UffdRegion&) = default;
};

// Regions one handshake may describe (Firecracker sends a handful).
inline constexpr size_t kMaxUffdRegions = 1024;
// Bytes of the handshake message, at most.
inline constexpr size_t kMaxUffdHandshakeBytes = 256 * 1024;

// Parses and checks a handshake that came with `fds` descriptors, against
// served memory of `memory_size` bytes. Refuses, with one error that says
// which region and what to do: malformed JSON, anything but a non-empty
// array of objects with unsigned integer fields, no or two page sizes
// that disagree, a page size other than 4 KiB or 2 MiB, a zero size, a
// base, size or offset not a multiple of the page size, regions that
// overlap in the VMM's memory, a region reaching past the memory's end,
// no descriptor or more than one.
Result<std::vector<UffdRegion>> ParseUffdHandshake(std::string_view bytes, size_t fds,
                                                   uint64_t memory_size);

// The message a VMM sends (with "page_size" in bytes), for our own client.
std::string EncodeUffdHandshake(std::span<const UffdRegion> regions);

}  // namespace faultline::migration
