#include "src/vmm/vcpu_set.h"

#include <pthread.h>
#include <signal.h>

#include <cerrno>
#include <mutex>

namespace faultline::vmm {
namespace {

// The signal that kicks a vCPU thread out of KVM_RUN. Its handler does
// nothing; its only effect is that KVM_RUN returns EINTR.
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

void SetImmediateExit(sys::KvmVcpu& vcpu, uint8_t value) {
  __atomic_store_n(&vcpu.run()->immediate_exit, value, __ATOMIC_SEQ_CST);
}

}  // namespace

VcpuSet::VcpuSet(std::vector<sys::KvmVcpu> vcpus)
    : vcpus_(std::move(vcpus)), ended_(vcpus_.size(), false) {
  InstallKickHandler();
}

VcpuSet::~VcpuSet() {
  Stop();
  Join();
}

Status VcpuSet::Start(ExitHandler handler) {
  // Under mu_ so that no thread reads threads_ (KickAllLocked) while it
  // is still being filled.
  std::lock_guard lock(mu_);
  if (!threads_.empty()) return Error("vCPUs already started");
  handler_ = std::move(handler);
  threads_.reserve(size());
  for (uint32_t i = 0; i < size(); ++i) {
    threads_.emplace_back([this, i] { ThreadMain(i); });
  }
  return Status::Ok();
}

void VcpuSet::SetThreadHooks(std::function<void(uint32_t)> started, ExitHandler interrupted) {
  started_hook_ = std::move(started);
  interrupted_hook_ = std::move(interrupted);
}

void VcpuSet::KickAllLocked() {
  for (uint32_t i = 0; i < threads_.size(); ++i) {
    if (ended_[i]) continue;
    SetImmediateExit(vcpus_[i], 1);
    pthread_kill(threads_[i].native_handle(), KickSignal());
  }
}

void VcpuSet::Hold() {
  std::unique_lock lock(mu_);
  if (holds_++ > 0) return;
  KickAllLocked();
  if (threads_.empty()) return;  // not started: threads will start parked
  cv_.wait(lock, [&] { return parked_ + finished_ == size() || stop_; });
}

void VcpuSet::Release() {
  std::lock_guard lock(mu_);
  if (holds_ > 0 && --holds_ == 0) cv_.notify_all();
}

void VcpuSet::Stop() {
  std::lock_guard lock(mu_);
  stop_ = true;
  KickAllLocked();
  cv_.notify_all();
}

bool VcpuSet::WaitFinished(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  return cv_.wait_for(lock, timeout, [&] { return finished_ == threads_.size(); });
}

void VcpuSet::Join() {
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
}

Status VcpuSet::first_error() const {
  std::lock_guard lock(mu_);
  return first_error_;
}

void VcpuSet::ThreadMain(uint32_t index) {
  sys::KvmVcpu& vcpu = vcpus_[index];
  Status error;
  if (started_hook_) started_hook_(index);
  for (;;) {
    {
      std::unique_lock lock(mu_);
      if (holds_ > 0 && !stop_) {
        // Complete a pending IN or MMIO read before parking, so that the
        // registers a holder captures are consistent (KVM_RUN with
        // immediate_exit set finishes the instruction and returns EINTR).
        SetImmediateExit(vcpu, 1);
        (void)vcpu.Run();
        ++parked_;
        cv_.notify_all();
        cv_.wait(lock, [&] { return holds_ == 0 || stop_; });
        --parked_;
      }
      if (stop_) break;
      SetImmediateExit(vcpu, 0);
    }
    Status s = vcpu.Run();
    const bool interrupted = s.ok() ? vcpu.run()->exit_reason == KVM_EXIT_INTR : s.code() == EINTR;
    if (interrupted && interrupted_hook_) {
      Result<ExitAction> action = interrupted_hook_(index, vcpu);
      if (!action.has_value()) {
        error = action.error();
        break;
      }
      if (*action == ExitAction::kFinish) break;
    }
    if (!s.ok()) {
      if (s.code() == EINTR || s.code() == EAGAIN) continue;
      error = s;
      break;
    }
    if (interrupted) continue;
    Result<ExitAction> action = handler_(index, vcpu);
    if (!action.has_value()) {
      error = action.error();
      break;
    }
    if (*action == ExitAction::kFinish) break;
  }
  std::lock_guard lock(mu_);
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
