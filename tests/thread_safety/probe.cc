// Compiled only by the thread_safety.* tests, with clang -Wthread-safety
// -Werror: without PROBE_MISTAKE it must compile; with each mistake it must
// fail with the analysis's own diagnostic (tests/thread_safety/CMakeLists.txt).
#include "src/sys/mutex.h"

namespace {

class Account {
 public:
  void Deposit(int amount) {
    faultline::sys::MutexLock lock(mu_);
    AddLocked(amount);
  }
  int balance() const {
    faultline::sys::MutexLock lock(mu_);
    return balance_;
  }
  int audits() {
    faultline::sys::ReaderLock lock(audit_mu_);
    return audits_;
  }
  void Audit() {
    faultline::sys::WriterLock lock(audit_mu_);
    ++audits_;
  }

#if PROBE_MISTAKE == 1  // writes a guarded member without its lock
  void Reset() { balance_ = 0; }
#elif PROBE_MISTAKE == 2  // reads a guarded member without its lock
  int UnlockedBalance() const { return balance_; }
#elif PROBE_MISTAKE == 3  // calls a REQUIRES function without the lock
  void DepositUnlocked(int amount) { AddLocked(amount); }
#elif PROBE_MISTAKE == 4  // writes under a shared (reader) lock
  void AuditShared() {
    faultline::sys::ReaderLock lock(audit_mu_);
    ++audits_;
  }
#elif PROBE_MISTAKE == 5  // touches the member after releasing the lock
  void DepositLate(int amount) {
    faultline::sys::MutexLock lock(mu_);
    lock.Unlock();
    balance_ += amount;
  }
#endif

 private:
  void AddLocked(int amount) REQUIRES(mu_) { balance_ += amount; }

  mutable faultline::sys::Mutex mu_;
  int balance_ GUARDED_BY(mu_) = 0;
  faultline::sys::SharedMutex audit_mu_;
  int audits_ GUARDED_BY(audit_mu_) = 0;
};

}  // namespace

int faultline_thread_safety_probe() {
  Account account;
  account.Deposit(1);
  account.Audit();
  return account.balance() + account.audits();
}
