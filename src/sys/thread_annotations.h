// Clang's thread-safety attributes as macros: which lock guards which member,
// which functions need a lock held, acquire or release one. A clang build
// with -Wthread-safety (FAULTLINE_THREAD_SAFETY=ON, scripts/thread-safety.sh)
// checks them at compile time; other compilers see nothing. The names follow
// clang's documentation (clang.llvm.org/docs/ThreadSafetyAnalysis.html).
//
// The locks to annotate with are in src/sys/mutex.h: libstdc++'s std::mutex
// carries no attributes, so a member GUARDED_BY a std::mutex is not checked.
//
//   mutable sys::Mutex mu_;
//   int count_ GUARDED_BY(mu_) = 0;
//   void BumpLocked() REQUIRES(mu_);
#pragma once

#if defined(__clang__)
#define FAULTLINE_THREAD_ATTRIBUTE(x) __attribute__((x))
#else
#define FAULTLINE_THREAD_ATTRIBUTE(x)
#endif

// On a class: its objects are locks (capabilities) named `x` in diagnostics.
#define CAPABILITY(x) FAULTLINE_THREAD_ATTRIBUTE(capability(x))
// On a class: an RAII object that holds the locks its constructor acquires
// until its destructor (or its own Unlock()) releases them.
#define SCOPED_CAPABILITY FAULTLINE_THREAD_ATTRIBUTE(scoped_lockable)

// On a data member: read only with `x` held (shared or exclusive), written
// only with it held exclusively.
#define GUARDED_BY(x) FAULTLINE_THREAD_ATTRIBUTE(guarded_by(x))
// On a pointer member: the pointee (not the pointer) is guarded by `x`.
#define PT_GUARDED_BY(x) FAULTLINE_THREAD_ATTRIBUTE(pt_guarded_by(x))

// On a lock member: the lock order. Checked only with -Wthread-safety-beta;
// written for the reader too.
#define ACQUIRED_BEFORE(...) FAULTLINE_THREAD_ATTRIBUTE(acquired_before(__VA_ARGS__))
#define ACQUIRED_AFTER(...) FAULTLINE_THREAD_ATTRIBUTE(acquired_after(__VA_ARGS__))

// On a function: the caller must hold the locks (exclusively / shared).
#define REQUIRES(...) FAULTLINE_THREAD_ATTRIBUTE(requires_capability(__VA_ARGS__))
#define REQUIRES_SHARED(...) FAULTLINE_THREAD_ATTRIBUTE(requires_shared_capability(__VA_ARGS__))

// On a function: it acquires the locks and returns holding them. On a lock's
// own member functions, with no argument: the lock itself.
#define ACQUIRE(...) FAULTLINE_THREAD_ATTRIBUTE(acquire_capability(__VA_ARGS__))
#define ACQUIRE_SHARED(...) FAULTLINE_THREAD_ATTRIBUTE(acquire_shared_capability(__VA_ARGS__))
// On a function: it releases locks the caller holds (exclusively, shared, or
// either).
#define RELEASE(...) FAULTLINE_THREAD_ATTRIBUTE(release_capability(__VA_ARGS__))
#define RELEASE_SHARED(...) FAULTLINE_THREAD_ATTRIBUTE(release_shared_capability(__VA_ARGS__))
#define RELEASE_GENERIC(...) FAULTLINE_THREAD_ATTRIBUTE(release_generic_capability(__VA_ARGS__))
// On a function returning bool: it acquired the locks if it returned `b`
// (the first argument), e.g. TRY_ACQUIRE(true).
#define TRY_ACQUIRE(...) FAULTLINE_THREAD_ATTRIBUTE(try_acquire_capability(__VA_ARGS__))
#define TRY_ACQUIRE_SHARED(...) \
  FAULTLINE_THREAD_ATTRIBUTE(try_acquire_shared_capability(__VA_ARGS__))

// On a function: the caller must not hold the locks (it takes them itself,
// and they are not reentrant).
#define EXCLUDES(...) FAULTLINE_THREAD_ATTRIBUTE(locks_excluded(__VA_ARGS__))

// On a function: from its return on, the analysis assumes the lock is held
// (a run-time check, where the lock can tell).
#define ASSERT_CAPABILITY(x) FAULTLINE_THREAD_ATTRIBUTE(assert_capability(x))
#define ASSERT_SHARED_CAPABILITY(x) FAULTLINE_THREAD_ATTRIBUTE(assert_shared_capability(x))

// On a function returning a reference to a lock: which lock that is, so that
// a caller locking the result holds `x` (an accessor such as event_mu()).
#define RETURN_CAPABILITY(x) FAULTLINE_THREAD_ATTRIBUTE(lock_returned(x))

// On a function: not analysed. Every use says, next to it, why the analysis
// cannot follow the function and what makes it safe.
#define NO_THREAD_SAFETY_ANALYSIS FAULTLINE_THREAD_ATTRIBUTE(no_thread_safety_analysis)
