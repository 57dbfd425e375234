/* The C API driven from C: a pre-copy or post-copy migration between two
 * "VMMs" in this process (the destination in a thread) over a Unix socket,
 * of memory a thread keeps writing until pause. Compiled as C, so the
 * header is checked as C too. Called from c_api_test.cc. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "faultline/faultline.h"

enum { kSize = 8 << 20 };

struct vm {
  uint8_t* memory;
  pthread_t writer;
  atomic_int paused, parked, stop, started;
  uint64_t counter;
};

static void* writer_main(void* arg) {
  struct vm* vm = arg;
  uint64_t offset = 0;
  while (!atomic_load(&vm->stop)) {
    if (atomic_load(&vm->paused)) {
      atomic_store(&vm->parked, 1);
      while (atomic_load(&vm->paused) && !atomic_load(&vm->stop)) sched_yield();
      atomic_store(&vm->parked, 0);
      continue;
    }
    ++vm->counter;
    memcpy(vm->memory + offset, &vm->counter, sizeof vm->counter);
    offset = (offset + 4096 + 8) % (kSize - 8);
  }
  return NULL;
}

/* Puts `error` (if any) into `why`, and frees it. */
static void describe(fl_error* error, char* why, size_t why_size) {
  if (error == NULL) return;
  snprintf(why, why_size, "%s (errno %d)", fl_error_message(error), fl_error_code(error));
  fl_error_free(error);
}

/* Starts the writer and waits for its first write, so that a pause that
 * comes at once still finds state to carry (a counter above 0). */
static void start_writer(struct vm* vm) {
  pthread_create(&vm->writer, NULL, writer_main, vm);
  while (__atomic_load_n(&vm->counter, __ATOMIC_RELAXED) == 0) sched_yield();
}

static void vm_pause(void* ctx) {
  struct vm* vm = ctx;
  atomic_store(&vm->paused, 1);
  while (!atomic_load(&vm->parked)) sched_yield();
}
static void vm_resume(void* ctx) { atomic_store(&((struct vm*)ctx)->paused, 0); }
static int vm_save_vcpu(void* ctx, uint32_t index, uint8_t** data, size_t* size) {
  struct vm* vm = ctx;
  if (index != 0) return EINVAL;
  *data = malloc(sizeof vm->counter);
  if (*data == NULL) return ENOMEM;
  memcpy(*data, &vm->counter, sizeof vm->counter);
  *size = sizeof vm->counter;
  return 0;
}
static int vm_load_vcpu(void* ctx, uint32_t index, const uint8_t* data, size_t size) {
  struct vm* vm = ctx;
  if (index != 0 || size != sizeof vm->counter) return EINVAL;
  memcpy(&vm->counter, data, size);
  return 0;
}
static int vm_start(void* ctx) {
  atomic_store(&((struct vm*)ctx)->started, 1);
  return 0;
}

static fl_vm_ops ops_for(struct vm* vm) {
  fl_vm_ops ops = {0};
  ops.ctx = vm;
  ops.vcpu_count = 1;
  ops.pause = vm_pause;
  ops.resume = vm_resume;
  ops.save_vcpu = vm_save_vcpu;
  ops.load_vcpu = vm_load_vcpu;
  ops.start = vm_start;
  return ops;
}

struct receive {
  fl_incoming* incoming;
  int result;
  fl_error* error;
};

static void* receive_main(void* arg) {
  struct receive* r = arg;
  r->result = fl_incoming_run(r->incoming, NULL, &r->error);
  return NULL;
}

/* 0 if the memory and the vCPU state arrived intact; else -1 with the
 * reason in `why`. */
int fl_c_api_roundtrip(int postcopy, char* why, size_t why_size) {
  struct vm source = {0}, destination = {0};
  source.memory = mmap(NULL, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  destination.memory =
      mmap(NULL, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  fl_region from = {"ram", 0, kSize, source.memory, -1, FL_BACKING_ANON};
  fl_region to = {"ram", 0, kSize, destination.memory, -1, FL_BACKING_ANON};
  fl_migration_options options;
  fl_migration_options_init(&options);
  options.postcopy = postcopy;
  options.precopy_passes = 1;
  options.channels = 2;
  options.key = "a secret the C side shares";
  fl_vm_ops source_ops = ops_for(&source), destination_ops = ops_for(&destination);
  fl_error* error = NULL;
  int status = -1;
  char address[128], bound[128];
  snprintf(address, sizeof address, "unix:/tmp/faultline-c-api-%d-%d.sock", (int)getpid(),
           postcopy);

  fl_incoming* incoming = fl_incoming_create(&destination_ops, &to, 1, &options, &error);
  fl_outgoing* outgoing = NULL;
  if (incoming == NULL || fl_incoming_listen(incoming, address, bound, sizeof bound, &error)) {
    goto out;
  }
  outgoing = fl_outgoing_create(&source_ops, &from, 1, &options, &error);
  if (outgoing == NULL) goto out;
  start_writer(&source);
  struct receive r = {incoming, -1, NULL};
  pthread_t receiver;
  pthread_create(&receiver, NULL, receive_main, &r);
  fl_migration_stats stats;
  int sent = fl_outgoing_run(outgoing, bound, &stats, &error);
  pthread_join(receiver, NULL);
  atomic_store(&source.stop, 1);
  pthread_join(source.writer, NULL);
  if (sent == 0 && r.result != 0) {
    error = r.error;
    r.error = NULL;
  }
  fl_error_free(r.error); /* the source's error says more */
  if (error != NULL) goto out;
  fl_progress progress;
  fl_outgoing_progress(outgoing, &progress);
  if (strcmp(progress.phase, "completed") != 0) {
    snprintf(why, why_size, "source phase '%s', not completed", progress.phase);
  } else if (!atomic_load(&destination.started)) {
    snprintf(why, why_size, "the destination was not started");
  } else if (destination.counter != source.counter || source.counter == 0) {
    snprintf(why, why_size, "vCPU state %llu arrived as %llu", (unsigned long long)source.counter,
             (unsigned long long)destination.counter);
  } else if (memcmp(source.memory, destination.memory, kSize) != 0) {
    snprintf(why, why_size, "the memory differs");
  } else {
    status = 0;
  }
out:
  describe(error, why, why_size);
  fl_outgoing_destroy(outgoing);
  fl_incoming_destroy(incoming);
  munmap(source.memory, kSize);
  munmap(destination.memory, kSize);
  return status;
}

/* A live snapshot of memory the writer keeps writing, restored (eagerly, or
 * lazily) into a second "VMM": 0 if the memory and the vCPU state are
 * intact; else -1 with the reason in `why`. */
int fl_c_api_snapshot(int lazy, char* why, size_t why_size) {
  struct vm source = {0}, restored = {0};
  source.memory = mmap(NULL, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  restored.memory = mmap(NULL, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  fl_region from = {"ram", 0, kSize, source.memory, -1, FL_BACKING_ANON};
  fl_region to = {"ram", 0, kSize, restored.memory, -1, FL_BACKING_ANON};
  fl_vm_ops source_ops = ops_for(&source), restored_ops = ops_for(&restored);
  fl_error* error = NULL;
  int status = -1;
  char root[] = "/tmp/faultline-c-snapshot-XXXXXX", dir[64];
  if (mkdtemp(root) == NULL) {
    snprintf(why, why_size, "mkdtemp: %s", strerror(errno));
    goto unmap;
  }
  snprintf(dir, sizeof dir, "%s/snap", root);
  start_writer(&source);
  fl_snapshot_stats written;
  int wrote =
      fl_snapshot_write(&source_ops, &from, 1, dir, /*live=*/1, /*resume=*/0, &written, &error);
  atomic_store(&source.stop, 1);
  pthread_join(source.writer, NULL);
  if (wrote != 0) goto out;
  fl_restore_stats stats;
  if (fl_snapshot_restore(&restored_ops, &to, 1, dir, lazy, &stats, &error) != 0) goto out;
  if (!atomic_load(&restored.started)) {
    snprintf(why, why_size, "the restored VM was not started");
  } else if (restored.counter != source.counter || source.counter == 0) {
    snprintf(why, why_size, "vCPU state %llu restored as %llu", (unsigned long long)source.counter,
             (unsigned long long)restored.counter);
  } else if (memcmp(source.memory, restored.memory, kSize) != 0) {
    snprintf(why, why_size, "the memory differs");
  } else if (written.passes < 1 || (lazy && stats.pages_read == 0)) {
    snprintf(why, why_size, "figures: %u passes, %llu pages read", written.passes,
             (unsigned long long)stats.pages_read);
  } else {
    status = 0;
  }
out:
  describe(error, why, why_size);
  {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    if (system(cmd) != 0) status = -1;
  }
unmap:
  munmap(source.memory, kSize);
  munmap(restored.memory, kSize);
  return status;
}

static void on_lost(void* ctx, const char* message) {
  (void)message;
  atomic_store((atomic_int*)ctx, 1);
}

/* A snapshot served by fl_page_server to fresh memory connected with
 * fl_page_client: every byte arrives on first touch, and destroying the
 * server tells the client. */
int fl_c_api_page_server(char* why, size_t why_size) {
  struct vm source = {0};
  source.memory = mmap(NULL, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  void* served = mmap(NULL, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  fl_region from = {"ram", 0, kSize, source.memory, -1, FL_BACKING_ANON};
  fl_region to = {"ram", 0, kSize, served, -1, FL_BACKING_ANON};
  fl_vm_ops source_ops = ops_for(&source);
  fl_error* error = NULL;
  fl_page_server* server = NULL;
  fl_page_client* client = NULL;
  atomic_int lost = 0;
  int status = -1;
  char root[] = "/tmp/faultline-c-pages-XXXXXX", dir[64], socket[64];
  if (mkdtemp(root) == NULL) {
    snprintf(why, why_size, "mkdtemp: %s", strerror(errno));
    goto unmap;
  }
  snprintf(dir, sizeof dir, "%s/snap", root);
  snprintf(socket, sizeof socket, "%s/pages.sock", root);
  start_writer(&source);
  int wrote = fl_snapshot_write(&source_ops, &from, 1, dir, /*live=*/0, /*resume=*/0, NULL, &error);
  atomic_store(&source.stop, 1);
  pthread_join(source.writer, NULL);
  if (wrote != 0) goto out;
  server = fl_page_server_create(dir, socket, 2, /*prefetch=*/0, NULL, &error);
  if (server == NULL) goto out;
  client = fl_page_client_connect(socket, &to, 1, on_lost, &lost, &error);
  if (client == NULL) goto out;
  if (memcmp(source.memory, served, kSize) != 0) {
    snprintf(why, why_size, "the served memory differs");
    goto out;
  }
  fl_page_server_destroy(server);
  server = NULL;
  for (int i = 0; i < 500 && !atomic_load(&lost); ++i) usleep(10000);
  if (!atomic_load(&lost) || !fl_page_client_server_lost(client)) {
    snprintf(why, why_size, "the client did not notice the server go");
    goto out;
  }
  status = 0;
out:
  describe(error, why, why_size);
  fl_page_client_destroy(client);
  fl_page_server_destroy(server);
  {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    if (system(cmd) != 0) status = -1;
  }
unmap:
  munmap(source.memory, kSize);
  munmap(served, kSize);
  return status;
}
