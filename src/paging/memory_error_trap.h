// MemoryErrorTrap: turns the SIGBUS that KVM sends a vCPU thread touching a
// poisoned page (BUS_MCEERR_AR, si_addr = the host address) into a record
// the thread picks up once KVM_RUN has returned EINTR, instead of killing
// the process. On the software CPU the SIGBUS (BUS_ADRERR) comes from the
// engine's own access, and the handler leaves the engine (its run returns
// interrupted) instead of returning into the faulting access.
//
// Only armed threads (vCPU threads) are handled; any other SIGBUS, and a
// second SIGBUS at the same address before the first was taken (a plain
// memory access re-faulting, not KVM), goes to the handler that was there
// before (by default: the process dies, as it should for a real bug).
#pragma once

#include <cstdint>
#include <optional>

#include "faultline/types.h"

namespace faultline::paging {

struct MemoryErrorEvent {
  Hva hva;       // the host address KVM reported
  int code = 0;  // si_code: BUS_MCEERR_AR from KVM
};

class MemoryErrorTrap {
 public:
  // Installs the process-wide SIGBUS handler (once; later calls do nothing).
  static void Install();
  // Marks the calling thread as a vCPU thread whose memory errors are
  // recorded rather than fatal.
  static void ArmThisThread();
  static bool armed();
  // The calling thread's pending memory error, which is then cleared.
  static std::optional<MemoryErrorEvent> Take();
};

}  // namespace faultline::paging
