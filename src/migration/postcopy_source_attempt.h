// PostcopySource's session state, shared by postcopy_source.cc (the
// phases) and postcopy_source_threads.cc (post-copy's threads).
#pragma once

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>

#include "faultline/status.h"
#include "src/migration/handshake.h"
#include "src/migration/postcopy_source.h"

namespace faultline::migration {

inline std::chrono::microseconds Since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() -
                                                               t);
}

// One session: its links, and the first failure, which breaks every link so
// that every thread using them stops.
class PostcopySource::Attempt {
 public:
  Session session;
  std::unique_ptr<Link> priority;

  void Break(Status why) {
    std::lock_guard lock(mu_);
    if (error_.ok()) error_ = std::move(why);
    broken_ = true;
    session.Shutdown();
    if (priority) priority->channel().Shutdown();
    cv_.notify_all();
  }
  bool broken() const {
    std::lock_guard lock(mu_);
    return broken_;
  }
  Status error() const {
    std::lock_guard lock(mu_);
    return error_;
  }
  // The watcher's verdict on the main channel: OK once CompleteAck came.
  void SetPeer(Status s) {
    std::lock_guard lock(mu_);
    peer_ = std::move(s);
    cv_.notify_all();
  }
  Status WaitPeer() {
    std::unique_lock lock(mu_);
    // Break() shuts the main channel down, so the watcher always ends. Its
    // word is final: a CompleteAck read before other channels closed wins.
    cv_.wait(lock, [&] { return peer_.has_value(); });
    if (peer_->ok()) return Status::Ok();
    return error_.ok() ? *peer_ : error_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool broken_ = false;         // guarded by mu_
  Status error_;                // guarded by mu_
  std::optional<Status> peer_;  // guarded by mu_
};

}  // namespace faultline::migration
