#include "src/migration/page_server.h"

#include <cerrno>
#include <utility>

namespace faultline::migration {

Result<std::unique_ptr<PageServer>> PageServer::Start(std::shared_ptr<const ServedMemory> memory,
                                                      PageServerOptions options) {
  if (memory == nullptr) return Error("page server: nothing to serve");
  if (options.socket_path.empty()) return Error("page server: no socket path");
  Address address{.scheme = "unix", .host = "", .port = 0, .path = options.socket_path};
  ASSIGN_OR_RETURN(auto listener, SocketListener::Listen(address, TransportOptions{}));
  std::unique_ptr<PageServer> server(
      new PageServer(std::move(memory), std::move(options), std::move(listener)));
  server->accept_ = std::thread([s = server.get()] { s->AcceptLoop(); });
  return server;
}

PageServer::~PageServer() { Stop(); }

void PageServer::Stop() {
  if (stopping_.exchange(true)) {
    if (accept_.joinable()) accept_.join();
    return;
  }
  if (accept_.joinable()) accept_.join();
  {
    sys::MutexLock lock(mu_);
    for (auto& client : clients_) client->Stop();
  }
  Reap(/*all=*/true);
}

void PageServer::AcceptLoop() {
  while (!stopping_.load(std::memory_order_acquire)) {
    Reap(/*all=*/false);
    auto socket = listener_->AcceptSocket(std::chrono::milliseconds(100));
    if (!socket.has_value()) {
      if (socket.error().code() == ETIMEDOUT) continue;
      if (options_.client.log) options_.client.log("accept: " + socket.error().ToString());
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      continue;
    }
    auto client =
        std::make_unique<PageClient>(next_id_++, std::move(*socket), memory_, options_.client);
    sys::MutexLock lock(mu_);
    clients_.push_back(std::move(client));
  }
  // The socket file goes with the listener: no VMM connects from here on.
  listener_.reset();
}

void PageServer::Reap(bool all) {
  std::vector<std::unique_ptr<PageClient>> done;
  {
    sys::MutexLock lock(mu_);
    for (auto it = clients_.begin(); it != clients_.end();) {
      if (all || (*it)->finished()) {
        done.push_back(std::move(*it));
        it = clients_.erase(it);
      } else {
        ++it;
      }
    }
  }
  // Joined without the lock: a release waits for its pager to stop.
  for (auto& client : done) {
    PageClientReport report = client->Join();
    if (options_.on_client_end) options_.on_client_end(report);
    sys::MutexLock lock(mu_);
    reports_.push_back(std::move(report));
  }
}

size_t PageServer::active_clients() const {
  sys::MutexLock lock(mu_);
  size_t n = 0;
  for (const auto& client : clients_) n += !client->finished();
  return n;
}

std::vector<PageClientReport> PageServer::reports() const {
  sys::MutexLock lock(mu_);
  return reports_;
}

}  // namespace faultline::migration
