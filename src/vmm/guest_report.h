// What the test guest reported through its test port, per vCPU and overall.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "faultline/types.h"

namespace faultline {

enum class GuestPhaseKind : uint32_t {
  kFill = 1,
  kVerify = 2,
  kRandom = 3,
  kHotset = 4,
  kTouch = 5
};
const char* GuestPhaseName(uint32_t phase);

struct GuestPhase {
  uint32_t phase = 0;  // GuestPhaseKind
  uint32_t generation = 0;
  uint64_t ops = 0;  // pages written, verified or touched
  uint64_t pages_verified = 0;
  uint64_t bad_pages = 0;
  uint64_t cycles = 0;  // TSC cycles the phase took
  uint64_t max_stall_cycles = 0;
  uint64_t checksum = 0;
  std::array<uint64_t, 48> histogram{};
  uint64_t probe_ram = 0, probe_hole = 0,
           probe_bad = 0;  // see probe= in guest/abi.h  // bucket b: 2^b <= cycles per op < 2^(b+1)
};

struct GuestBadPage {
  uint32_t vcpu = 0;
  Gpa gpa;
  uint32_t expected_generation = 0;
  uint32_t word_index = 0;
  uint64_t expected_word = 0;
  uint64_t found_word = 0;
};

struct GuestVcpuReport {
  bool booted = false;  // sent its hello
  Gpa region_start, region_end;
  Gpa first_page;      // the first workload page (the ledger precedes it)
  uint64_t pages = 0;  // workload pages, from first_page on
  std::vector<GuestPhase> phases;
  bool done = false;
  uint32_t status = 0;  // from the done report: 0 = success
  uint64_t pages_verified = 0;
  uint64_t bad_pages = 0;
  uint64_t max_stall_cycles = 0;
  std::optional<uint8_t> exit_code;  // written to the exit port
  std::optional<std::string> panic;  // a CPU exception in the guest
};

struct GuestReport {
  std::vector<GuestVcpuReport> vcpus;
  std::vector<GuestBadPage> bad_pages;  // the first few per vCPU and phase
  uint32_t tsc_khz = 0;

  // Every vCPU finished, reported success and exited with code 0.
  bool success() const;
  uint64_t pages_verified() const;
  uint64_t bad_page_count() const;
  uint64_t max_stall_cycles() const;
  double CyclesToUs(uint64_t cycles) const {
    return tsc_khz ? static_cast<double>(cycles) * 1000.0 / tsc_khz : 0.0;
  }
};

// A report as it arrived, for observers (tests, progress display).
struct GuestEvent {
  enum class Kind { kHello, kPhase, kBadPage, kDone, kPanic, kExit } kind;
  uint32_t vcpu;
  const GuestPhase* phase = nullptr;       // kPhase
  const GuestBadPage* bad_page = nullptr;  // kBadPage
};

}  // namespace faultline
