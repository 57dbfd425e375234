// Faultline inside a VMM of its own. The VMM keeps its vCPUs, its devices
// and its memory mappings; Faultline moves the guest's memory to another
// process or host (pre-copy, or post-copy with demand paging, and recovery
// after a broken link) and carries the vCPU and device state as opaque
// blobs. Everything a VMM needs is in include/faultline/; the C API over
// this is faultline/faultline.h.
//
// A source:
//   OutgoingMigration::Create(vm, ram, options) -> Run("tcp:10.0.0.2:7000")
// A destination, with RAM of the same blocks (names, sizes, backings):
//   IncomingMigration::Create(vm, ram, options) -> Listen("tcp:0.0.0.0:7000")
//   -> Run(); VmHandle::Start() is called when the guest should run.
//
// A snapshot (the guest to a directory, live or paused) and its restore,
// eager or lazy:
//   WriteSnapshot(vm, ram, "/var/lib/vm/snap1")
//   RestoreSnapshot(vm, ram, "/var/lib/vm/snap1", {.lazy = true})
// Or the snapshot's memory served to other VMMs (Firecracker's
// userfaultfd handshake), and this VMM as one of them:
//   PageServer::Start({.snapshot_dir = ..., .socket_path = "/run/pages.sock"})
//   ConnectPageServer("/run/pages.sock", ram, on_server_lost)
//
// Dirty pages are tracked with userfaultfd write-protect on the VMM's own
// mappings, so KVM's dirty log is not needed; post-copy serves the guest's
// faults (the vCPUs' and the VMM's own accesses alike) with userfaultfd on
// those mappings: continue for memfd and hugetlb, move for anonymous
// memory. The wire protocol is docs/protocol.md's: either end may be the
// `faultline` CLI.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "faultline/ram_block.h"
#include "faultline/status.h"

namespace faultline {

// One RAM block and where the guest sees it. Create the block over the
// VMM's mapping with RamBlockOptions::host (and adopt_fd for memfd and
// hugetlb), so that what Faultline tracks and fills is what the vCPUs use.
struct GuestRegion {
  std::shared_ptr<RamBlock> block;
  uint64_t gpa = 0;
};

// What Faultline asks of the VMM, from its own threads.
class VmHandle {
 public:
  virtual ~VmHandle() = default;

  virtual uint32_t vcpu_count() const = 0;
  // No vCPU runs, and no device writes guest memory, between Pause() and
  // Resume().
  virtual void Pause() = 0;
  virtual void Resume() = 0;
  // Requires Pause(). Opaque to Faultline: the destination's LoadVcpu gets
  // exactly these bytes.
  virtual Result<std::vector<uint8_t>> SaveVcpu(uint32_t index) = 0;
  virtual Status LoadVcpu(uint32_t index, std::span<const uint8_t> state) = 0;
  // The devices' state as one blob (empty: nothing to carry).
  virtual Result<std::vector<uint8_t>> SaveDevices() { return std::vector<uint8_t>{}; }
  virtual Status LoadDevices(std::span<const uint8_t> state);
  // Destination: the state is loaded; run the guest. In post-copy, memory
  // is still arriving: the vCPUs' faults are served as they touch it.
  virtual Status Start() = 0;
};

struct MigrationOptions {
  bool postcopy = false;  // both ends must agree
  // Pre-copy: passes at most, then the switchover whatever is left.
  // Post-copy: pre-copy passes before the switchover (0: none).
  uint32_t precopy_passes = 0;  // 0 and pre-copy: 30
  uint16_t channels = 4;        // page channels (the destination takes what comes)
  // A shared secret that both ends must hold (HMAC-SHA256 challenge), of at
  // least 16 bytes (32 random bytes recommended); empty on both ends: no
  // authentication.
  std::string key;
  std::chrono::milliseconds downtime_target{50};  // pre-copy's switchover goal
  uint64_t bandwidth_limit = 0;                   // bytes/s of page data, 0: none
  std::chrono::milliseconds io_timeout{60'000};   // a silent peer is a broken link
  // TLS 1.3 on every channel of a tcp: migration, both ends' certificates
  // checked (docs/protocol.md section 8.2): a directory with ca.pem (the CA
  // that signs both ends), cert.pem and key.pem; empty: no TLS. Checked by
  // Create. `tls_peer_name`, if set: the name the peer's certificate must
  // carry (a DNS name or IP address).
  std::string tls_dir;
  std::string tls_peer_name;
  // Destination: the blocks read as zero now (made for this migration), so
  // zero pages need no write.
  bool memory_is_zero = true;
};

struct MigrationStats {
  uint32_t passes = 0;      // pre-copy passes
  uint64_t pages = 0;       // 4 KiB data pages sent or received in pre-copy
  uint64_t zero_pages = 0;  // sent or received as zero runs
  uint64_t bytes = 0;       // on the wire, both directions, framing included
  uint64_t total_us = 0;
  // Source: the guest's pause, until the destination ran it (pre-copy: the
  // destination's acknowledgement; post-copy: the switchover sent).
  uint64_t downtime_us = 0;
  // Post-copy.
  uint64_t postcopy_us = 0;      // guest running at the destination -> every page there
  uint64_t pages_pushed = 0;     // sent in the background
  uint64_t pages_requested = 0;  // asked for by the destination's faults
  uint64_t faults = 0;           // destination: guest accesses that waited for a page
  double fault_p50_us = 0;       // destination: fault to page in place
  double fault_p99_us = 0;
  uint32_t sessions = 0;  // post-copy: 1 + resumes after a broken link
};

// Where a migration is, for a progress display. Any thread.
struct MigrationProgress {
  std::string
      phase;  // "setup", "precopy", "postcopy", "paused" (link broken), "completed", "failed"
  uint32_t pass = 0;
  uint64_t pages_sent = 0;
  uint64_t pages_remaining = 0;  // post-copy: still to push
};

class OutgoingMigration {
 public:
  // `vm` and the regions' blocks must outlive the migration.
  static Result<std::unique_ptr<OutgoingMigration>> Create(VmHandle& vm,
                                                           std::vector<GuestRegion> ram,
                                                           MigrationOptions options);
  ~OutgoingMigration();

  // Connects to `address` ("tcp:HOST:PORT" or "unix:PATH") and migrates.
  // OK: the guest runs at the destination and stays paused here. An error
  // says what failed; the guest then runs here again, except in post-copy
  // after the switchover (phase "paused"), where only Resume() can finish.
  Result<MigrationStats> Run(std::string_view address);
  // Post-copy with the link broken: reconnects (the destination called
  // IncomingMigration::Resume) and sends what is still missing.
  Result<MigrationStats> Resume(std::string_view address);
  // Post-copy: switch over now instead of after precopy_passes.
  void StartPostcopy();
  // Ends Run() or Resume() with an error; before the switchover the guest
  // runs on here.
  void Cancel();
  MigrationProgress progress() const;

 private:
  struct Impl;
  explicit OutgoingMigration(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class IncomingMigration {
 public:
  // `vm` and the regions' blocks must outlive the migration.
  static Result<std::unique_ptr<IncomingMigration>> Create(VmHandle& vm,
                                                           std::vector<GuestRegion> ram,
                                                           MigrationOptions options);
  ~IncomingMigration();

  // Listens on `address` ("tcp:HOST:PORT", port 0 for any, or
  // "unix:PATH"). Returns the address bound, e.g. with the port chosen.
  Result<std::string> Listen(std::string_view address);
  // Receives the migration; VmHandle::Start() runs the guest on the way.
  // Returns once every page is here (post-copy: once paging has ended).
  Result<MigrationStats> Run();
  // Post-copy with the link broken: accepts the source's reconnection on
  // the same listener and receives the rest.
  Result<MigrationStats> Resume();
  void Cancel();
  MigrationProgress progress() const;

 private:
  struct Impl;
  explicit IncomingMigration(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

struct SnapshotOptions {
  // Copy memory while the guest runs (dirty passes), pausing it only for
  // the last pages and the state; false: pause it for the whole write.
  bool live = true;
  bool resume = true;  // the guest runs again afterwards (false: stays paused)
};

struct SnapshotStats {
  uint32_t passes = 0;      // memory passes, the paused one included
  uint64_t data_pages = 0;  // 4 KiB pages written
  uint64_t zero_pages = 0;  // pages stored as holes
  uint64_t pause_us = 0;    // the guest's pause
  uint64_t total_us = 0;
};

// Writes the guest to `dir`, which must not exist (its parent must): one
// sparse file per region's block (zero pages are holes), the vCPU and
// device state, and manifest.json (format version, layout, SHA-256 of every
// 2 MiB of memory and of every state file). Written to a temporary
// directory beside `dir` and renamed, so that a crash never leaves a
// directory that looks like a snapshot.
Result<SnapshotStats> WriteSnapshot(VmHandle& vm, std::vector<GuestRegion> ram,
                                    const std::string& dir, SnapshotOptions options = {});

struct RestoreOptions {
  // The guest starts at once and its memory is demand-paged from the
  // snapshot's files (and read in the background); false: everything is
  // read and checked first.
  bool lazy = false;
};

struct RestoreStats {
  uint64_t start_us = 0;     // until VmHandle::Start() returned
  uint64_t resident_us = 0;  // until every page was in memory
  uint64_t faults = 0;       // lazy: guest accesses that waited for a page
  uint64_t pages_read = 0;   // lazy: 4 KiB pages read on demand or in the background
};

// Restores the snapshot in `dir` into `vm` and `ram`: fresh memory (reading
// as zero) of the snapshot's layout (the same blocks, names and sizes, in
// order) and as many vCPUs. Checks the manifest, the files' sizes and the
// layout first, and, eager, every checksum: a failed check changes nothing
// and says what is wrong. Then loads the state and calls VmHandle::Start().
// Lazy: returns once every page is resident.
Result<RestoreStats> RestoreSnapshot(VmHandle& vm, std::vector<GuestRegion> ram,
                                     const std::string& dir, RestoreOptions options = {});

// A page server (docs/page_server.md): serves a snapshot's memory, on a
// Unix socket, to VMMs that hand over their userfaultfd with Firecracker's
// page-fault-handler handshake (a JSON array of regions {base_host_virt_addr,
// size, offset, page_size} with the userfaultfd attached), each with its own
// handler threads, zero pages without reading, balloon removes, and an
// optional background push. A VMM that dies is released; the others go on.
// What `faultline serve-pages --snapshot DIR` runs.
struct PageServerOptions {
  std::string snapshot_dir;
  std::string socket_path;  // created 0600; a stale socket file is replaced
  uint32_t threads = 2;     // fault handler threads per VMM
  // After each handshake, push every data page in the background; with a
  // working-set file ("OFFSET LENGTH" lines, docs/snapshot.md), its ranges
  // first, in order.
  bool prefetch = false;
  std::string prefetch_file;
};

// One VMM the server has released.
struct PageServerClient {
  uint64_t id = 0;  // in connection order, from 1
  int64_t pid = 0;  // its process (SO_PEERCRED)
  uint32_t uid = 0;
  bool served = false;  // false: its handshake was refused (`end` says why)
  std::string end;      // why it was released
  uint64_t faults = 0;
  uint64_t zero_pages = 0;
  uint64_t removes = 0;          // balloon (UFFD_EVENT_REMOVE) events
  uint64_t pages_installed = 0;  // install units, pushed ones included
  uint64_t pages_pushed = 0;
  uint64_t bytes_copied = 0;
  double seconds = 0;  // connected
};

class PageServer {
 public:
  // Opens the snapshot (and the working set), listens and starts serving.
  static Result<std::unique_ptr<PageServer>> Start(PageServerOptions options);
  ~PageServer();  // Stop()
  PageServer(const PageServer&) = delete;
  PageServer& operator=(const PageServer&) = delete;

  // Releases every VMM (their guests then wait for pages nobody serves)
  // and removes the socket file. Idempotent.
  void Stop();
  size_t active_clients() const;
  std::vector<PageServerClient> released() const;

 private:
  struct Impl;
  explicit PageServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The VMM's side: registers `ram`'s blocks (fresh: nothing written yet) on
// a new userfaultfd and hands it to the page server at `socket_path`, whose
// memory file holds the blocks back to back in order (a snapshot of the
// same layout). From then on the guest's first touch of each page is
// served by the server. If the server goes, `on_server_lost` is called
// once, at once, on a thread of the connection's: the VMM should stop its
// guest, which would otherwise wait forever. Keep the connection as long
// as the guest runs.
class PageServerConnection {
 public:
  virtual ~PageServerConnection() = default;
  virtual bool server_lost() const = 0;
};
Result<std::unique_ptr<PageServerConnection>> ConnectPageServer(
    const std::string& socket_path, std::vector<GuestRegion> ram,
    std::function<void(const Status&)> on_server_lost);

}  // namespace faultline
