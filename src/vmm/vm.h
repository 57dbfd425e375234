// Vm: the reference VMM. A VM with 1..8 vCPUs and one RAM block, on KVM or
// the software CPU (src/hypervisor/), running the Faultline test guest;
// serial console and test port devices; kick-and-hold of every vCPU; vCPU
// state save and load.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "faultline/ram_block.h"
#include "faultline/status.h"
#include "src/hypervisor/hypervisor.h"
#include "src/hypervisor/vcpu_state.h"
#include "src/memory/guest_memory.h"
#include "src/paging/guest_pager.h"
#include "src/vmm/guest_report.h"
#include "src/vmm/serial.h"
#include "src/vmm/test_port.h"
#include "src/vmm/vcpu_set.h"

namespace faultline::vmm {

inline constexpr uint64_t kMinMemory = 64ull << 20;
inline constexpr uint64_t kMaxMemory = 16ull << 30;
inline constexpr uint32_t kMaxVcpus = 8;
inline constexpr char kRamBlockName[] = "ram0";  // the VM's one RAM block

struct VmConfig {
  std::string guest_path = FAULTLINE_DEFAULT_GUEST;
  uint64_t mem_size = 1ull << 30;  // a multiple of 2 MiB in [64 MiB, 16 GiB]
  uint32_t vcpus = 1;
  // The guest's command line without tsc_khz, which the VMM appends.
  std::string guest_args = "workload=fill,verify";
  Backing backing = Backing::kAnonymous;
  // auto: KVM when /dev/kvm opens, the software CPU otherwise.
  hv::AccelChoice accel = hv::AccelChoice::kAuto;
  // Unset: the accelerator's own (KVM: bitmap; software CPU: uffd-wp).
  std::optional<DirtyLogMode> dirty_mode;
  uint64_t memslot_granule = kDefaultMemslotGranule;
  // False: no guest is loaded and vCPUs are not initialised; memory and vCPU
  // state come from elsewhere (LoadVcpus, an incoming migration).
  bool boot = true;
  // memfd and hugetlb: map this memfd as the guest's RAM instead of creating
  // it (a local update: another process's guest memory, passed over a Unix
  // socket). The VM keeps a duplicate. Goes with boot = false.
  int ram_fd = -1;
  Serial::Sink serial;  // guest console lines; nullptr discards them
  std::function<void(const GuestEvent&)> on_event;
  // Called once if `auto` chose the software CPU, with the reason.
  std::function<void(std::string_view why)> on_accel_fallback;
};

// Checks a configuration without creating anything.
Status ValidateConfig(const VmConfig& config);

class Vm {
 public:
  static Result<std::unique_ptr<Vm>> Create(VmConfig config);
  ~Vm();

  // Demand paging: `pager` runs on the vCPU threads (its VcpuExitHandler)
  // and makes pages present before the VMM's own accesses. Before Start();
  // nullptr detaches it once the VM has stopped. `pager` must outlive the
  // VM's use of it.
  void AttachPager(paging::GuestPager* pager);
  Status Start();
  // Waits until every vCPU has finished, at most `timeout`. An error if a
  // vCPU hit an unexpected exit (with the exit and the registers), or on
  // timeout (the VM is stopped then).
  Result<GuestReport> Wait(std::chrono::milliseconds timeout);
  void Stop();

  // Kick-and-hold (VcpuSet::Hold): no vCPU runs until Resume().
  void Pause() { vcpus_->Hold(); }
  void Resume() { vcpus_->Release(); }

  // Requires Pause() (or a VM not started).
  Result<std::vector<hv::VcpuState>> SaveVcpus();
  // Before Start().
  Status LoadVcpus(const std::vector<hv::VcpuState>& states);
  // Before LoadVcpus, off the critical path: what loading would do first
  // (hv::Vcpu::PrepareForState), so that the state loads at once.
  Status PrepareVcpus();

  void SetGuestCommand(uint32_t command) { test_port_->SetCommand(command); }
  GuestReport report() const { return test_port_->Snapshot(); }

  // Guest memory access for the VMM itself (GuestMemory::Read/Write).
  Status ReadGuest(Gpa gpa, std::span<uint8_t> out) const { return memory_->Read(gpa, out); }
  Status WriteGuest(Gpa gpa, std::span<const uint8_t> data) { return memory_->Write(gpa, data); }
  // The RAM block "ram0", placed at GPA 0, as host memory (no dirty
  // tracking, no hole checks: for setting up and inspecting a stopped VM).
  std::span<uint8_t> ram() const { return {ram_->host(), config_.mem_size}; }
  const std::shared_ptr<RamBlock>& ram_block() const { return ram_; }
  GuestMemory& memory() { return *memory_; }
  // Accesses vCPUs made to holes in RAM (MMIO exits answered with all-ones).
  uint64_t hole_accesses() const { return hole_accesses_.load(std::memory_order_relaxed); }

  const VmConfig& config() const { return config_; }
  uint32_t tsc_khz() const { return machine_->tsc_khz(); }
  hv::Accel accel() const { return machine_->accel(); }
  DirtyLogMode dirty_mode() const { return memory_->dirty_mode(); }
  hv::Vm& machine() { return *machine_; }
  VcpuSet& vcpus() { return *vcpus_; }

 private:
  Vm(VmConfig config, std::unique_ptr<hv::Vm> machine);
  Status Init();
  Status Boot(uint64_t entry64);
  Result<ExitAction> HandleExit(hv::Vcpu& vcpu, hv::VcpuExit& exit);
  Result<ExitAction> HandleIo(hv::Vcpu& vcpu, hv::IoExit& io);
  Result<ExitAction> HandleMmio(hv::Vcpu& vcpu, hv::MmioExit& mmio);
  Status VcpuError(hv::Vcpu& vcpu, std::string what) const;

  VmConfig config_;
  std::unique_ptr<hv::Vm> machine_;
  std::unique_ptr<GuestMemory> memory_;
  std::shared_ptr<RamBlock> ram_;
  std::atomic<uint64_t> hole_accesses_{0};
  paging::VcpuExitHandler* exits_ = nullptr;  // set before Start()
  std::unique_ptr<VcpuSet> vcpus_;
  std::unique_ptr<Serial> serial_;
  std::unique_ptr<TestPort> test_port_;
};

// The registers of a vCPU that is not running, for error messages.
std::string FormatRegisters(const hv::Vcpu& vcpu);

// Checks that `config` asks for nothing the accelerator `accel` lacks
// (guest_memfd, KVM's dirty log); the error says what to use instead.
Status CheckAccelFeatures(const VmConfig& config, hv::Accel accel);

}  // namespace faultline::vmm
