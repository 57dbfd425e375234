/* The C API over Faultline's embedding API (faultline/embed.h), for VMMs
 * written in C, Rust, Go or anything else that calls C.
 *
 * Conventions:
 * - Objects are opaque handles made by fl_*_create and freed by
 *   fl_*_destroy (which accept NULL).
 * - Functions that can fail return 0 (or a handle) on success, and -1 (or
 *   NULL) on failure with *error set, if error is not NULL, to an fl_error
 *   that the caller frees with fl_error_free. The message says what went
 *   wrong and what to do.
 * - The VMM's callbacks return 0, or a positive errno value on failure.
 * - Calls on one migration object may come from any thread, but Run and
 *   Resume only from one at a time; cancel and progress from any.
 *
 * Link with pkg-config --libs faultline, or find_package(faultline) and
 * target faultline::faultline in CMake. */
#ifndef FAULTLINE_FAULTLINE_H_
#define FAULTLINE_FAULTLINE_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* --- Errors --- */

typedef struct fl_error fl_error;
/* An errno value saying what kind of failure (EINVAL, ECONNREFUSED, ...). */
int fl_error_code(const fl_error* error);
/* The message, valid until fl_error_free. */
const char* fl_error_message(const fl_error* error);
void fl_error_free(fl_error* error);

/* --- The guest's RAM, as the VMM has it mapped --- */

enum fl_backing {
  FL_BACKING_ANON = 0,    /* private anonymous memory */
  FL_BACKING_MEMFD = 1,   /* a memfd (shmem), mapped MAP_SHARED */
  FL_BACKING_HUGETLB = 2, /* a hugetlbfs memfd of 2 MiB pages, mapped MAP_SHARED */
};

typedef struct fl_region {
  const char* name; /* unique; each region must have a twin of the same
                       name, size and backing at the other end */
  uint64_t gpa;     /* where the guest sees it */
  uint64_t size;    /* bytes, a multiple of the page size */
  void* host;       /* the VMM's mapping, which its vCPUs use */
  int fd;           /* memfd and hugetlb: the file `host` maps; anon: -1 */
  enum fl_backing backing;
} fl_region;

/* --- What Faultline asks of the VMM, from its own threads --- */

typedef struct fl_vm_ops {
  void* ctx; /* passed to every callback */
  uint32_t vcpu_count;
  /* No vCPU runs, and no device writes guest memory, between pause and
   * resume. */
  void (*pause)(void* ctx);
  void (*resume)(void* ctx);
  /* After pause: vCPU `index`'s state, opaque to Faultline, in a buffer
   * allocated with malloc (Faultline frees it). */
  int (*save_vcpu)(void* ctx, uint32_t index, uint8_t** data, size_t* size);
  int (*load_vcpu)(void* ctx, uint32_t index, const uint8_t* data, size_t size);
  /* Optional (NULL: no device state): the devices' state as one blob. */
  int (*save_devices)(void* ctx, uint8_t** data, size_t* size);
  int (*load_devices)(void* ctx, const uint8_t* data, size_t size);
  /* Destination: the state is loaded; run the guest (post-copy: while its
   * memory still arrives, faults served as the vCPUs touch it). */
  int (*start)(void* ctx);
} fl_vm_ops;

/* --- Migration --- */

typedef struct fl_migration_options {
  int postcopy;            /* 0: pre-copy; 1: post-copy. Both ends agree. */
  uint32_t precopy_passes; /* pre-copy: at most (0: 30); post-copy: before the switchover */
  uint16_t channels;       /* page channels, 1..16 */
  const char* key;         /* shared secret of 16 bytes or more; NULL or "": none */
  uint32_t downtime_target_ms;
  uint64_t bandwidth_limit; /* bytes/s of page data, 0: none */
  uint32_t io_timeout_ms;   /* a silent peer is a broken link */
  int memory_is_zero;       /* destination: its RAM reads as zero now */
  /* TLS 1.3 on every channel of a tcp: migration (docs/protocol.md 8.2):
   * a directory with ca.pem, cert.pem and key.pem; NULL or "": none. And
   * the name the peer's certificate must carry; NULL or "": any. */
  const char* tls_dir;
  const char* tls_peer_name;
} fl_migration_options;

/* Fills `options` with the defaults: pre-copy, 4 channels, no key, 50 ms
 * downtime target, 60 s I/O timeout, memory_is_zero 1. */
void fl_migration_options_init(fl_migration_options* options);

typedef struct fl_migration_stats {
  uint32_t passes;
  uint64_t pages; /* 4 KiB data pages in pre-copy */
  uint64_t zero_pages;
  uint64_t bytes; /* on the wire */
  uint64_t total_us;
  uint64_t downtime_us; /* source: the guest's pause */
  uint64_t postcopy_us; /* guest running at the destination -> every page there */
  uint64_t pages_pushed;
  uint64_t pages_requested;
  uint64_t faults; /* destination: accesses that waited for a page */
  double fault_p50_us;
  double fault_p99_us;
  uint32_t sessions; /* post-copy: 1 + resumes */
} fl_migration_stats;

typedef struct fl_progress {
  char phase[16]; /* "setup", "precopy", "switchover", "postcopy", "paused",
                     "completed", "failed" */
  uint32_t pass;
  uint64_t pages_sent;
  uint64_t pages_remaining;
} fl_progress;

typedef struct fl_outgoing fl_outgoing;
typedef struct fl_incoming fl_incoming;

/* `ops` is copied; its ctx and the regions' mappings must outlive the
 * migration. */
fl_outgoing* fl_outgoing_create(const fl_vm_ops* ops, const fl_region* regions, size_t count,
                                const fl_migration_options* options, fl_error** error);
/* Connects to `address` ("tcp:HOST:PORT" or "unix:PATH") and migrates. 0:
 * the guest runs at the destination and stays paused here. -1: see
 * embed.h's OutgoingMigration::Run for who runs the guest. `stats` may be
 * NULL. */
int fl_outgoing_run(fl_outgoing* migration, const char* address, fl_migration_stats* stats,
                    fl_error** error);
/* Post-copy with the link broken: reconnects and finishes. */
int fl_outgoing_resume(fl_outgoing* migration, const char* address, fl_migration_stats* stats,
                       fl_error** error);
void fl_outgoing_start_postcopy(fl_outgoing* migration);
void fl_outgoing_cancel(fl_outgoing* migration);
void fl_outgoing_progress(const fl_outgoing* migration, fl_progress* progress);
void fl_outgoing_destroy(fl_outgoing* migration);

fl_incoming* fl_incoming_create(const fl_vm_ops* ops, const fl_region* regions, size_t count,
                                const fl_migration_options* options, fl_error** error);
/* Listens on `address` (TCP port 0: any free port); the address bound is
 * written to `bound` (NUL-terminated, truncated to bound_size) if not NULL. */
int fl_incoming_listen(fl_incoming* migration, const char* address, char* bound, size_t bound_size,
                       fl_error** error);
/* Receives the migration; ops->start runs the guest on the way. Returns
 * once every page is here. */
int fl_incoming_run(fl_incoming* migration, fl_migration_stats* stats, fl_error** error);
/* Post-copy with the link broken: accepts the source's reconnection. */
int fl_incoming_resume(fl_incoming* migration, fl_migration_stats* stats, fl_error** error);
void fl_incoming_cancel(fl_incoming* migration);
void fl_incoming_progress(const fl_incoming* migration, fl_progress* progress);
void fl_incoming_destroy(fl_incoming* migration);

/* --- Snapshots (embed.h's WriteSnapshot and RestoreSnapshot) --- */

typedef struct fl_snapshot_stats {
  uint32_t passes;     /* memory passes, the paused one included */
  uint64_t data_pages; /* 4 KiB pages written */
  uint64_t zero_pages; /* pages stored as holes */
  uint64_t pause_us;   /* the guest's pause */
  uint64_t total_us;
} fl_snapshot_stats;

typedef struct fl_restore_stats {
  uint64_t start_us;    /* until ops->start returned */
  uint64_t resident_us; /* until every page was in memory */
  uint64_t faults;      /* lazy: accesses that waited for a page */
  uint64_t pages_read;  /* lazy: pages read on demand or in the background */
} fl_restore_stats;

/* Writes the guest to `dir` (which must not exist). `live`: copy while the
 * guest runs, pausing it only at the end; `resume`: let it run again
 * afterwards. `stats` may be NULL. */
int fl_snapshot_write(const fl_vm_ops* ops, const fl_region* regions, size_t count, const char* dir,
                      int live, int resume, fl_snapshot_stats* stats, fl_error** error);
/* Restores `dir` into fresh RAM of the snapshot's layout, checking it first
 * (a failed check changes nothing), then calls ops->start. `lazy`: the
 * guest starts at once and its pages are read on demand; returns once
 * every page is resident. */
int fl_snapshot_restore(const fl_vm_ops* ops, const fl_region* regions, size_t count,
                        const char* dir, int lazy, fl_restore_stats* stats, fl_error** error);

/* --- The page server (embed.h's PageServer and ConnectPageServer) --- */

typedef struct fl_page_server fl_page_server;
/* Serves the snapshot in `snapshot_dir` on the Unix socket `socket_path`
 * (created 0600) to VMMs that hand over their userfaultfd with
 * Firecracker's handshake, `threads` handler threads each (0: 2), until
 * fl_page_server_destroy. `prefetch`: push every data page after each
 * handshake; `prefetch_file` (may be NULL): a working set to push first. */
fl_page_server* fl_page_server_create(const char* snapshot_dir, const char* socket_path,
                                      uint32_t threads, int prefetch, const char* prefetch_file,
                                      fl_error** error);
/* VMMs connected and not yet released. */
size_t fl_page_server_active_clients(const fl_page_server* server);
/* Releases every VMM, removes the socket and frees the server. */
void fl_page_server_destroy(fl_page_server* server);

typedef struct fl_page_client fl_page_client;
/* The VMM's side: registers `regions` (fresh: nothing written yet; laid
 * back to back in order, they are the server's memory file) on a new
 * userfaultfd and hands it to the server at `socket_path`. If the server
 * goes, `on_lost(ctx, message)` is called once, at once, from a thread of
 * the connection's (may be NULL): stop the guest, which would otherwise
 * wait forever. Keep the client while the guest runs. */
fl_page_client* fl_page_client_connect(const char* socket_path, const fl_region* regions,
                                       size_t count,
                                       void (*on_lost)(void* ctx, const char* message), void* ctx,
                                       fl_error** error);
int fl_page_client_server_lost(const fl_page_client* client);
void fl_page_client_destroy(fl_page_client* client);

#ifdef __cplusplus
}
#endif

#endif /* FAULTLINE_FAULTLINE_H_ */
