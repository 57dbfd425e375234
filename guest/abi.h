/*
 * The contract between the Faultline test guest and the VMM that runs it.
 * Valid C (the guest) and C++ (the VMM). Every struct here is laid out with
 * fixed-size fields; the VMM reads them from guest memory.
 *
 * Boot
 *   The image is an ELF file with a multiboot v1 header in its first 8 KiB,
 *   immediately followed by struct fl_image_header. A multiboot loader (QEMU
 *   -kernel) enters the 32-bit entry and the stub does everything. The
 *   Faultline VMM instead starts every vCPU at fl_image_header.entry64 in this
 *   state:
 *     - long mode, CPL0, CS = 64-bit code segment, DS/ES/SS flat data,
 *       CR0.PE|PG, CR4.PAE, EFER.LME|LMA, RFLAGS = 0x2 (interrupts off);
 *     - CR3 = FL_PAGE_TABLES_GPA, page tables identity-mapping all RAM with
 *       2 MiB pages: PML4 at +0, PDPT at +4 KiB, page directories from +8 KiB,
 *       one per GiB; every entry present, writable and user (U/S=1: the
 *       workload runs at CPL3 and uses these tables as they are);
 *     - RDI = GPA of a multiboot information structure (flags MEM, CMDLINE,
 *       MMAP), RSI = this vCPU's index, RDX = number of vCPUs.
 *   The stub at entry64 loads its own GDT, TSS and IDT and drops to CPL3 with
 *   IOPL=3 and interrupts off; the workload runs at CPL3. Each TSS also has an
 *   I/O permission bitmap allowing every port, because PVM does not keep
 *   IOPL for user mode. The guest never enables interrupts and programs no
 *   interrupt controller; a stray interrupt (vectors >= 32 lie beyond its IDT)
 *   ends in FL_REPORT_PANIC with vector 13.
 *
 * Reports
 *   The guest reports through port I/O: text on the serial port, structured
 *   results as a 32-bit OUT of the GPA of a report (below 4 GiB) to
 *   FL_PORT_REPORT. Every report starts with struct fl_report_header. A vCPU
 *   ends with FL_REPORT_DONE and then an 8-bit OUT of its exit code to
 *   FL_PORT_EXIT (QEMU's isa-debug-exit port) and never runs again.
 *
 * Commands
 *   Open-ended phases (random, hotset with until_command=1) poll FL_PORT_COMMAND
 *   with a 32-bit IN; FL_CMD_STOP ends the phase. Any other value continues.
 *
 * Page contents
 *   Every workload page holds generation g of its contents, computed by
 *   fl_page_word(); generation 0 means the page must read as zeros.
 *   probe=GPA probe_gen=G makes random and hotset read word 1 of the page at
 *   GPA every 16 ops, expecting generation G or all ones (see
 *   fl_report_phase): for tests that punch and fill a hole there. Each vCPU
 *   keeps a ledger (one uint32_t generation per page of its region, inside
 *   its region) so that verify knows every page's expected generation.
 */
#ifndef FAULTLINE_GUEST_ABI_H_
#define FAULTLINE_GUEST_ABI_H_

#include <stdint.h>

#define FL_PORT_SERIAL 0x3f8
#define FL_PORT_REPORT 0x510
#define FL_PORT_COMMAND 0x514
#define FL_PORT_EXIT 0xf4

#define FL_CMD_NONE 0u
#define FL_CMD_STOP 1u

/* Guest-physical layout (low memory is reserved for boot structures). */
#define FL_BOOT_GDT_GPA 0x1000ull
#define FL_BOOT_INFO_GPA 0x8000ull /* multiboot info written by the VMM */
#define FL_BOOT_MMAP_GPA 0x8800ull /* its memory map */
#define FL_CMDLINE_GPA 0x9000ull   /* its command line, NUL-terminated */
#define FL_CMDLINE_MAX 0x1000u
#define FL_PAGE_TABLES_GPA 0x10000ull /* 2 + FL_MAX_RAM_GIB pages */
#define FL_IMAGE_BASE 0x100000ull     /* where the image is linked */
#define FL_MAX_RAM_GIB 64u
#define FL_MAX_VCPUS 8u

#define FL_PAGE_SIZE 4096ull

#define FL_IMAGE_MAGIC 0x464c5447u /* "GTLF" little-endian: 'G','T','L','F' */
#define FL_IMAGE_VERSION 1u

/* Follows the multiboot header in the image. */
struct fl_image_header {
  uint32_t magic;     /* FL_IMAGE_MAGIC */
  uint32_t version;   /* FL_IMAGE_VERSION */
  uint64_t entry64;   /* GPA of the 64-bit entry point */
  uint64_t image_end; /* first GPA after the image including bss */
};

#define FL_REPORT_MAGIC 0x52504c46u /* "FLPR" */

enum fl_report_kind {
  FL_REPORT_HELLO = 1,    /* struct fl_report_hello */
  FL_REPORT_PHASE = 2,    /* struct fl_report_phase: a phase finished */
  FL_REPORT_BAD_PAGE = 3, /* struct fl_report_bad_page */
  FL_REPORT_DONE = 4,     /* struct fl_report_done: the vCPU is finished */
  FL_REPORT_PANIC = 5,    /* struct fl_report_panic: CPU exception */
};

enum fl_phase {
  FL_PHASE_FILL = 1,   /* write generation `gen` to every page */
  FL_PHASE_VERIFY = 2, /* check every page against the ledger */
  FL_PHASE_RANDOM = 3, /* random page writes at `rate` MiB/s, ledger kept */
  FL_PHASE_HOTSET = 4, /* rewrite a working set of `hot_pages` pages */
  FL_PHASE_TOUCH = 5,  /* read one word of every page */
};

struct fl_report_header {
  uint32_t magic; /* FL_REPORT_MAGIC */
  uint16_t kind;  /* enum fl_report_kind */
  uint16_t vcpu;
  uint32_t size; /* of the whole report, header included */
  uint32_t reserved;
};

struct fl_report_hello {
  struct fl_report_header header;
  uint64_t mem_end;      /* first GPA after RAM as the guest sees it */
  uint64_t region_start; /* this vCPU's workload region */
  uint64_t region_end;
  uint64_t ledger_gpa; /* its ledger, inside the region */
  uint64_t pages;      /* workload pages in the region (ledger excluded) */
  uint64_t first_page_gpa;
};

#define FL_HIST_BUCKETS 48 /* bucket b counts ops with 2^b <= cycles < 2^(b+1) */

struct fl_report_phase {
  struct fl_report_header header;
  uint32_t phase;      /* enum fl_phase */
  uint32_t generation; /* generation written (fill) or highest seen */
  uint64_t ops;        /* pages written, verified or touched */
  uint64_t pages_verified;
  uint64_t bad_pages;
  uint64_t tsc_start;
  uint64_t tsc_end;
  uint64_t max_stall_cycles; /* longest gap between consecutive ops */
  uint64_t checksum;         /* sum of word 1 of every page verified */
  uint64_t hist[FL_HIST_BUCKETS];
  /* With probe=GPA (random and hotset): reads of word 1 of the probe page,
   * by what they returned: the page's content (generation probe_gen), all
   * ones (a hole: the VMM's MMIO answer), or anything else (wrong). */
  uint64_t probe_ram;
  uint64_t probe_hole;
  uint64_t probe_bad;
};

struct fl_report_bad_page {
  struct fl_report_header header;
  uint64_t gpa;
  uint32_t expected_generation;
  uint32_t word_index; /* first word that differs */
  uint64_t expected_word;
  uint64_t found_word;
};

struct fl_report_done {
  struct fl_report_header header;
  uint32_t status; /* 0 = every phase succeeded */
  uint32_t phases;
  uint64_t pages_verified;
  uint64_t bad_pages;
  uint64_t max_stall_cycles;
};

struct fl_report_panic {
  struct fl_report_header header;
  uint64_t vector;
  uint64_t error_code;
  uint64_t rip;
  uint64_t rsp;
  uint64_t cr2;
};

/* At most this many bad pages are reported one by one per phase and vCPU. */
#define FL_MAX_BAD_PAGE_REPORTS 16u

static inline uint64_t fl_mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

/* Word `index` (0..511) of the page at `gpa` in generation `generation`. Word
 * 0 names the page and generation so that a misplaced page is recognisable. */
static inline uint64_t fl_page_word(uint64_t gpa, uint32_t generation, uint32_t index) {
  uint64_t page = gpa >> 12;
  if (generation == 0) return 0;
  if (index == 0) return ((uint64_t)generation << 36) | page;
  return fl_mix64(page * 0x9e3779b97f4a7c15ull + generation) + index * 0x9e3779b97f4a7c15ull;
}

#endif /* FAULTLINE_GUEST_ABI_H_ */
