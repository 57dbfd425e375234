// CompletionWatcher: the source's reader of the main channel once the
// destination has nothing more to say there but how the session ends:
// CompleteAck, an Error (it refused and will not run the guest:
// docs/protocol.md §6, §10), or a broken link. Anything but CompleteAck
// fails the attempt, which stops every other thread of it. Both sources use
// it: the stop-and-copy source from the first pass on, the post-copy source
// from the switchover on (before, it reads the early dirty set's answers
// there itself).
#pragma once

#include <chrono>
#include <condition_variable>
#include <optional>
#include <thread>

#include "faultline/status.h"
#include "src/migration/attempt.h"
#include "src/sys/mutex.h"

namespace faultline::migration {

class CompletionWatcher {
 public:
  explicit CompletionWatcher(Attempt& attempt);  // starts the thread
  // Closes the attempt if no verdict came (that ends the read) and joins.
  ~CompletionWatcher();

  // Blocks until the verdict: OK once CompleteAck came, else the attempt's
  // first failure. Failing or closing the attempt ends the wait.
  Status Wait();
  // The destination's Error if it sent one within `timeout`, else `local`.
  // A destination that fails sends Error and closes; the source's sends
  // then fail first, with a reason that says less.
  Status Explain(Status local, std::chrono::milliseconds timeout);
  // The destination sent Error.
  bool peer_refused() const;

 private:
  void Run();

  Attempt& a_;
  mutable sys::Mutex mu_;  // leaf
  std::condition_variable cv_;
  std::optional<Status> verdict_ GUARDED_BY(mu_);
  bool refused_ GUARDED_BY(mu_) = false;
  std::thread thread_;  // last: starts once the members above exist
};

}  // namespace faultline::migration
