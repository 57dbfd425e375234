/*
 * fl_main: what every vCPU runs at CPL3. Reads its options and the memory
 * layout, claims its region, says hello, runs the phases and reports done.
 *
 * Layout: the workload area is [max(2 MiB, image end rounded up to 2 MiB),
 * end of RAM). vCPU i gets an equal share, 2 MiB-aligned when shares are at
 * least 2 MiB, the last vCPU the remainder. A region starts with its ledger
 * (a uint32_t generation per workload page), then the workload pages.
 *
 * Under QEMU (multiboot, one vCPU) the same code runs, with two caveats:
 * QEMU's firmware leaves data in some RAM it reports as available, so a
 * verify before the first fill finds bad pages there; and ports 0x510 and
 * 0x514 are QEMU's fw_cfg, so reports go nowhere (harmlessly) and
 * until_command=1 never sees FL_CMD_STOP.
 */
#include "guest.h"

static struct guest_vcpu vcpus[GUEST_MAX_VCPUS];

static void finish(struct guest_vcpu* v, uint8_t code) __attribute__((noreturn));
static void finish(struct guest_vcpu* v, uint8_t code) {
  struct fl_report_done* d = &v->done;
  guest_report_init(&d->header, FL_REPORT_DONE, v->index, sizeof(*d));
  d->status = code;
  d->phases = v->phases_done;
  d->pages_verified = v->pages_verified;
  d->bad_pages = v->bad_pages;
  d->max_stall_cycles = v->max_stall;
  guest_send_report(d);
  guest_print(v->index, "done: status=%u verified=%lu bad=%lu", code, v->pages_verified,
              v->bad_pages);
  guest_exit(code);
}

/* Excludes the GPA range `gpa` (skip window or memory map hole) from the
 * phases, as page indices; it must not touch the ledger. */
static bool exclude(struct guest_vcpu* v, struct guest_range gpa, const char* what) {
  if (gpa.end <= v->region_start || gpa.start >= v->region_end) return true;
  if (gpa.start < v->first_page) {
    guest_print(v->index, "error: %s 0x%lx-0x%lx overlaps this vCPU's ledger 0x%lx-0x%lx", what,
                gpa.start, gpa.end, v->region_start, v->first_page);
    return false;
  }
  if (v->excluded_count == GUEST_MAX_EXCLUDED) {
    guest_print(v->index, "error: more than %d excluded ranges", GUEST_MAX_EXCLUDED);
    return false;
  }
  uint64_t end = gpa.end < v->region_end ? gpa.end : v->region_end;
  struct guest_range r = {(gpa.start - v->first_page) / FL_PAGE_SIZE,
                          (end - v->first_page + FL_PAGE_SIZE - 1) / FL_PAGE_SIZE};
  uint32_t i = v->excluded_count++;
  for (; i > 0 && v->excluded[i - 1].start > r.start; --i) v->excluded[i] = v->excluded[i - 1];
  v->excluded[i] = r;
  uint32_t n = 0; /* merge overlapping and adjacent ranges */
  for (i = 0; i < v->excluded_count; ++i) {
    if (n > 0 && v->excluded[i].start <= v->excluded[n - 1].end) {
      if (v->excluded[i].end > v->excluded[n - 1].end) v->excluded[n - 1].end = v->excluded[i].end;
    } else {
      v->excluded[n++] = v->excluded[i];
    }
  }
  v->excluded_count = n;
  return true;
}

static bool layout(struct guest_vcpu* v, const struct mb_info* mbi) {
  v->mem_end = guest_mem_end(mbi);
  if (v->mem_end == 0) {
    guest_print(v->index, "error: the multiboot information gives no memory size");
    return false;
  }
  uint64_t area = ((uint64_t)(uintptr_t)fl_image_end + GUEST_2M - 1) & ~(GUEST_2M - 1);
  if (area < GUEST_2M) area = GUEST_2M;
  uint64_t total = v->mem_end > area ? (v->mem_end - area) / FL_PAGE_SIZE : 0;
  uint64_t share = total / v->count;
  if (share >= GUEST_2M / FL_PAGE_SIZE) share &= ~(GUEST_2M / FL_PAGE_SIZE - 1);
  if (share < 2) {
    guest_print(v->index, "error: RAM ends at 0x%lx, too little above 0x%lx for %u vCPUs",
                v->mem_end, area, v->count);
    return false;
  }
  v->region_start = area + v->index * share * FL_PAGE_SIZE;
  v->region_end = v->index + 1 == v->count ? v->mem_end : v->region_start + share * FL_PAGE_SIZE;
  uint64_t region_pages = (v->region_end - v->region_start) / FL_PAGE_SIZE;
  uint64_t ledger_pages = (region_pages * sizeof(uint32_t) + FL_PAGE_SIZE - 1) / FL_PAGE_SIZE;
  v->pages = region_pages - ledger_pages;
  v->first_page = v->region_start + ledger_pages * FL_PAGE_SIZE;
  v->ledger = (uint32_t*)(uintptr_t)v->region_start;

  if (v->cfg.skip_end > v->cfg.skip_start) {
    struct guest_range skip = {v->cfg.skip_start, v->cfg.skip_end};
    if (!exclude(v, skip, "skip window")) return false;
  }
  struct guest_range gaps[GUEST_MAX_EXCLUDED];
  struct guest_range region = {v->region_start, v->region_end};
  int n = guest_ram_gaps(mbi, region, gaps, GUEST_MAX_EXCLUDED);
  if (n < 0) {
    guest_print(v->index, "error: more than %d holes in the memory map", GUEST_MAX_EXCLUDED);
    return false;
  }
  for (int i = 0; i < n; ++i) {
    if (!exclude(v, gaps[i], "memory map hole")) return false;
  }
  v->included_pages = v->pages;
  for (uint32_t i = 0; i < v->excluded_count; ++i) {
    v->included_pages -= v->excluded[i].end - v->excluded[i].start;
  }

  /* Every page starts at generation 0. Fresh RAM is zero already; write
   * only what is not, so that a fresh ledger stays untouched. */
  for (uint64_t i = 0; i < v->pages; ++i) {
    if (v->ledger[i] != 0) v->ledger[i] = 0;
  }
  v->rng = v->cfg.seed ^ fl_mix64(v->index + 1);
  v->next_gen = v->cfg.gen;
  return true;
}

static void hello(struct guest_vcpu* v) {
  struct fl_report_hello* h = &v->hello;
  guest_report_init(&h->header, FL_REPORT_HELLO, v->index, sizeof(*h));
  h->mem_end = v->mem_end;
  h->region_start = v->region_start;
  h->region_end = v->region_end;
  h->ledger_gpa = v->region_start;
  h->pages = v->pages;
  h->first_page_gpa = v->first_page;
  guest_send_report(h);
  if (v->cfg.quiet) return;
  guest_print(v->index,
              "hello: vCPU %u of %u, RAM ends 0x%lx, region 0x%lx-0x%lx, ledger 0x%lx, %lu pages "
              "from 0x%lx (%lu excluded), tsc_khz %lu",
              v->index, v->count, v->mem_end, v->region_start, v->region_end, v->region_start,
              v->pages, v->first_page, v->pages - v->included_pages, v->cfg.tsc_khz);
}

void fl_main(uint64_t mbi_gpa, uint64_t index, uint64_t count) {
  struct guest_vcpu* v = &vcpus[index]; /* boot.S checked index < count <= 8 */
  v->index = (uint32_t)index;
  v->count = (uint32_t)count;
  const struct mb_info* mbi = (const struct mb_info*)(uintptr_t)mbi_gpa;
  if (!guest_parse_config(&v->cfg, guest_cmdline(mbi), v->index) || !layout(v, mbi)) {
    finish(v, GUEST_EXIT_BAD_PARAMS);
  }
  if (!guest_self_check(v->first_page)) {
    guest_print(v->index, "error: page contents disagree with fl_page_word (guest bug)");
    finish(v, GUEST_EXIT_BAD_PARAMS);
  }
  hello(v);
  for (uint32_t i = 0; i < v->cfg.phase_count; ++i) {
    if (v->cfg.phases[i] == GUEST_PHASE_TRIPLEFAULT) {
      guest_print(v->index, "triplefault: shutting the machine down on purpose");
      fl_triple_fault_armed[v->index] = 1;
      __asm__ volatile("ud2" : : : "memory");
      finish(v, GUEST_EXIT_EXCEPTION); /* not reached */
    }
    guest_run_phase(v, v->cfg.phases[i]);
  }
  finish(v, v->bad_pages ? GUEST_EXIT_BAD_PAGES : GUEST_EXIT_OK);
}
