// VcpuSet: one thread per vCPU running KVM_RUN, and kick-and-hold: a way to
// bring every vCPU out of KVM_RUN and keep it out until released, used by
// layout changes, state capture and switchover.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "faultline/status.h"
#include "src/memory/guest_memory.h"
#include "src/sys/kvm.h"

namespace faultline::vmm {

enum class ExitAction { kContinue, kFinish };

// Handles one exit of vCPU `index` (run->exit_reason is set). Runs on that
// vCPU's thread.
using ExitHandler = std::function<Result<ExitAction>(uint32_t index, sys::KvmVcpu& vcpu)>;

class VcpuSet : public VcpuPauser {
 public:
  explicit VcpuSet(std::vector<sys::KvmVcpu> vcpus);
  ~VcpuSet() override;  // stops and joins every thread
  VcpuSet(const VcpuSet&) = delete;
  VcpuSet& operator=(const VcpuSet&) = delete;

  uint32_t size() const { return static_cast<uint32_t>(vcpus_.size()); }
  sys::KvmVcpu& vcpu(uint32_t index) { return vcpus_[index]; }

  // Starts the threads. If Hold() was called before, they start held.
  Status Start(ExitHandler handler);
  // Optional, before Start(), each run on the vCPU's own thread: `started`
  // before its first KVM_RUN; `interrupted` whenever KVM_RUN returned EINTR
  // (a kick, or a signal such as the SIGBUS KVM sends for a poisoned page),
  // before the thread parks or runs again. kvm_run's exit_reason is stale then.
  void SetThreadHooks(std::function<void(uint32_t index)> started, ExitHandler interrupted);

  // Kick-and-hold: returns once no vCPU is inside KVM_RUN and none will enter
  // it until Release(). A held vCPU has completed any pending I/O, so its
  // registers are consistent. Holds nest (a counter).
  void Hold() override;
  void Release() override;

  // Asks every thread to end (after its current exit) and wakes held ones.
  void Stop();
  // Waits until every thread has ended, at most `timeout`. False on timeout.
  bool WaitFinished(std::chrono::milliseconds timeout);
  void Join();

  // The first error any vCPU thread ended with (OK if none).
  Status first_error() const;
  bool started() const { return !threads_.empty(); }

 private:
  void ThreadMain(uint32_t index);
  void KickAllLocked();

  std::vector<sys::KvmVcpu> vcpus_;
  std::vector<std::thread> threads_;
  ExitHandler handler_;
  std::function<void(uint32_t)> started_hook_;  // set before Start()
  ExitHandler interrupted_hook_;                // set before Start()

  mutable std::mutex mu_;
  std::condition_variable cv_;
  // All guarded by mu_. Invariant: a thread clears its kvm_run's
  // immediate_exit only while holding mu_ and seeing holds_ == 0 && !stop_;
  // Hold() and Stop() set immediate_exit (and signal) while holding mu_. So
  // once Hold() has set holds_, no thread can enter KVM_RUN without seeing
  // immediate_exit = 1 and coming straight back out.
  int holds_ = 0;
  bool stop_ = false;
  uint32_t parked_ = 0;    // threads waiting in the hold
  uint32_t finished_ = 0;  // threads that have ended
  std::vector<bool> ended_;
  Status first_error_;
};

}  // namespace faultline::vmm
