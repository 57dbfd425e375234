#include "src/sys/mutex.h"

#include <chrono>
#include <condition_variable>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

namespace faultline::sys {
namespace {

// Whether another thread can take `mu` right now (std::mutex's try_lock on
// a mutex the calling thread owns is undefined, hence the thread).
bool OtherThreadCanLock(Mutex& mu) {
  bool took = false;
  std::thread([&] {
    if (mu.TryLock()) {
      took = true;
      mu.Unlock();
    }
  }).join();
  return took;
}

bool OtherThreadCanLock(SharedMutex& mu) {
  bool took = false;
  std::thread([&] {
    if (mu.TryLock()) {
      took = true;
      mu.Unlock();
    }
  }).join();
  return took;
}

bool OtherThreadCanLockShared(SharedMutex& mu) {
  bool took = false;
  std::thread([&] {
    if (mu.TryLockShared()) {
      took = true;
      mu.UnlockShared();
    }
  }).join();
  return took;
}

TEST(MutexTest, MutexLockHoldsTheMutexForItsScope) {
  Mutex mu;
  {
    MutexLock lock(mu);
    EXPECT_FALSE(OtherThreadCanLock(mu));
  }
  EXPECT_TRUE(OtherThreadCanLock(mu));
}

TEST(MutexTest, MutexLockUnlocksAndLocksAgain) {
  Mutex mu;
  MutexLock lock(mu);
  lock.Unlock();
  EXPECT_TRUE(OtherThreadCanLock(mu));
  lock.Lock();
  EXPECT_FALSE(OtherThreadCanLock(mu));
}

TEST(MutexTest, MutexLockAdoptsASuccessfulTryLock) {
  Mutex mu;
  if (!mu.TryLock()) FAIL() << "an unheld mutex refused TryLock";
  {
    MutexLock lock(mu, std::adopt_lock);
    EXPECT_FALSE(OtherThreadCanLock(mu));
  }
  EXPECT_TRUE(OtherThreadCanLock(mu));
}

TEST(MutexTest, GuardedCounterCountsEveryIncrement) {
  struct Counter {
    Mutex mu;
    int value GUARDED_BY(mu) = 0;
  } counter;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) {
        MutexLock lock(counter.mu);
        ++counter.value;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  MutexLock lock(counter.mu);
  EXPECT_EQ(counter.value, 40000);
}

// The condition variable waits on the lock's std::unique_lock: every form of
// wait, with the predicate checked under the lock. The two threads take
// turns: the other thread moves `stage` to odd values, this one to even.
TEST(MutexTest, ConditionVariableWaitsOnAMutexLock) {
  struct State {
    Mutex mu;
    std::condition_variable cv;
    int stage GUARDED_BY(mu) = 0;
  } s;
  std::thread other([&] {
    for (int next = 1; next <= 5; next += 2) {
      MutexLock lock(s.mu);
      s.cv.wait(lock.native(), [&]() REQUIRES(s.mu) { return s.stage == next - 1; });
      s.stage = next;
      s.cv.notify_all();
    }
  });
  MutexLock lock(s.mu);
  while (s.stage != 1) s.cv.wait(lock.native());
  s.stage = 2;
  s.cv.notify_all();
  EXPECT_TRUE(s.cv.wait_for(lock.native(), std::chrono::seconds(30),
                            [&]() REQUIRES(s.mu) { return s.stage == 3; }));
  s.stage = 4;
  s.cv.notify_all();
  EXPECT_TRUE(s.cv.wait_until(lock.native(),
                              std::chrono::steady_clock::now() + std::chrono::seconds(30),
                              [&]() REQUIRES(s.mu) { return s.stage == 5; }));
  // A predicate that never holds times out, and the lock is held again.
  EXPECT_FALSE(s.cv.wait_for(lock.native(), std::chrono::milliseconds(1),
                             [&]() REQUIRES(s.mu) { return s.stage == 6; }));
  EXPECT_FALSE(OtherThreadCanLock(s.mu));
  lock.Unlock();
  other.join();
}

TEST(MutexTest, ReadersShareAndExcludeWriters) {
  SharedMutex mu;
  {
    ReaderLock reader(mu);
    EXPECT_TRUE(OtherThreadCanLockShared(mu));
    EXPECT_FALSE(OtherThreadCanLock(mu));
    reader.Unlock();
    EXPECT_TRUE(OtherThreadCanLock(mu));
    reader.Lock();
    EXPECT_FALSE(OtherThreadCanLock(mu));
  }
  EXPECT_TRUE(OtherThreadCanLock(mu));
}

TEST(MutexTest, WriterExcludesReadersAndWriters) {
  SharedMutex mu;
  {
    WriterLock writer(mu);
    EXPECT_FALSE(OtherThreadCanLockShared(mu));
    EXPECT_FALSE(OtherThreadCanLock(mu));
    writer.Unlock();
    EXPECT_TRUE(OtherThreadCanLockShared(mu));
    writer.Lock();
    EXPECT_FALSE(OtherThreadCanLockShared(mu));
  }
  EXPECT_TRUE(OtherThreadCanLockShared(mu));
}

}  // namespace
}  // namespace faultline::sys
