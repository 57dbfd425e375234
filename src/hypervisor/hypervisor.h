// The VM/vCPU seam: one interface pair with two accelerators behind it, KVM
// (src/hypervisor/kvm_machine.h) and a software CPU on libunicorn
// (src/hypervisor/tcg_machine.h). The reference VMM and demand paging talk
// to a VM only through these types.
//
// A vCPU runs on its own thread until an exit. Exits are handled on that
// thread by an ExitHandler the caller passes to Run(): KVM returns from
// KVM_RUN for each exit and Run() calls the handler once; the software CPU
// calls the handler from inside the instruction that exited (its port I/O
// and unmapped-memory hooks) and keeps running. Either way, when the handler
// returns, the instruction that exited completes with the data the handler
// left in the exit (an IN's value, an MMIO read's bytes).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "faultline/status.h"
#include "faultline/types.h"
#include "src/hypervisor/vcpu_state.h"
#include "src/memory/memslot_backend.h"

namespace faultline::hv {

enum class Accel { kKvm, kTcg };
const char* AccelName(Accel accel);  // "kvm", "tcg"

// What the user asked for: --accel auto|kvm|tcg.
enum class AccelChoice { kAuto, kKvm, kTcg };
Result<AccelChoice> ParseAccel(std::string_view text);
const char* AccelChoiceName(AccelChoice choice);

// An exit the handler sees. Only the member for `kind` is meaningful.
struct IoExit {
  uint16_t port = 0;
  uint8_t size = 0;  // 1, 2 or 4 bytes per item
  bool out = false;
  uint32_t count = 1;       // items (string I/O repeats)
  uint8_t* data = nullptr;  // count * size bytes: OUT's data; IN's, filled by the handler
};

struct MmioExit {
  Gpa gpa;
  uint32_t len = 0;  // at most 8
  bool is_write = false;
  uint8_t data[8] = {};  // a write's bytes; a read's, filled by the handler
};

struct VcpuExit {
  enum class Kind {
    kIo,
    kMmio,           // an access to a guest-physical address with no RAM mapped
    kShutdown,       // triple fault
    kException,      // a CPU exception the guest could not take (software CPU)
    kHalt,           // HLT with nothing to wake the vCPU
    kDirtyRingFull,  // KVM dirty ring: drain the rings, then continue
    kFailed,         // the accelerator cannot go on: `detail` says why
  };
  Kind kind = Kind::kFailed;
  IoExit io;
  MmioExit mmio;
  uint8_t vector = 0;  // kException
  uint32_t error_code = 0;
  std::string detail;  // kFailed, kException: what the accelerator reported
};

enum class ExitAction { kContinue, kFinish };

class Vcpu;
// Handles one exit of the vCPU `vcpu` on its own thread.
using ExitHandler = std::function<Result<ExitAction>(Vcpu& vcpu, VcpuExit& exit)>;

enum class RunOutcome {
  kHandled,      // an exit was handled and the vCPU may run on
  kInterrupted,  // a kick (RequestExit) or a signal ended the run
  kFinished,     // the handler returned kFinish
};

class Vcpu {
 public:
  virtual ~Vcpu() = default;
  virtual uint32_t index() const = 0;

  // Runs the guest on the calling thread (always the same one per vCPU)
  // until the handler returns kFinish or an error, or a kick. Returns
  // kInterrupted at once if an exit was requested and not yet cleared.
  virtual Result<RunOutcome> Run(const ExitHandler& handler) = 0;
  // From any thread: makes a running Run() return kInterrupted soon, and a
  // Run() that has not started yet return at once; sticky until
  // ClearExitRequest(). The caller also sends the vCPU thread a signal, for
  // a thread blocked in the kernel. (Software CPU: a stop requested before
  // the engine entered its loop can be lost; the caller repeats it until
  // the thread reports back, see VcpuSet::Hold.)
  virtual void RequestExit() = 0;
  virtual void ClearExitRequest() = 0;
  // Before parking a vCPU whose Run() was interrupted: finishes an
  // instruction whose exit was answered (KVM completes a pending IN or MMIO
  // read on the next KVM_RUN), so that its registers are consistent.
  virtual void CompletePendingExit() = 0;

  // The vCPU must not be running (held, or never started).
  virtual Result<VcpuState> GetState() const = 0;
  virtual Status SetState(const VcpuState& state) = 0;
  // Does now what the first SetState would otherwise do before loading
  // (the software CPU maps guest memory into its engine, a few ms for
  // GiBs), so that a state arriving at a switchover loads at once.
  virtual Status PrepareForState() { return Status::Ok(); }

  // A machine check for the page at `gpa` (uncorrected, action required),
  // delivered through the guest's #MC handler. An error where the guest has
  // not enabled machine checks or the accelerator cannot inject one.
  virtual Status InjectMachineCheck(Gpa gpa) = 0;
};

// What a VM's guest-physical memory and dirty tracking can do.
struct VmCapabilities {
  bool kvm_dirty_log = false;   // KVM_GET_DIRTY_LOG / dirty rings
  bool guest_memfd = false;     // guest_memfd RAM blocks
  bool machine_checks = false;  // InjectMachineCheck can work
};

struct VmOptions {
  AccelChoice accel = AccelChoice::kAuto;
  uint32_t vcpus = 1;
  // Called once when `auto` fell back to the software CPU (for a message).
  std::function<void(std::string_view why)> on_fallback;
};

class Vm : public MemslotBackend {
 public:
  ~Vm() override = default;
  virtual Accel accel() const = 0;
  virtual const VmCapabilities& capabilities() const = 0;
  // The TSC frequency the guest is told, in kHz; RDTSC runs at this rate.
  virtual uint32_t tsc_khz() const = 0;
  // The KVM VM's fd, which guest_memfd RAM blocks are made for (-1 where
  // there is no KVM).
  virtual int kvm_vm_fd() const = 0;
  // Creates vCPU `index` (0, 1, ... in order). In dirty ring mode (KVM) its
  // ring joins the VM's dirty log.
  virtual Result<std::unique_ptr<Vcpu>> CreateVcpu(uint32_t index) = 0;
  // Initial state for vCPU `index` before boot: the accelerator's reset
  // state, with its CPUID and APIC set for that vCPU.
  virtual Result<VcpuState> ResetState(Vcpu& vcpu) = 0;
};

// Creates a VM on the accelerator `options.accel` asks for. kAuto: KVM when
// /dev/kvm opens, the software CPU otherwise. kKvm without /dev/kvm: the
// error that says why and what to do.
Result<std::unique_ptr<Vm>> CreateVm(const VmOptions& options);

// Which accelerator kAuto picks on this host, and why (for messages).
struct AccelProbe {
  Accel accel = Accel::kTcg;
  std::string why;  // when TCG: why not KVM
};
AccelProbe ProbeAccel();

}  // namespace faultline::hv
