// PostcopyDestination's working state for one session (internal to the
// post-copy destination's two files: postcopy_destination.cc runs the main
// channel and the switchover, postcopy_destination_channels.cc the page and
// priority channels' receiving threads).
#pragma once

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "src/memory/dirty_bitmap.h"
#include "src/migration/handshake.h"
#include "src/migration/postcopy_destination.h"

namespace faultline::migration {

// One session: links, channel threads and the state they share. The first
// failure breaks every link so that every thread stops.
class PostcopyDestination::Attempt {
 public:
  Session session;
  std::unique_ptr<Link> priority;
  std::vector<std::thread> threads;
  // Pre-copy: the pages each channel received (written only by its thread
  // until it reached the switchover).
  std::vector<std::vector<DirtyBitmap>> received;
  std::vector<DirtyBitmap> dirty_set;  // the main thread's, from the Switchover on
  // The early dirty set (dropped before the pause); main thread, before
  // the Switchover, then only read.
  std::vector<DirtyBitmap> early;

  ~Attempt() { Join(); }

  void Break(Status why) {
    std::lock_guard lock(mu);
    if (error.ok()) error = std::move(why);
    broken = true;
    session.Shutdown();
    if (priority) priority->channel().Shutdown();
    cv.notify_all();
  }
  void Join() {
    for (std::thread& t : threads) {
      if (t.joinable()) t.join();
    }
  }
  // Waits until `done` holds (true) or the session broke (false).
  template <typename Pred>
  bool WaitFor(Pred done) {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return broken || done(); });
    return !broken;
  }
  void Notify(std::function<void()> change) {
    std::lock_guard lock(mu);
    change();
    cv.notify_all();
  }

  std::mutex mu;
  std::condition_variable cv;
  bool broken = false;                  // guarded by mu
  Status error;                         // guarded by mu
  size_t at_switchover = 0;             // guarded by mu: page channels that reached it
  bool postcopy_go = false;             // guarded by mu: the guest runs; pushes may be received
  size_t push_ended = 0;                // guarded by mu: page channels whose push ended
  std::vector<uint32_t> pass_arrivals;  // guarded by mu: the pre-copy pass barrier
};

}  // namespace faultline::migration
