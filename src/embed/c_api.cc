// The C API (include/faultline/faultline.h) over the embedding API.
#include "faultline/faultline.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "faultline/embed.h"

struct fl_error {
  int code;
  std::string message;
};

struct fl_outgoing {
  std::unique_ptr<faultline::VmHandle> vm;
  std::unique_ptr<faultline::OutgoingMigration> migration;
};

struct fl_incoming {
  std::unique_ptr<faultline::VmHandle> vm;
  std::unique_ptr<faultline::IncomingMigration> migration;
};

namespace faultline {
namespace {

int Fail(const Status& status, fl_error** error) {
  if (error != nullptr) {
    *error =
        new (std::nothrow) fl_error{status.code() != 0 ? status.code() : EIO, status.ToString()};
  }
  return -1;
}

Status CallbackError(int code, const char* what) {
  return ErrnoError(code > 0 ? code : EIO, "the VMM's {} callback failed", what);
}

// Takes a buffer the VMM allocated with malloc.
std::vector<uint8_t> Adopt(uint8_t* data, size_t size) {
  std::vector<uint8_t> out(data, data + (data != nullptr ? size : 0));
  std::free(data);
  return out;
}

// The VMM's callbacks as a VmHandle.
class CVmHandle final : public VmHandle {
 public:
  explicit CVmHandle(const fl_vm_ops& ops) : ops_(ops) {}

  uint32_t vcpu_count() const override { return ops_.vcpu_count; }
  void Pause() override { ops_.pause(ops_.ctx); }
  void Resume() override { ops_.resume(ops_.ctx); }
  Result<std::vector<uint8_t>> SaveVcpu(uint32_t index) override {
    uint8_t* data = nullptr;
    size_t size = 0;
    if (int r = ops_.save_vcpu(ops_.ctx, index, &data, &size); r != 0) {
      std::free(data);
      return CallbackError(r, "save_vcpu");
    }
    return Adopt(data, size);
  }
  Status LoadVcpu(uint32_t index, std::span<const uint8_t> state) override {
    if (int r = ops_.load_vcpu(ops_.ctx, index, state.data(), state.size()); r != 0) {
      return CallbackError(r, "load_vcpu");
    }
    return Status::Ok();
  }
  Result<std::vector<uint8_t>> SaveDevices() override {
    if (ops_.save_devices == nullptr) return std::vector<uint8_t>{};
    uint8_t* data = nullptr;
    size_t size = 0;
    if (int r = ops_.save_devices(ops_.ctx, &data, &size); r != 0) {
      std::free(data);
      return CallbackError(r, "save_devices");
    }
    return Adopt(data, size);
  }
  Status LoadDevices(std::span<const uint8_t> state) override {
    if (ops_.load_devices == nullptr) return VmHandle::LoadDevices(state);
    if (int r = ops_.load_devices(ops_.ctx, state.data(), state.size()); r != 0) {
      return CallbackError(r, "load_devices");
    }
    return Status::Ok();
  }
  Status Start() override {
    if (int r = ops_.start(ops_.ctx); r != 0) return CallbackError(r, "start");
    return Status::Ok();
  }

 private:
  const fl_vm_ops ops_;
};

Status CheckOps(const fl_vm_ops* ops) {
  if (ops == nullptr) return Error("fl_vm_ops: NULL");
  if (ops->pause == nullptr || ops->resume == nullptr || ops->save_vcpu == nullptr ||
      ops->load_vcpu == nullptr || ops->start == nullptr) {
    return Error("fl_vm_ops: pause, resume, save_vcpu, load_vcpu and start are required");
  }
  if (ops->vcpu_count == 0) return Error("fl_vm_ops: vcpu_count is 0");
  return Status::Ok();
}

Result<std::vector<GuestRegion>> Regions(const fl_region* regions, size_t count) {
  if (regions == nullptr && count != 0) return Error("fl_region: NULL with a count of {}", count);
  std::vector<GuestRegion> out;
  for (size_t i = 0; i < count; ++i) {
    const fl_region& r = regions[i];
    RamBlockOptions o;
    o.name = r.name != nullptr ? r.name : fmt::format("region{}", i);
    o.size = r.size;
    switch (r.backing) {
      case FL_BACKING_ANON:
        o.backing = Backing::kAnonymous;
        break;
      case FL_BACKING_MEMFD:
        o.backing = Backing::kMemfd;
        break;
      case FL_BACKING_HUGETLB:
        o.backing = Backing::kHugetlb;
        break;
      default:
        return Error("fl_region '{}': unknown backing {}", o.name, static_cast<int>(r.backing));
    }
    if (r.host == nullptr) return Error("fl_region '{}': host is NULL", o.name);
    o.host = r.host;
    o.adopt_fd = r.fd;
    ASSIGN_OR_RETURN(std::shared_ptr<RamBlock> block, RamBlock::Create(o));
    out.push_back(GuestRegion{std::move(block), r.gpa});
  }
  return out;
}

MigrationOptions Options(const fl_migration_options* c) {
  fl_migration_options defaults;
  fl_migration_options_init(&defaults);
  if (c == nullptr) c = &defaults;
  MigrationOptions o;
  o.postcopy = c->postcopy != 0;
  o.precopy_passes = c->precopy_passes;
  o.channels = c->channels;
  o.key = c->key != nullptr ? c->key : "";
  o.downtime_target = std::chrono::milliseconds(c->downtime_target_ms);
  o.bandwidth_limit = c->bandwidth_limit;
  o.io_timeout = std::chrono::milliseconds(c->io_timeout_ms);
  o.memory_is_zero = c->memory_is_zero != 0;
  o.tls_dir = c->tls_dir != nullptr ? c->tls_dir : "";
  o.tls_peer_name = c->tls_peer_name != nullptr ? c->tls_peer_name : "";
  return o;
}

void Copy(const MigrationStats& s, fl_migration_stats* out) {
  if (out == nullptr) return;
  *out = fl_migration_stats{s.passes,          s.pages,       s.zero_pages,   s.bytes,
                            s.total_us,        s.downtime_us, s.postcopy_us,  s.pages_pushed,
                            s.pages_requested, s.faults,      s.fault_p50_us, s.fault_p99_us,
                            s.sessions};
}

void Copy(const MigrationProgress& p, fl_progress* out) {
  if (out == nullptr) return;
  *out = fl_progress{};
  std::strncpy(out->phase, p.phase.c_str(), sizeof(out->phase) - 1);
  out->pass = p.pass;
  out->pages_sent = p.pages_sent;
  out->pages_remaining = p.pages_remaining;
}

// Create for either side.
template <typename Handle, typename Migration>
Handle* Create(const fl_vm_ops* ops, const fl_region* regions, size_t count,
               const fl_migration_options* options, fl_error** error) {
  if (Status s = CheckOps(ops); !s.ok()) {
    Fail(s, error);
    return nullptr;
  }
  Result<std::vector<GuestRegion>> ram = Regions(regions, count);
  if (!ram.has_value()) {
    Fail(ram.error(), error);
    return nullptr;
  }
  auto handle = std::make_unique<Handle>();
  handle->vm = std::make_unique<CVmHandle>(*ops);
  auto migration = Migration::Create(*handle->vm, std::move(*ram), Options(options));
  if (!migration.has_value()) {
    Fail(migration.error(), error);
    return nullptr;
  }
  handle->migration = std::move(*migration);
  return handle.release();
}

int Finish(const Result<MigrationStats>& result, fl_migration_stats* stats, fl_error** error) {
  if (!result.has_value()) return Fail(result.error(), error);
  Copy(*result, stats);
  return 0;
}

}  // namespace
}  // namespace faultline

extern "C" {

int fl_error_code(const fl_error* error) { return error != nullptr ? error->code : 0; }
const char* fl_error_message(const fl_error* error) {
  return error != nullptr ? error->message.c_str() : "";
}
void fl_error_free(fl_error* error) { delete error; }

void fl_migration_options_init(fl_migration_options* options) {
  *options = fl_migration_options{};
  options->channels = 4;
  options->downtime_target_ms = 50;
  options->io_timeout_ms = 60'000;
  options->memory_is_zero = 1;
}

fl_outgoing* fl_outgoing_create(const fl_vm_ops* ops, const fl_region* regions, size_t count,
                                const fl_migration_options* options, fl_error** error) {
  return faultline::Create<fl_outgoing, faultline::OutgoingMigration>(ops, regions, count, options,
                                                                      error);
}

int fl_outgoing_run(fl_outgoing* m, const char* address, fl_migration_stats* stats,
                    fl_error** error) {
  return faultline::Finish(m->migration->Run(address != nullptr ? address : ""), stats, error);
}

int fl_outgoing_resume(fl_outgoing* m, const char* address, fl_migration_stats* stats,
                       fl_error** error) {
  return faultline::Finish(m->migration->Resume(address != nullptr ? address : ""), stats, error);
}

void fl_outgoing_start_postcopy(fl_outgoing* m) { m->migration->StartPostcopy(); }
void fl_outgoing_cancel(fl_outgoing* m) { m->migration->Cancel(); }
void fl_outgoing_progress(const fl_outgoing* m, fl_progress* progress) {
  faultline::Copy(m->migration->progress(), progress);
}
void fl_outgoing_destroy(fl_outgoing* m) { delete m; }

fl_incoming* fl_incoming_create(const fl_vm_ops* ops, const fl_region* regions, size_t count,
                                const fl_migration_options* options, fl_error** error) {
  return faultline::Create<fl_incoming, faultline::IncomingMigration>(ops, regions, count, options,
                                                                      error);
}

int fl_incoming_listen(fl_incoming* m, const char* address, char* bound, size_t bound_size,
                       fl_error** error) {
  faultline::Result<std::string> r = m->migration->Listen(address != nullptr ? address : "");
  if (!r.has_value()) return faultline::Fail(r.error(), error);
  if (bound != nullptr && bound_size > 0) {
    std::strncpy(bound, r->c_str(), bound_size - 1);
    bound[bound_size - 1] = '\0';
  }
  return 0;
}

int fl_incoming_run(fl_incoming* m, fl_migration_stats* stats, fl_error** error) {
  return faultline::Finish(m->migration->Run(), stats, error);
}

int fl_incoming_resume(fl_incoming* m, fl_migration_stats* stats, fl_error** error) {
  return faultline::Finish(m->migration->Resume(), stats, error);
}

void fl_incoming_cancel(fl_incoming* m) { m->migration->Cancel(); }
void fl_incoming_progress(const fl_incoming* m, fl_progress* progress) {
  faultline::Copy(m->migration->progress(), progress);
}
void fl_incoming_destroy(fl_incoming* m) { delete m; }

int fl_snapshot_write(const fl_vm_ops* ops, const fl_region* regions, size_t count, const char* dir,
                      int live, int resume, fl_snapshot_stats* stats, fl_error** error) {
  using namespace faultline;
  if (Status s = CheckOps(ops); !s.ok()) return Fail(s, error);
  Result<std::vector<GuestRegion>> ram = Regions(regions, count);
  if (!ram.has_value()) return Fail(ram.error(), error);
  CVmHandle vm(*ops);
  Result<SnapshotStats> r = WriteSnapshot(vm, std::move(*ram), dir != nullptr ? dir : "",
                                          {.live = live != 0, .resume = resume != 0});
  if (!r.has_value()) return Fail(r.error(), error);
  if (stats != nullptr) {
    *stats = fl_snapshot_stats{r->passes, r->data_pages, r->zero_pages, r->pause_us, r->total_us};
  }
  return 0;
}

int fl_snapshot_restore(const fl_vm_ops* ops, const fl_region* regions, size_t count,
                        const char* dir, int lazy, fl_restore_stats* stats, fl_error** error) {
  using namespace faultline;
  if (Status s = CheckOps(ops); !s.ok()) return Fail(s, error);
  Result<std::vector<GuestRegion>> ram = Regions(regions, count);
  if (!ram.has_value()) return Fail(ram.error(), error);
  CVmHandle vm(*ops);
  Result<RestoreStats> r =
      RestoreSnapshot(vm, std::move(*ram), dir != nullptr ? dir : "", {.lazy = lazy != 0});
  if (!r.has_value()) return Fail(r.error(), error);
  if (stats != nullptr) {
    *stats = fl_restore_stats{r->start_us, r->resident_us, r->faults, r->pages_read};
  }
  return 0;
}

}  // extern "C"

struct fl_page_server {
  std::unique_ptr<faultline::PageServer> server;
};

fl_page_server* fl_page_server_create(const char* snapshot_dir, const char* socket_path,
                                      uint32_t threads, int prefetch, const char* prefetch_file,
                                      fl_error** error) {
  using namespace faultline;
  if (snapshot_dir == nullptr || socket_path == nullptr) {
    Fail(ErrnoError(EINVAL, "fl_page_server_create: snapshot_dir and socket_path are required"),
         error);
    return nullptr;
  }
  PageServerOptions options{.snapshot_dir = snapshot_dir,
                            .socket_path = socket_path,
                            .threads = threads == 0 ? 2 : threads,
                            .prefetch = prefetch != 0,
                            .prefetch_file = prefetch_file != nullptr ? prefetch_file : ""};
  Result<std::unique_ptr<PageServer>> server = PageServer::Start(std::move(options));
  if (!server.has_value()) {
    Fail(server.error(), error);
    return nullptr;
  }
  return new fl_page_server{std::move(*server)};
}

size_t fl_page_server_active_clients(const fl_page_server* server) {
  return server != nullptr ? server->server->active_clients() : 0;
}

void fl_page_server_destroy(fl_page_server* server) { delete server; }

struct fl_page_client {
  std::unique_ptr<faultline::PageServerConnection> connection;
};

fl_page_client* fl_page_client_connect(const char* socket_path, const fl_region* regions,
                                       size_t count,
                                       void (*on_lost)(void* ctx, const char* message), void* ctx,
                                       fl_error** error) {
  using namespace faultline;
  if (socket_path == nullptr) {
    Fail(ErrnoError(EINVAL, "fl_page_client_connect: socket_path is required"), error);
    return nullptr;
  }
  Result<std::vector<GuestRegion>> ram = Regions(regions, count);
  if (!ram.has_value()) {
    Fail(ram.error(), error);
    return nullptr;
  }
  Result<std::unique_ptr<PageServerConnection>> connection =
      ConnectPageServer(socket_path, std::move(*ram), [on_lost, ctx](const Status& why) {
        if (on_lost != nullptr) on_lost(ctx, why.ToString().c_str());
      });
  if (!connection.has_value()) {
    Fail(connection.error(), error);
    return nullptr;
  }
  return new fl_page_client{std::move(*connection)};
}

int fl_page_client_server_lost(const fl_page_client* client) {
  return client != nullptr && client->connection->server_lost() ? 1 : 0;
}

void fl_page_client_destroy(fl_page_client* client) { delete client; }
