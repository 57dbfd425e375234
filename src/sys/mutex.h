// Mutex and SharedMutex: std::mutex and std::shared_mutex with clang's
// thread-safety attributes (src/sys/thread_annotations.h), and their scoped
// locks. With them, a clang build with -Wthread-safety checks that a member
// declared GUARDED_BY(mu_) is touched only with mu_ held and that a function
// declared REQUIRES(mu_) is called only with it held. libstdc++'s own types
// carry no attributes, so members guarded by them are not checked.
//
// Everything is inline over the std types: no cost over using them directly.
//
//   sys::MutexLock lock(mu_);           // std::lock_guard / std::unique_lock
//   lock.Unlock(); ...; lock.Lock();    // unique_lock's unlock() / lock()
//   cv_.wait(lock.native(), [&]() REQUIRES(mu_) { return ready_; });
//   if (!mu_.TryLock()) return false;   // std::unique_lock(mu, try_to_lock)
//   sys::MutexLock lock(mu_, std::adopt_lock);
//   sys::ReaderLock lock(shared_mu_);   // std::shared_lock
//   sys::WriterLock lock(shared_mu_);   // std::unique_lock on a shared_mutex
//
// Condition variables stay std::condition_variable, waiting on the
// std::unique_lock inside a MutexLock (native()): no second internal mutex
// and allocation as std::condition_variable_any would add, and every wait,
// wait_for and wait_until, with or without a predicate, as the standard has
// them. A wait returns with the lock held, which is what the analysis
// assumes across the call. A predicate is a lambda, which the analysis
// checks as a function of its own: declare it REQUIRES(mu_) as above (the
// condition variable calls it with the lock held).
#pragma once

#include <mutex>
#include <shared_mutex>

#include "src/sys/thread_annotations.h"

namespace faultline::sys {

class CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ACQUIRE() { mu_.lock(); }
  void Unlock() RELEASE() { mu_.unlock(); }
  // True if it took the lock; never waits.
  [[nodiscard]] bool TryLock() TRY_ACQUIRE(true) { return mu_.try_lock(); }

 private:
  friend class MutexLock;
  std::mutex mu_;
};

// Holds a Mutex from construction to destruction, like std::lock_guard; can
// release and take it again in between, like std::unique_lock.
class SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) ACQUIRE(mu) : lock_(mu.mu_) {}
  // Takes over a lock the caller holds (after a successful TryLock()).
  MutexLock(Mutex& mu, std::adopt_lock_t) REQUIRES(mu) : lock_(mu.mu_, std::adopt_lock) {}
  ~MutexLock() RELEASE() = default;
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

  void Lock() ACQUIRE() { lock_.lock(); }
  void Unlock() RELEASE() { lock_.unlock(); }

  // For std::condition_variable's waits only, which unlock it and return
  // with it locked again. Locking or unlocking it directly would pass
  // unseen by the analysis: use Lock() and Unlock().
  std::unique_lock<std::mutex>& native() { return lock_; }

 private:
  std::unique_lock<std::mutex> lock_;
};

// A reader-writer lock: exclusive (Lock) or shared by several readers
// (LockShared). A member GUARDED_BY it may be read with either held and
// written only with it held exclusively.
class CAPABILITY("shared mutex") SharedMutex {
 public:
  SharedMutex() = default;
  SharedMutex(const SharedMutex&) = delete;
  SharedMutex& operator=(const SharedMutex&) = delete;

  void Lock() ACQUIRE() { mu_.lock(); }
  void Unlock() RELEASE() { mu_.unlock(); }
  [[nodiscard]] bool TryLock() TRY_ACQUIRE(true) { return mu_.try_lock(); }
  void LockShared() ACQUIRE_SHARED() { mu_.lock_shared(); }
  void UnlockShared() RELEASE_SHARED() { mu_.unlock_shared(); }
  [[nodiscard]] bool TryLockShared() TRY_ACQUIRE_SHARED(true) { return mu_.try_lock_shared(); }

 private:
  friend class WriterLock;
  friend class ReaderLock;
  std::shared_mutex mu_;
};

// Holds a SharedMutex exclusively (std::unique_lock on a shared_mutex).
class SCOPED_CAPABILITY WriterLock {
 public:
  explicit WriterLock(SharedMutex& mu) ACQUIRE(mu) : lock_(mu.mu_) {}
  ~WriterLock() RELEASE() = default;
  WriterLock(const WriterLock&) = delete;
  WriterLock& operator=(const WriterLock&) = delete;

  void Lock() ACQUIRE() { lock_.lock(); }
  void Unlock() RELEASE() { lock_.unlock(); }

 private:
  std::unique_lock<std::shared_mutex> lock_;
};

// Holds a SharedMutex shared (std::shared_lock).
class SCOPED_CAPABILITY ReaderLock {
 public:
  explicit ReaderLock(SharedMutex& mu) ACQUIRE_SHARED(mu) : lock_(mu.mu_) {}
  ~ReaderLock() RELEASE() = default;
  ReaderLock(const ReaderLock&) = delete;
  ReaderLock& operator=(const ReaderLock&) = delete;

  void Lock() ACQUIRE_SHARED() { lock_.lock(); }
  void Unlock() RELEASE() { lock_.unlock(); }

 private:
  std::shared_lock<std::shared_mutex> lock_;
};

}  // namespace faultline::sys
