// VcpuSet: one thread per vCPU running it (hv::Vcpu::Run), and kick-and-hold:
// a way to bring every vCPU out of the guest and keep it out until released,
// used by layout changes, state capture and switchover. The same for KVM and
// the software CPU.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "faultline/status.h"
#include "src/hypervisor/hypervisor.h"
#include "src/memory/guest_memory.h"
#include "src/sys/mutex.h"

namespace faultline::vmm {

using hv::ExitAction;
using hv::ExitHandler;
// Runs on vCPU `vcpu`'s thread when its run was interrupted.
using InterruptHandler = std::function<Result<ExitAction>(hv::Vcpu& vcpu)>;

class VcpuSet : public VcpuPauser {
 public:
  explicit VcpuSet(std::vector<std::unique_ptr<hv::Vcpu>> vcpus);
  ~VcpuSet() override;  // stops and joins every thread
  VcpuSet(const VcpuSet&) = delete;
  VcpuSet& operator=(const VcpuSet&) = delete;

  uint32_t size() const { return static_cast<uint32_t>(vcpus_.size()); }
  hv::Vcpu& vcpu(uint32_t index) { return *vcpus_[index]; }

  // Starts the threads. If Hold() was called before, they start held.
  Status Start(ExitHandler handler);
  // Optional, before Start(), each run on the vCPU's own thread: `started`
  // before it first runs; `interrupted` whenever a run was interrupted (a
  // kick, or a signal such as the SIGBUS for a poisoned page), before the
  // thread parks or runs again.
  void SetThreadHooks(std::function<void(uint32_t index)> started, InterruptHandler interrupted);

  // Kick-and-hold: returns once no vCPU is in the guest and none will enter
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
  void KickAllLocked() REQUIRES(mu_);
  // Waits on cv_ until `done` (called with mu_ held), kicking again every
  // millisecond the vCPUs that have not parked or ended (a signal can arrive
  // before a thread blocks in the kernel; a repeat costs nothing).
  template <typename Pred>
  void WaitKicking(sys::MutexLock& lock, Pred done) REQUIRES(mu_);

  std::vector<std::unique_ptr<hv::Vcpu>> vcpus_;
  // Both written once, by Start() under mu_ (so that KickAllLocked never
  // sees threads_ half filled), and only read after: threads_ by Join()
  // and started() without mu_, handler_ by the threads Start() starts.
  std::vector<std::thread> threads_;
  ExitHandler handler_;
  std::function<void(uint32_t)> started_hook_;  // set before Start()
  InterruptHandler interrupted_hook_;           // set before Start()

  mutable sys::Mutex mu_;
  std::condition_variable cv_;
  // Invariant: a thread clears its vCPU's exit request only while holding
  // mu_ and seeing holds_ == 0 && !stop_; Hold() and Stop() request exits
  // (and signal) while holding mu_. So once Hold() has set holds_, no thread
  // can enter the guest without seeing the request and coming straight back
  // out.
  int holds_ GUARDED_BY(mu_) = 0;
  bool stop_ GUARDED_BY(mu_) = false;
  uint32_t parked_ GUARDED_BY(mu_) = 0;  // threads waiting in the hold
  std::vector<bool> parked_flags_ GUARDED_BY(mu_);
  uint32_t finished_ GUARDED_BY(mu_) = 0;  // threads that have ended
  std::vector<bool> ended_ GUARDED_BY(mu_);
  Status first_error_ GUARDED_BY(mu_);
};

}  // namespace faultline::vmm
