// PageServer: serves a snapshot's memory to VMMs that hand over their
// userfaultfd (Firecracker's handshake; docs/page_server.md). It listens on
// a Unix socket (mode 0600), accepts any number of VMMs at once, and gives
// each its own PageClient: a DemandPager over the VMM's userfaultfd that
// copies pages in from the snapshot's files on fault (zero pages without
// reading) and, optionally, pushes every data page in the background. A
// VMM that dies is released; the others go on.
//
//   auto memory = ServedMemory::FromSnapshot(*SnapshotReader::Open(dir));
//   auto server = PageServer::Start(*memory, {.socket_path = "/run/fc.sock"});
//   ... VMMs connect ...
//   server->Stop();  // releases every client; removes the socket file
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "faultline/status.h"
#include "src/migration/page_client.h"
#include "src/migration/served_memory.h"
#include "src/migration/socket_transport.h"
#include "src/sys/mutex.h"

namespace faultline::migration {

struct PageServerOptions {
  std::string socket_path;
  PageClientOptions client;  // threads, prefetch, log
  // Called (on the server's thread) with each client's report when it ends.
  std::function<void(const PageClientReport&)> on_client_end;
};

class PageServer {
 public:
  // Listens on options.socket_path (a stale socket file is replaced, a live
  // one refused) and starts accepting.
  static Result<std::unique_ptr<PageServer>> Start(std::shared_ptr<const ServedMemory> memory,
                                                   PageServerOptions options);
  ~PageServer();  // Stop()
  PageServer(const PageServer&) = delete;
  PageServer& operator=(const PageServer&) = delete;

  // Stops accepting, releases every client (their reports go to
  // on_client_end) and removes the socket file. Idempotent.
  void Stop();

  const std::string& socket_path() const { return options_.socket_path; }
  // Clients connected and not yet released.
  size_t active_clients() const;
  // Reports of the clients released so far, in release order.
  std::vector<PageClientReport> reports() const;

 private:
  PageServer(std::shared_ptr<const ServedMemory> memory, PageServerOptions options,
             std::unique_ptr<SocketListener> listener)
      : memory_(std::move(memory)), options_(std::move(options)), listener_(std::move(listener)) {}
  void AcceptLoop();
  // Joins released clients (all of them with `all`) and reports them.
  void Reap(bool all);

  const std::shared_ptr<const ServedMemory> memory_;
  const PageServerOptions options_;
  std::unique_ptr<SocketListener> listener_;  // the accept thread's; reset by Stop
  std::atomic<bool> stopping_{false};
  std::thread accept_;
  uint64_t next_id_ = 1;   // the accept thread's
  mutable sys::Mutex mu_;  // a leaf
  std::vector<std::unique_ptr<PageClient>> clients_ GUARDED_BY(mu_);
  std::vector<PageClientReport> reports_ GUARDED_BY(mu_);
};

}  // namespace faultline::migration
