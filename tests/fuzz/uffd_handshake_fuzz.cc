// libFuzzer target: the page server's handshake (Firecracker's: a JSON
// array of regions, with the userfaultfd attached), as a hostile VMM sends
// it. The first byte says how many descriptors came with it (0..2); the
// rest is the message, checked against 64 MiB of served memory. An
// accepted handshake must describe regions the server can serve safely
// (aligned, inside the memory, not overlapping) and must survive being
// encoded and parsed again.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "src/migration/uffd_handshake.h"

namespace fm = faultline::migration;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  constexpr uint64_t kMemory = 64ull << 20;
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  auto regions = fm::ParseUffdHandshake(text, data[0] % 3, kMemory);
  if (!regions) return 0;
  if (data[0] % 3 != 1 || regions->empty()) std::abort();
  std::vector<fm::UffdRegion> sorted = *regions;
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) {
    return a.base_host_virt_addr < b.base_host_virt_addr;
  });
  for (size_t i = 0; i < sorted.size(); ++i) {
    const fm::UffdRegion& r = sorted[i];
    if (r.page_size == 0 || r.size == 0 || r.size % r.page_size || r.offset % r.page_size ||
        r.base_host_virt_addr % r.page_size || r.offset > kMemory || r.size > kMemory - r.offset) {
      std::abort();
    }
    if (i > 0 && sorted[i - 1].base_host_virt_addr + sorted[i - 1].size > r.base_host_virt_addr) {
      std::abort();
    }
  }
  auto again = fm::ParseUffdHandshake(fm::EncodeUffdHandshake(*regions), 1, kMemory);
  if (!again || *again != *regions) std::abort();
  return 0;
}
