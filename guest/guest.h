/*
 * Internals of the Faultline test guest, shared by its C and assembly
 * sources. The contract with the VMM is abi.h; the constants below that
 * repeat it (the assembler cannot read abi.h) are checked against it in
 * lib.c.
 *
 * Execution model: boot.S runs at CPL0 (entered through multiboot or through
 * fl_image_header.entry64), then every vCPU runs fl_main() at CPL3 on its own
 * user stack with IOPL=3. A vCPU writes only its own struct guest_vcpu, its
 * own region of RAM and its own kernel structures (TSS, IDT, stacks); the GDT
 * is shared but each vCPU writes only its own TSS descriptor in it.
 */
#ifndef FAULTLINE_GUEST_GUEST_H_
#define FAULTLINE_GUEST_GUEST_H_

#define GUEST_MAX_VCPUS 8
#define GUEST_PAGE_TABLES 0x10000
#define GUEST_IMAGE_MAGIC 0x464c5447
#define GUEST_IMAGE_VERSION 1
#define GUEST_PORT_EXIT 0xf4

#define GUEST_EXIT_OK 0
#define GUEST_EXIT_BAD_PAGES 1
#define GUEST_EXIT_BAD_PARAMS 2
#define GUEST_EXIT_EXCEPTION 3

/* Selectors of the guest's own GDT (boot.S). */
#define GUEST_KERNEL_CS 0x08
#define GUEST_KERNEL_DS 0x10
#define GUEST_USER_DS 0x18
#define GUEST_USER_CS 0x20
#define GUEST_TSS_SEL0 0x28 /* vCPU i's TSS descriptor: GUEST_TSS_SEL0 + 16 * i */

#define GUEST_KSTACK_SHIFT 13 /* 8 KiB kernel stack per vCPU (exceptions) */
#define GUEST_USTACK_SHIFT 14 /* 16 KiB user stack per vCPU (the workload) */
/*
 * A vCPU's TSS: 104 bytes, then an I/O permission bitmap that allows every
 * port, then the 0xff byte the CPU needs after it. IOPL=3 already allows
 * port I/O at CPL3 on hardware; PVM does not keep IOPL for user mode and
 * checks this bitmap instead when it emulates the trapped IN/OUT.
 */
#define GUEST_TSS_IOMAP 104
#define GUEST_TSS_LIMIT (GUEST_TSS_IOMAP + 8192) /* the terminating 0xff byte */
#define GUEST_TSS_SIZE 0x2080                    /* > GUEST_TSS_LIMIT, 16-byte multiple */
#define GUEST_IDT_VECTORS 32                     /* the exceptions */

#define MB_HEADER_MAGIC 0x1BADB002
#define MB_HEADER_FLAGS 0x00010003 /* page-aligned modules, memory info, address fields */
#define MB_BOOT_MAGIC 0x2BADB002

#ifndef __ASSEMBLER__

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "abi.h"

#define GUEST_MAX_PHASES 32
#define GUEST_MAX_EXCLUDED 8
#define GUEST_PHASE_TRIPLEFAULT 100 /* not an fl_phase: the guest never reports it */
#define GUEST_2M (2ull << 20)

static inline void io_outb(uint16_t port, uint8_t value) {
  __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port) : "memory");
}
static inline void io_outl(uint16_t port, uint32_t value) {
  __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port) : "memory");
}
static inline uint32_t io_inl(uint16_t port) {
  uint32_t value;
  __asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"(port) : "memory");
  return value;
}
/* The memory clobber keeps the compiler from moving page accesses across a
 * timestamp, so that the time of an op covers the op. */
static inline uint64_t rdtsc(void) {
  uint32_t lo, hi;
  __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi) : : "memory");
  return ((uint64_t)hi << 32) | lo;
}
static inline void cpu_pause(void) { __asm__ volatile("pause" : : : "memory"); }

/* Options from the command line (config.c). */
struct guest_config {
  uint32_t phases[GUEST_MAX_PHASES]; /* enum fl_phase or GUEST_PHASE_TRIPLEFAULT */
  uint32_t phase_count;
  uint32_t gen; /* generation of the first fill */
  uint64_t seed;
  uint64_t rate_mibps; /* random: 0 = unthrottled */
  uint64_t duration_ms;
  uint64_t ops;
  uint64_t hot_pages;
  uint64_t hot_ops; /* hotset: writes, whatever ends the other phases; 0: as they */
  uint64_t hot_stride; /* hotset: every Nth page is hot (0 or 1: consecutive pages) */
  uint64_t tsc_khz;
  uint64_t skip_start, skip_end; /* GPA window excluded from every phase; empty if equal */
  uint64_t probe_gpa;            /* 0: no probe */
  uint32_t probe_gen;
  bool has_duration, has_ops, until_command, quiet;
};

/* A half-open range [start, end), of GPAs or of page indices. */
struct guest_range {
  uint64_t start, end;
};

/* Everything one vCPU owns. Only that vCPU writes it. */
struct guest_vcpu {
  uint32_t index, count;
  struct guest_config cfg;
  uint64_t mem_end;
  uint64_t region_start, region_end;               /* the ledger, then the workload pages */
  uint64_t first_page;                             /* GPA of workload page 0 */
  uint64_t pages;                                  /* workload pages, excluded ones included */
  uint64_t included_pages;                         /* those the phases touch */
  uint32_t* ledger;                                /* generation of each workload page */
  struct guest_range excluded[GUEST_MAX_EXCLUDED]; /* page indices, sorted, disjoint */
  uint32_t excluded_count;
  uint64_t rng;
  uint32_t next_gen; /* generation the next fill writes */
  uint32_t max_gen;  /* highest generation written so far */
  uint32_t phases_done;
  uint64_t pages_verified, bad_pages, max_stall;
  struct fl_report_hello hello;
  struct fl_report_phase phase;
  struct fl_report_bad_page bad;
  struct fl_report_done done;
} __attribute__((aligned(64)));

/* Multiboot v1 information, the fields the guest reads. */
struct mb_info {
  uint32_t flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
  uint32_t syms[4];
  uint32_t mmap_length, mmap_addr;
};
#define MB_INFO_MEM (1u << 0)
#define MB_INFO_CMDLINE (1u << 2)
#define MB_INFO_MMAP (1u << 6)

/* lib.c */
void* memset(void* dst, int c, size_t n);
void* memcpy(void* dst, const void* src, size_t n);
void guest_format(char* out, size_t size, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));
void guest_print(uint32_t vcpu, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
bool guest_parse_u64(const char* s, size_t n, uint64_t* out);
void guest_report_init(struct fl_report_header* h, uint16_t kind, uint32_t vcpu, uint32_t size);
void guest_send_report(const void* report);
void guest_exit(uint8_t code) __attribute__((noreturn));
void fl_panic(uint64_t vector, uint64_t error, uint64_t rip, uint64_t rsp, uint64_t cr2,
              uint64_t vcpu) __attribute__((noreturn));

/* multiboot.c */
uint64_t guest_mem_end(const struct mb_info* mbi);
const char* guest_cmdline(const struct mb_info* mbi);
int guest_ram_gaps(const struct mb_info* mbi, struct guest_range within, struct guest_range* out,
                   int max);
void fl_boot_map_ram(uint32_t mbi);

/* config.c */
bool guest_parse_config(struct guest_config* cfg, const char* cmdline, uint32_t vcpu);
const char* guest_phase_name(uint32_t phase);

/* workload.c */
uint64_t guest_next_included(const struct guest_vcpu* v, uint64_t page);
void guest_run_phase(struct guest_vcpu* v, uint32_t phase);
bool guest_self_check(uint64_t gpa);

/* main.c */
void fl_main(uint64_t mbi, uint64_t index, uint64_t count) __attribute__((noreturn));

/* boot.S: set by vCPU i at CPL3; its next exception then shuts the machine
 * down instead of reporting (the triplefault phase). */
extern volatile uint8_t fl_triple_fault_armed[GUEST_MAX_VCPUS];

/* guest.ld */
extern char fl_image_end[];

#endif /* __ASSEMBLER__ */
#endif /* FAULTLINE_GUEST_GUEST_H_ */
