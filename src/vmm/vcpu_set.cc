#include "src/vmm/vcpu_set.h"

#include <pthread.h>
#include <signal.h>

#include <cerrno>
#include <mutex>

namespace faultline::vmm {
namespace {

// The signal that kicks a vCPU thread out of KVM_RUN (or out of a blocking
// wait in the kernel). Its handler does nothing; its only effect is that
// KVM_RUN returns EINTR.
int KickSignal() { return SIGRTMIN + 6; }

void InstallKickHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action {};
    action.sa_handler = [](int) {};
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0;  // no SA_RESTART: KVM_RUN must return
    sigaction(KickSignal(), &action, nullptr);
  });
}

}  // namespace

VcpuSet::VcpuSet(std::vector<std::unique_ptr<hv::Vcpu>> vcpus)
    : vcpus_(std::move(vcpus)), parked_flags_(vcpus_.size(), false), ended_(vcpus_.size(), false) {
  InstallKickHandler();
}

VcpuSet::~VcpuSet() {
  Stop();
  Join();
}

Status VcpuSet::Start(ExitHandler handler) {
  // Under mu_ so that no thread reads threads_ (KickAllLocked) while it
  // is still being filled.
  sys::MutexLock lock(mu_);
  if (!threads_.empty()) return Error("vCPUs already started");
  handler_ = std::move(handler);
  threads_.reserve(size());
  for (uint32_t i = 0; i < size(); ++i) {
    threads_.emplace_back([this, i] { ThreadMain(i); });
  }
  return Status::Ok();
}

void VcpuSet::SetThreadHooks(std::function<void(uint32_t)> started, InterruptHandler interrupted) {
  started_hook_ = std::move(started);
  interrupted_hook_ = std::move(interrupted);
}

void VcpuSet::KickAllLocked() {
  for (uint32_t i = 0; i < threads_.size(); ++i) {
    if (ended_[i] || parked_flags_[i]) continue;
    vcpus_[i]->RequestExit();
    pthread_kill(threads_[i].native_handle(), KickSignal());
  }
}

template <typename Pred>
void VcpuSet::WaitKicking(sys::MutexLock& lock, Pred done) {
  while (!cv_.wait_for(lock.native(), std::chrono::milliseconds(1), done)) KickAllLocked();
}

void VcpuSet::Hold() {
  sys::MutexLock lock(mu_);
  if (holds_++ > 0) return;
  if (threads_.empty()) {
    // Not started: threads will start parked.
    for (auto& vcpu : vcpus_) vcpu->RequestExit();
    return;
  }
  KickAllLocked();
  WaitKicking(lock, [&]() REQUIRES(mu_) { return parked_ + finished_ == size() || stop_; });
}

void VcpuSet::Release() {
  sys::MutexLock lock(mu_);
  if (holds_ > 0 && --holds_ == 0) cv_.notify_all();
}

void VcpuSet::Stop() {
  sys::MutexLock lock(mu_);
  stop_ = true;
  KickAllLocked();
  cv_.notify_all();
}

bool VcpuSet::WaitFinished(std::chrono::milliseconds timeout) {
  sys::MutexLock lock(mu_);
  return cv_.wait_for(lock.native(), timeout,
                      [&]() REQUIRES(mu_) { return finished_ == threads_.size(); });
}

void VcpuSet::Join() {
  {
    sys::MutexLock lock(mu_);
    if (stop_) WaitKicking(lock, [&]() REQUIRES(mu_) { return finished_ == threads_.size(); });
  }
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
}

Status VcpuSet::first_error() const {
  sys::MutexLock lock(mu_);
  return first_error_;
}

void VcpuSet::ThreadMain(uint32_t index) {
  hv::Vcpu& vcpu = *vcpus_[index];
  Status error;
  if (started_hook_) started_hook_(index);
  for (;;) {
    {
      sys::MutexLock lock(mu_);
      if (holds_ > 0 && !stop_) {
        // Complete a pending IN or MMIO read before parking, so that the
        // registers a holder captures are consistent.
        vcpu.CompletePendingExit();
        ++parked_;
        parked_flags_[index] = true;
        cv_.notify_all();
        cv_.wait(lock.native(), [&]() REQUIRES(mu_) { return holds_ == 0 || stop_; });
        parked_flags_[index] = false;
        --parked_;
      }
      if (stop_) break;
      vcpu.ClearExitRequest();
    }
    Result<hv::RunOutcome> outcome = vcpu.Run(handler_);
    if (!outcome.has_value()) {
      error = outcome.error();
      break;
    }
    if (*outcome == hv::RunOutcome::kFinished) break;
    if (*outcome == hv::RunOutcome::kInterrupted && interrupted_hook_) {
      Result<ExitAction> action = interrupted_hook_(vcpu);
      if (!action.has_value()) {
        error = action.error();
        break;
      }
      if (*action == ExitAction::kFinish) break;
    }
  }
  sys::MutexLock lock(mu_);
  ended_[index] = true;
  ++finished_;
  if (!error.ok()) {
    if (first_error_.ok()) first_error_ = error;
    // One failing vCPU stops the VM: the others would run against a guest
    // whose state is no longer trustworthy.
    stop_ = true;
    KickAllLocked();
  }
  cv_.notify_all();
}

}  // namespace faultline::vmm
