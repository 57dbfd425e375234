// The embedding API's page server (include/faultline/embed.h) over
// migration/page_server.h, and the VMM's side over migration/uffd_backend.h.
#include "src/migration/page_server.h"

#include <utility>

#include "faultline/embed.h"
#include "src/migration/served_memory.h"
#include "src/migration/snapshot.h"
#include "src/migration/uffd_backend.h"
#include "src/migration/working_set.h"

namespace faultline {

struct PageServer::Impl {
  std::unique_ptr<migration::PageServer> server;
};

PageServer::PageServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
PageServer::~PageServer() { Stop(); }

Result<std::unique_ptr<PageServer>> PageServer::Start(PageServerOptions options) {
  ASSIGN_OR_RETURN(migration::SnapshotReader snapshot,
                   migration::SnapshotReader::Open(options.snapshot_dir));
  ASSIGN_OR_RETURN(std::shared_ptr<const migration::ServedMemory> memory,
                   migration::ServedMemory::FromSnapshot(snapshot));
  migration::PageServerOptions o;
  o.socket_path = options.socket_path;
  o.client.threads = options.threads;
  o.client.prefetch = options.prefetch || !options.prefetch_file.empty();
  if (!options.prefetch_file.empty()) {
    ASSIGN_OR_RETURN(o.client.prefetch_first,
                     migration::LoadWorkingSet(options.prefetch_file, memory->size()));
  }
  auto impl = std::make_unique<Impl>();
  ASSIGN_OR_RETURN(impl->server, migration::PageServer::Start(std::move(memory), std::move(o)));
  return std::unique_ptr<PageServer>(new PageServer(std::move(impl)));
}

void PageServer::Stop() {
  if (impl_ && impl_->server) impl_->server->Stop();
}

size_t PageServer::active_clients() const { return impl_->server->active_clients(); }

std::vector<PageServerClient> PageServer::released() const {
  std::vector<PageServerClient> out;
  for (const migration::PageClientReport& r : impl_->server->reports()) {
    out.push_back({.id = r.id,
                   .pid = r.pid,
                   .uid = r.uid,
                   .served = r.served,
                   .end = r.end,
                   .faults = r.stats.faults,
                   .zero_pages = r.stats.zero_installs,
                   .removes = r.stats.remove_events,
                   .pages_installed = r.stats.units_installed,
                   .pages_pushed = r.stats.pushes,
                   .bytes_copied = r.stats.bytes_copied,
                   .seconds = r.seconds});
  }
  return out;
}

namespace {

class Connection final : public PageServerConnection {
 public:
  explicit Connection(std::unique_ptr<migration::UffdBackend> backend)
      : backend_(std::move(backend)) {}
  bool server_lost() const override { return backend_->server_lost(); }

 private:
  std::unique_ptr<migration::UffdBackend> backend_;
};

}  // namespace

Result<std::unique_ptr<PageServerConnection>> ConnectPageServer(
    const std::string& socket_path, std::vector<GuestRegion> ram,
    std::function<void(const Status&)> on_server_lost) {
  if (ram.empty()) return Error("ConnectPageServer: no RAM to page");
  std::vector<std::shared_ptr<RamBlock>> blocks;
  for (const GuestRegion& region : ram) {
    if (!region.block) return Error("ConnectPageServer: a region without a RAM block");
    blocks.push_back(region.block);
  }
  ASSIGN_OR_RETURN(std::unique_ptr<migration::UffdBackend> backend,
                   migration::ConnectUffdBackend(socket_path, blocks, std::move(on_server_lost)));
  return std::unique_ptr<PageServerConnection>(new Connection(std::move(backend)));
}

}  // namespace faultline
