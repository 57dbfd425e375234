#include "src/paging/memory_error_trap.h"

#include <signal.h>

#include <mutex>

#include "src/hypervisor/tcg_machine.h"

namespace faultline::paging {
namespace {

struct sigaction g_previous = {};  // written once, before the handler is live

// Per thread; only ever touched by the thread itself and by the signal
// handler running on it, so plain (volatile) variables suffice.
thread_local volatile bool t_armed = false;
thread_local volatile bool t_pending = false;
thread_local volatile uintptr_t t_address = 0;
thread_local volatile int t_code = 0;

void Chain(int sig, siginfo_t* info, void* context) {
  if ((g_previous.sa_flags & SA_SIGINFO) != 0 && g_previous.sa_sigaction != nullptr) {
    g_previous.sa_sigaction(sig, info, context);
    return;
  }
  if (g_previous.sa_handler == SIG_IGN) return;
  if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != nullptr) {
    g_previous.sa_handler(sig);
    return;
  }
  // Default action: die of this signal (re-raised on return, unblocked).
  signal(sig, SIG_DFL);
}

void Handler(int sig, siginfo_t* info, void* context) {
  const auto address = reinterpret_cast<uintptr_t>(info->si_addr);
  const bool from_kvm = info->si_code == BUS_MCEERR_AR || info->si_code == BUS_MCEERR_AO;
  // The software CPU's own access to a page poisoned with UFFDIO_POISON
  // (this kernel reports those as BUS_ADRERR to user space).
  const bool from_tcg = hv::InSoftwareCpu() && info->si_code == BUS_ADRERR;
  // A repeat at the same address before the record was taken is not KVM
  // (which reports once per KVM_RUN): it is an access from this thread's
  // own code that would fault forever if we returned.
  if (!t_armed || !(from_kvm || from_tcg) || (t_pending && t_address == address)) {
    Chain(sig, info, context);
    return;
  }
  t_address = address;
  t_code = info->si_code;
  t_pending = true;
  // On the software CPU the access was the engine's own load or store,
  // which would fault again on return: leave the engine instead (KVM
  // returns from KVM_RUN with EINTR by itself).
  hv::LeaveSoftwareCpuAfterSignal();
}

}  // namespace

void MemoryErrorTrap::Install() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action = {};
    action.sa_sigaction = &Handler;
    action.sa_flags = SA_SIGINFO;  // no SA_RESTART: KVM_RUN must return EINTR
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, &g_previous);
  });
}

void MemoryErrorTrap::ArmThisThread() { t_armed = true; }

bool MemoryErrorTrap::armed() { return t_armed; }

std::optional<MemoryErrorEvent> MemoryErrorTrap::Take() {
  if (!t_pending) return std::nullopt;
  MemoryErrorEvent event{Hva(static_cast<uint64_t>(t_address)), t_code};
  t_pending = false;
  return event;
}

}  // namespace faultline::paging
