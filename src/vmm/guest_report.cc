#include "src/vmm/guest_report.h"

#include <algorithm>

#include "guest/abi.h"

namespace faultline {

const char* GuestPhaseName(uint32_t phase) {
  switch (phase) {
    case FL_PHASE_FILL:
      return "fill";
    case FL_PHASE_VERIFY:
      return "verify";
    case FL_PHASE_RANDOM:
      return "random";
    case FL_PHASE_HOTSET:
      return "hotset";
    case FL_PHASE_TOUCH:
      return "touch";
  }
  return "?";
}

bool GuestReport::success() const {
  if (vcpus.empty()) return false;
  return std::all_of(vcpus.begin(), vcpus.end(), [](const GuestVcpuReport& v) {
    return v.done && v.status == 0 && v.bad_pages == 0 && v.exit_code == 0 && !v.panic;
  });
}

uint64_t GuestReport::pages_verified() const {
  uint64_t n = 0;
  for (const auto& v : vcpus) n += v.pages_verified;
  return n;
}

uint64_t GuestReport::bad_page_count() const {
  uint64_t n = 0;
  for (const auto& v : vcpus) n += v.bad_pages;
  return n;
}

uint64_t GuestReport::max_stall_cycles() const {
  uint64_t m = 0;
  for (const auto& v : vcpus) m = std::max(m, v.max_stall_cycles);
  return m;
}

}  // namespace faultline
