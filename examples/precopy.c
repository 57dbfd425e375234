/* A VMM written in C, live-migrating with pre-copy through Faultline's C
 * API (faultline/faultline.h).
 *
 * The "guest" is anonymous memory that a writer thread (its one "vCPU")
 * keeps changing. The program forks: the child receives, the parent sends
 * over a Unix socket while the writer runs. Pre-copy passes resend what the
 * writer dirtied, then the writer is paused, its state (a counter) moves,
 * and the child's copy must hash to the parent's.
 *
 * Built against the installed package only (pkg-config faultline, or
 * find_package(faultline)).
 *   precopy [MiB]          exit 0: verified */
#define _GNU_SOURCE /* MAP_ANONYMOUS, usleep */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <faultline/faultline.h>

struct vmm {
  uint8_t* memory;
  uint64_t size;
  pthread_t writer;
  atomic_int paused, parked, stop;
  uint64_t counter; /* the vCPU's state */
};

static void* writer_main(void* arg) {
  struct vmm* vm = arg;
  while (!atomic_load(&vm->stop)) {
    if (atomic_load(&vm->paused)) {
      atomic_store(&vm->parked, 1);
      while (atomic_load(&vm->paused) && !atomic_load(&vm->stop)) sched_yield();
      atomic_store(&vm->parked, 0);
      continue;
    }
    /* A page chosen from the counter, stamped with it. */
    uint64_t page = (vm->counter * 2654435761u) % (vm->size / 4096);
    ++vm->counter;
    memcpy(vm->memory + page * 4096, &vm->counter, sizeof vm->counter);
  }
  return NULL;
}

static void vm_pause(void* ctx) {
  struct vmm* vm = ctx;
  atomic_store(&vm->paused, 1);
  while (!atomic_load(&vm->parked)) sched_yield();
}
static void vm_resume(void* ctx) { atomic_store(&((struct vmm*)ctx)->paused, 0); }
static int vm_save_vcpu(void* ctx, uint32_t index, uint8_t** data, size_t* size) {
  struct vmm* vm = ctx;
  (void)index;
  if ((*data = malloc(sizeof vm->counter)) == NULL) return 12; /* ENOMEM */
  memcpy(*data, &vm->counter, sizeof vm->counter);
  *size = sizeof vm->counter;
  return 0;
}
static int vm_load_vcpu(void* ctx, uint32_t index, const uint8_t* data, size_t size) {
  struct vmm* vm = ctx;
  (void)index;
  if (size != sizeof vm->counter) return 22; /* EINVAL */
  memcpy(&vm->counter, data, size);
  return 0;
}
static int vm_start(void* ctx) {
  (void)ctx; /* the guest would run here; this one is checked instead */
  return 0;
}

static uint64_t hash(const uint8_t* p, uint64_t n) {
  uint64_t h = 1469598103934665603ull;
  for (uint64_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

static void setup(struct vmm* vm, uint64_t size, fl_vm_ops* ops, fl_region* region,
                  fl_migration_options* options) {
  memset(vm, 0, sizeof *vm);
  vm->size = size;
  vm->memory = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (vm->memory == MAP_FAILED) exit(2);
  memset(ops, 0, sizeof *ops);
  ops->ctx = vm;
  ops->vcpu_count = 1;
  ops->pause = vm_pause;
  ops->resume = vm_resume;
  ops->save_vcpu = vm_save_vcpu;
  ops->load_vcpu = vm_load_vcpu;
  ops->start = vm_start;
  *region = (fl_region){"ram", 0, size, vm->memory, -1, FL_BACKING_ANON};
  fl_migration_options_init(options);
  options->key = "an example secret, 32 bytes long";
}

static int fail(const char* who, fl_error* error) {
  fprintf(stderr, "%s: %s\n", who, fl_error_message(error));
  fl_error_free(error);
  return 1;
}

int main(int argc, char** argv) {
  const uint64_t size = (argc > 1 ? strtoull(argv[1], NULL, 10) : 64) << 20;
  char address[128];
  snprintf(address, sizeof address, "unix:/tmp/faultline-precopy-example-%d.sock", (int)getpid());
  int to_parent[2];
  if (pipe(to_parent) != 0) return 2;
  struct vmm vm;
  fl_vm_ops ops;
  fl_region region;
  fl_migration_options options;
  fl_error* error = NULL;
  fl_migration_stats stats;

  pid_t child = fork();
  if (child == 0) {
    setup(&vm, size, &ops, &region, &options);
    fl_incoming* in = fl_incoming_create(&ops, &region, 1, &options, &error);
    if (in == NULL || fl_incoming_listen(in, address, NULL, 0, &error) != 0) {
      _exit(fail("destination", error));
    }
    char ready = 1;
    (void)!write(to_parent[1], &ready, 1);
    if (fl_incoming_run(in, &stats, &error) != 0) _exit(fail("destination", error));
    uint64_t h[2] = {hash(vm.memory, size), vm.counter};
    (void)!write(to_parent[1], h, sizeof h);
    printf("destination: %u passes, %llu pages, %llu zero pages, %.1f ms\n", stats.passes,
           (unsigned long long)stats.pages, (unsigned long long)stats.zero_pages,
           stats.total_us / 1000.0);
    fl_incoming_destroy(in);
    fflush(stdout);
    _exit(0);
  }
  char ready;
  if (read(to_parent[0], &ready, 1) != 1) return 2;

  setup(&vm, size, &ops, &region, &options);
  fl_outgoing* out = fl_outgoing_create(&ops, &region, 1, &options, &error);
  if (out == NULL) return fail("source", error);
  pthread_create(&vm.writer, NULL, writer_main, &vm);
  usleep(100 * 1000);
  int sent = fl_outgoing_run(out, address, &stats, &error);
  atomic_store(&vm.stop, 1); /* paused since the switchover */
  pthread_join(vm.writer, NULL);
  if (sent != 0) return fail("source", error);
  uint64_t there[2] = {0, 0};
  const int got = read(to_parent[0], there, sizeof there) == sizeof there;
  const int same = got && there[0] == hash(vm.memory, size) && there[1] == vm.counter;
  int status = 0;
  waitpid(child, &status, 0);
  printf(
      "source: %llu MiB, %u passes, %llu writes, paused %.2f ms, total %.1f ms; memory and "
      "state %s\n",
      (unsigned long long)(size >> 20), stats.passes, (unsigned long long)vm.counter,
      stats.downtime_us / 1000.0, stats.total_us / 1000.0, same ? "identical" : "DIFFER");
  fl_outgoing_destroy(out);
  return same && WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
