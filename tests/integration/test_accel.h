// The accelerator one run of the integration tests uses. CTest registers the
// suite once per accelerator the machine has (tests/integration/
// CMakeLists.txt), with FAULTLINE_TEST_ACCEL=kvm or tcg; run by hand without
// it, the tests use `auto`. VM configurations and CLI invocations in the
// tests take it from here, so every VM test runs on that accelerator.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "faultline/ram_block.h"
#include "src/hypervisor/hypervisor.h"
#include "src/sys/guest_memfd.h"

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

// Guest memory for a VM test: `kvm` bytes on KVM, `tcg` on the software CPU.
// There, under the sanitizers, a vCPU writes only about 2,500 guest pages/s
// (libunicorn 2.0.1 takes its slow path, with an allocation, on every guest
// store), so the big VM tests shrink there to keep scripts/test.sh within
// its time. Every size still spans several 16 MiB memslot granules.
inline uint64_t Mem(uint64_t kvm, uint64_t tcg) { return OnKvm() ? kvm : tcg; }
// The same for a CLI --mem argument.
inline std::string MemArg(const char* kvm, const char* tcg) { return OnKvm() ? kvm : tcg; }

// Why this run cannot back a VM with guest_memfd, or nullopt when it can:
// the run is on the software CPU, or this KVM has no guest_memfd with MMAP
// and INIT_SHARED (a nested or pre-6.18 kernel). Probed once.
inline std::optional<std::string> NoGuestMemfdReason() {
  static const std::optional<std::string> reason = []() -> std::optional<std::string> {
    if (!OnKvm()) {
      return std::string("needs /dev/kvm: guest_memfd is a KVM object (this run is on ") +
             hv::AccelName(TestAccel()) + ")";
    }
    if (Status probe = sys::ProbeGuestMemfd(); !probe.ok()) {
      return "needs guest_memfd: " + probe.ToString();
    }
    return std::nullopt;
  }();
  return reason;
}
inline bool GuestMemfdUsable() { return !NoGuestMemfdReason().has_value(); }

// The backing a hole-installer test pages: guest_memfd where this run has
// it (the route made for it), memfd otherwise.
inline Backing HoleBacking() { return GuestMemfdUsable() ? Backing::kGuestMemfd : Backing::kMemfd; }

// {"--accel", "tcg"}: for `faultline run`, `demo` and `bench` in CLI tests.
inline std::vector<std::string> AccelArgs() { return {"--accel", hv::AccelName(TestAccel())}; }

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
#define FAULTLINE_SKIP_UNLESS_KVM(what)                                                   \
  do {                                                                                    \
    if (!::faultline::itest::OnKvm()) {                                                   \
      GTEST_SKIP() << "needs /dev/kvm: " << (what) << " (this run is on "                 \
                   << ::faultline::hv::AccelName(::faultline::itest::TestAccel()) << ")"; \
    }                                                                                     \
  } while (0)

// For a test of a guest_memfd-backed VM: it skips, saying why, where this
// run has no guest_memfd (see NoGuestMemfdReason).
#define FAULTLINE_SKIP_UNLESS_GUEST_MEMFD()                                        \
  do {                                                                             \
    if (auto why = ::faultline::itest::NoGuestMemfdReason()) GTEST_SKIP() << *why; \
  } while (0)
