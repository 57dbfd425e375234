// PageClient: one VMM connected to the page server, from its handshake to
// its release. Its own thread takes the handshake (one message, the
// userfaultfd attached; docs/page_server.md), refuses a bad one with one
// error and nothing started, or serves the regions with a DemandPager over
// the adopted userfaultfd; then it watches for the end:
//
//   - the VMM's process exits (its pidfd), or an install fails with ESRCH
//     (its memory is gone): released;
//   - its socket closes: released, unless the process is still alive
//     (Firecracker may close the socket after the handshake and keep
//     running: then the pidfd decides);
//   - Stop() (the server shuts down): released.
//
// Released means: the background prefetch stops, the pager stops (its
// handler threads end) and every descriptor is closed; the report goes to
// the server, which logs it.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "src/migration/served_memory.h"
#include "src/migration/socket_transport.h"
#include "src/migration/working_set.h"
#include "src/paging/demand_pager.h"
#include "src/sys/unique_fd.h"

namespace faultline::migration {

struct PageClientOptions {
  uint32_t threads = 2;  // handler threads on the client's userfaultfd
  // Push every data page in the background after the handshake, the
  // `prefetch_first` ranges (bytes of the memory, as a working set's:
  // LoadWorkingSet) before the rest.
  bool prefetch = false;
  std::vector<MemoryRange> prefetch_first;
  // How long a connected VMM may take to send its handshake.
  std::chrono::milliseconds handshake_timeout{5000};
  std::function<void(const std::string&)> log;  // one line per event
};

// What a client did, reported when it ends.
struct PageClientReport {
  uint64_t id = 0;
  pid_t pid = 0;
  uid_t uid = 0;
  bool served = false;  // false: refused (or gone before its handshake)
  std::string end;      // why it ended, or why it was refused
  size_t regions = 0;
  uint64_t region_bytes = 0;
  paging::PagingStats stats;
  double seconds = 0;  // from connect to release
};

class PageClient {
 public:
  PageClient(uint64_t id, std::unique_ptr<SocketChannel> socket,
             std::shared_ptr<const ServedMemory> memory, PageClientOptions options);
  ~PageClient();  // Stop(), then waits for the release
  PageClient(const PageClient&) = delete;
  PageClient& operator=(const PageClient&) = delete;

  // Releases the client now (from any thread); Join() waits for it.
  void Stop();
  bool finished() const { return finished_.load(std::memory_order_acquire); }
  // Waits for the release; the report.
  PageClientReport Join();

 private:
  using Clock = std::chrono::steady_clock;
  void Run();
  // The handshake; on success the pager is serving.
  Status Serve(PeerCredentials peer);
  Result<std::vector<UffdRegion>> ReceiveHandshake(std::vector<sys::UniqueFd>& fds);
  // Watches the socket, the pidfd and wake_ until the client is to go.
  std::string Watch();
  void Prefetch();
  void PushRange(uint64_t offset, uint64_t length);
  void Wake();
  void Log(const std::string& line) const;

  const uint64_t id_;
  std::unique_ptr<SocketChannel> socket_;
  const std::shared_ptr<const ServedMemory> memory_;
  const PageClientOptions options_;
  const Clock::time_point connected_ = Clock::now();
  // Set up by the client's thread before the prefetch thread starts, and
  // read-only afterwards (so not guarded).
  std::vector<UffdRegion> regions_;
  std::vector<std::shared_ptr<RamBlock>> blocks_;
  std::unique_ptr<paging::DemandPager> pager_;
  sys::UniqueFd pidfd_;
  sys::UniqueFd wake_;  // an eventfd: Stop() or ESRCH
  std::atomic<bool> stop_{false};
  std::atomic<bool> gone_{false};  // an install met ESRCH
  std::atomic<bool> finished_{false};
  PageClientReport report_;  // the client's thread's until finished_
  std::thread prefetch_;
  std::thread thread_;
};

}  // namespace faultline::migration
