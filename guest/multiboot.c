/*
 * Reading the multiboot information: where RAM ends, which parts of the
 * workload area are not RAM, the command line. Also the one piece of CPL0 C
 * code on the multiboot path: mapping RAM above the first 4 GiB.
 */
#include "guest.h"

struct mb_mmap_entry {
  uint32_t size; /* of the rest of the entry */
  uint64_t base, length;
  uint32_t type; /* 1 = available RAM */
} __attribute__((packed));

#define MB_MMAP_AVAILABLE 1
#define GUEST_MAX_RAM (((uint64_t)FL_MAX_RAM_GIB) << 30)

/* Calls fn(base, end, ctx) for each available RAM range of the memory map;
 * returns false if the information has no memory map. */
static bool for_each_ram(const struct mb_info* mbi, void (*fn)(uint64_t, uint64_t, void*),
                         void* ctx) {
  if (!(mbi->flags & MB_INFO_MMAP)) return false;
  uint64_t at = mbi->mmap_addr, end = at + mbi->mmap_length;
  while (at + sizeof(struct mb_mmap_entry) <= end) {
    const struct mb_mmap_entry* e = (const struct mb_mmap_entry*)(uintptr_t)at;
    if (e->size < sizeof(*e) - 4) break; /* malformed: stop rather than loop */
    uint64_t base = e->base, limit = e->base + e->length;
    if (limit < base) limit = UINT64_MAX;
    if (e->type == MB_MMAP_AVAILABLE && limit > base) fn(base, limit, ctx);
    at += e->size + 4;
  }
  return true;
}

static void max_end(uint64_t base, uint64_t end, void* ctx) {
  (void)base;
  uint64_t* m = ctx;
  if (end > *m) *m = end;
}

/* The first byte after RAM, page-aligned, at most what the page tables
 * cover (FL_MAX_RAM_GIB); 0 if the information says nothing about memory. */
uint64_t guest_mem_end(const struct mb_info* mbi) {
  uint64_t end = 0;
  if (!for_each_ram(mbi, max_end, &end) && (mbi->flags & MB_INFO_MEM)) {
    end = (1ull << 20) + ((uint64_t)mbi->mem_upper << 10);
  }
  if (end > GUEST_MAX_RAM) end = GUEST_MAX_RAM;
  return end & ~(FL_PAGE_SIZE - 1);
}

const char* guest_cmdline(const struct mb_info* mbi) {
  if (!(mbi->flags & MB_INFO_CMDLINE) || mbi->cmdline == 0) return "";
  return (const char*)(uintptr_t)mbi->cmdline;
}

struct cover {
  uint64_t pos;  /* in: a GPA; out: the end of the RAM that contains it */
  uint64_t next; /* out: the lowest RAM base above pos */
};

static void cover_step(uint64_t base, uint64_t end, void* ctx) {
  struct cover* c = ctx;
  if (base <= c->pos && c->pos < end) c->next = end > c->next ? end : c->next;
}

static void next_base(uint64_t base, uint64_t end, void* ctx) {
  (void)end;
  struct cover* c = ctx;
  if (base > c->pos && base < c->next) c->next = base;
}

/* The parts of `within` that no available memory map entry covers, in
 * order; -1 if there are more than `max`. Without a memory map, RAM is taken
 * to be contiguous up to guest_mem_end(). */
int guest_ram_gaps(const struct mb_info* mbi, struct guest_range within, struct guest_range* out,
                   int max) {
  int n = 0;
  uint64_t pos = within.start;
  while (pos < within.end) {
    struct cover c = {pos, pos};
    if (!for_each_ram(mbi, cover_step, &c)) return 0;
    if (c.next > pos) { /* RAM from pos to c.next; entries may be adjacent */
      pos = c.next;
      continue;
    }
    c.next = within.end;
    for_each_ram(mbi, next_base, &c);
    if (n == max) return -1;
    out[n].start = pos;
    out[n].end = c.next;
    ++n;
    pos = c.next;
  }
  return n;
}

/*
 * Multiboot path only, CPL0 in long mode on vCPU 0's kernel stack: boot.S
 * mapped the first 4 GiB; map the rest of RAM the same way (a page
 * directory per GiB at GUEST_PAGE_TABLES + (2 + g) * 4 KiB).
 */
void fl_boot_map_ram(uint32_t mbi) {
  uint64_t end = guest_mem_end((const struct mb_info*)(uintptr_t)mbi);
  uint64_t gib = (end + (1ull << 30) - 1) >> 30;
  uint64_t* pdpt = (uint64_t*)(uintptr_t)(FL_PAGE_TABLES_GPA + FL_PAGE_SIZE);
  for (uint64_t g = 4; g < gib; ++g) {
    uint64_t pd_gpa = FL_PAGE_TABLES_GPA + (2 + g) * FL_PAGE_SIZE;
    uint64_t* pd = (uint64_t*)(uintptr_t)pd_gpa;
    for (uint64_t i = 0; i < 512; ++i) pd[i] = (g << 30) | (i << 21) | 0x87; /* P RW U PS */
    pdpt[g] = pd_gpa | 0x7;
  }
  uint64_t cr3;
  __asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
}
