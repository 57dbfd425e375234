// The accelerator one run of the integration tests uses. CTest registers the
// suite once per accelerator the machine has (tests/integration/
// CMakeLists.txt), with FAULTLINE_TEST_ACCEL=kvm or tcg; run by hand without
// it, the tests use `auto`. VM configurations and CLI invocations in the
// tests take it from here, so every VM test runs on that accelerator.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "faultline/ram_block.h"
#include "src/hypervisor/hypervisor.h"

namespace faultline::itest {

inline hv::AccelChoice TestAccelChoice() {
  const char* env = std::getenv("FAULTLINE_TEST_ACCEL");
  if (env == nullptr || *env == '\0') return hv::AccelChoice::kAuto;
  Result<hv::AccelChoice> choice = hv::ParseAccel(env);
  return choice.has_value() ? *choice : hv::AccelChoice::kAuto;
}

// The accelerator the VMs of this run get (auto resolved).
inline hv::Accel TestAccel() {
  switch (TestAccelChoice()) {
    case hv::AccelChoice::kKvm:
      return hv::Accel::kKvm;
    case hv::AccelChoice::kTcg:
      return hv::Accel::kTcg;
    case hv::AccelChoice::kAuto:
      break;
  }
  return hv::ProbeAccel().accel;
}

inline bool OnKvm() { return TestAccel() == hv::Accel::kKvm; }

// The backing a hole-installer test pages: guest_memfd on KVM (the route
// made for it), memfd on the software CPU (which has no guest_memfd).
inline Backing HoleBacking() { return OnKvm() ? Backing::kGuestMemfd : Backing::kMemfd; }

// {"--accel", "tcg"}: for `faultline run`, `demo` and `bench` in CLI tests.
inline std::vector<std::string> AccelArgs() {
  return {"--accel", hv::AccelName(TestAccel())};
}

// Inserts AccelArgs() after the subcommand of a CLI invocation that starts
// a VM (run, demo, bench), unless it asks for help.
inline void AddAccelArgs(std::vector<std::string>& args) {
  if (args.empty()) return;
  const std::string& command = args.front();
  if (command != "run" && command != "demo" && command != "bench") return;
  for (const std::string& a : args) {
    if (a == "--help" || a == "--accel") return;
  }
  std::vector<std::string> accel = AccelArgs();
  args.insert(args.begin() + 1, accel.begin(), accel.end());
}

}  // namespace faultline::itest

// For a test of a KVM-only feature (guest_memfd, KVM's dirty log, #MC
// injection): it skips, saying so, on the software CPU.
#define FAULTLINE_SKIP_UNLESS_KVM(what)                                              \
  do {                                                                               \
    if (!::faultline::itest::OnKvm()) {                                            \
      GTEST_SKIP() << "needs /dev/kvm: " << (what) << " (this run is on "            \
                   << ::faultline::hv::AccelName(::faultline::itest::TestAccel()) \
                   << ")";                                                           \
    }                                                                                \
  } while (0)
