/*
 * The CPL3 workload phases. An op is one page (written, verified or
 * touched), timed with RDTSC before and after. Per phase we keep a log2
 * histogram of op times and the max stall: the longest interval between two
 * consecutive TSC readings of the phase (op starts and ends, pacing and
 * polling included), i.e. the longest time this vCPU was seen to make no
 * progress, whether the time went into one slow op (a demand-paging fault)
 * or between ops (a paused vCPU, a slow port exit).
 */
#include "guest.h"

#define WORDS_PER_PAGE 512u
#define WORD_STEP 0x9e3779b97f4a7c15ull /* fl_page_word: word i = mix + i * WORD_STEP */
#define POLL_EVERY_OPS 64
#define PROBE_EVERY_OPS 16

struct meter {
  struct fl_report_phase* r;
  uint64_t last; /* previous TSC reading */
};

static inline uint64_t meter_now(struct meter* m) {
  uint64_t now = rdtsc();
  if (now - m->last > m->r->max_stall_cycles) m->r->max_stall_cycles = now - m->last;
  m->last = now;
  return now;
}

static inline void meter_op(struct meter* m, uint64_t t0, uint64_t t1) {
  uint64_t cycles = t1 - t0;
  unsigned bucket = cycles ? 63u - (unsigned)__builtin_clzll(cycles) : 0;
  if (bucket >= FL_HIST_BUCKETS) bucket = FL_HIST_BUCKETS - 1;
  ++m->r->hist[bucket];
  ++m->r->ops;
}

static inline uint64_t page_gpa(const struct guest_vcpu* v, uint64_t page) {
  return v->first_page + page * FL_PAGE_SIZE;
}

static inline uint64_t* page_ptr(uint64_t gpa) { return (uint64_t*)(uintptr_t)gpa; }

/* The first page index >= page that no excluded range contains (may be
 * v->pages: none left). */
uint64_t guest_next_included(const struct guest_vcpu* v, uint64_t page) {
  for (uint32_t i = 0; i < v->excluded_count && page >= v->excluded[i].start; ++i) {
    if (page < v->excluded[i].end) page = v->excluded[i].end;
  }
  return page;
}

/* fl_page_word(gpa, gen, i) for i = 0..511 into w: one mix per page, then an
 * add per word. */
static void fill_words(uint64_t* w, uint64_t gpa, uint32_t gen) {
  if (gen == 0) {
    memset(w, 0, FL_PAGE_SIZE);
    return;
  }
  uint64_t page = gpa >> 12;
  w[0] = ((uint64_t)gen << 36) | page;
  uint64_t x = fl_mix64(page * WORD_STEP + gen) + WORD_STEP;
  for (uint32_t i = 1; i < WORDS_PER_PAGE; ++i, x += WORD_STEP) w[i] = x;
}

struct mismatch {
  uint32_t word;
  uint64_t expected, found;
};

/* Compares w with generation gen of page gpa; false and *bad at the first
 * difference. */
static bool check_words(const uint64_t* w, uint64_t gpa, uint32_t gen, struct mismatch* bad) {
  uint64_t page = gpa >> 12;
  uint64_t expected = gen ? ((uint64_t)gen << 36) | page : 0;
  uint64_t step = gen ? WORD_STEP : 0;
  uint64_t x = gen ? fl_mix64(page * WORD_STEP + gen) + WORD_STEP : 0;
  for (uint32_t i = 0; i < WORDS_PER_PAGE; ++i) {
    if (w[i] != expected) {
      bad->word = i;
      bad->expected = expected;
      bad->found = w[i];
      return false;
    }
    expected = x;
    x += step;
  }
  return true;
}

/* fill_words and check_words agree with abi.h's fl_page_word. */
bool guest_self_check(uint64_t gpa) {
  uint64_t w[WORDS_PER_PAGE];
  struct mismatch bad;
  for (uint32_t gen = 0; gen < 3; ++gen) {
    fill_words(w, gpa, gen);
    for (uint32_t i = 0; i < WORDS_PER_PAGE; ++i) {
      if (w[i] != fl_page_word(gpa, gen, i)) return false;
    }
    if (!check_words(w, gpa, gen, &bad)) return false;
    w[WORDS_PER_PAGE - 1] ^= 1;
    if (check_words(w, gpa, gen, &bad) || bad.word != WORDS_PER_PAGE - 1) return false;
  }
  return true;
}

static void phase_fill(struct guest_vcpu* v, struct meter* m) {
  uint32_t gen = v->next_gen;
  for (uint64_t p = guest_next_included(v, 0); p < v->pages; p = guest_next_included(v, p + 1)) {
    uint64_t t0 = meter_now(m);
    fill_words(page_ptr(page_gpa(v, p)), page_gpa(v, p), gen);
    v->ledger[p] = gen;
    meter_op(m, t0, meter_now(m));
  }
  m->r->generation = gen;
  v->next_gen = gen + 1;
}

static void report_bad_page(struct guest_vcpu* v, uint64_t gpa, uint32_t gen,
                            const struct mismatch* bad) {
  struct fl_report_bad_page* b = &v->bad;
  guest_report_init(&b->header, FL_REPORT_BAD_PAGE, v->index, sizeof(*b));
  b->gpa = gpa;
  b->expected_generation = gen;
  b->word_index = bad->word;
  b->expected_word = bad->expected;
  b->found_word = bad->found;
  guest_send_report(b);
  guest_print(v->index, "bad page 0x%lx: generation %u, word %u expected 0x%lx found 0x%lx", gpa,
              gen, bad->word, bad->expected, bad->found);
}

static void phase_verify(struct guest_vcpu* v, struct meter* m) {
  struct fl_report_phase* r = m->r;
  for (uint64_t p = guest_next_included(v, 0); p < v->pages; p = guest_next_included(v, p + 1)) {
    uint64_t gpa = page_gpa(v, p);
    uint32_t gen = v->ledger[p];
    struct mismatch bad;
    uint64_t t0 = meter_now(m);
    bool ok = check_words(page_ptr(gpa), gpa, gen, &bad);
    uint64_t word1 = page_ptr(gpa)[1];
    meter_op(m, t0, meter_now(m));
    ++r->pages_verified;
    r->checksum += word1;
    if (gen > r->generation) r->generation = gen;
    if (!ok && r->bad_pages++ < FL_MAX_BAD_PAGE_REPORTS) report_bad_page(v, gpa, gen, &bad);
  }
}

static void phase_touch(struct guest_vcpu* v, struct meter* m) {
  uint64_t sum = 0;
  for (uint64_t p = guest_next_included(v, 0); p < v->pages; p = guest_next_included(v, p + 1)) {
    uint64_t t0 = meter_now(m);
    sum += *(volatile const uint64_t*)(uintptr_t)(page_gpa(v, p) + 8);
    meter_op(m, t0, meter_now(m));
  }
  m->r->checksum = sum;
}

/* When an open-ended phase ends: op count, duration, or the VMM's command
 * (polled every POLL_EVERY_OPS ops or every millisecond). */
struct stop {
  uint64_t max_ops, start, duration; /* duration 0: none */
  bool poll;
  uint64_t tsc_khz, polled_at, polled_ops;
};

static bool should_stop(struct stop* s, uint64_t now, uint64_t ops) {
  if (ops >= s->max_ops) return true;
  if (s->duration && now - s->start >= s->duration) return true;
  if (!s->poll) return false;
  if (ops - s->polled_ops < POLL_EVERY_OPS && (s->tsc_khz == 0 || now - s->polled_at < s->tsc_khz))
    return false;
  s->polled_ops = ops;
  s->polled_at = now;
  return io_inl(FL_PORT_COMMAND) == FL_CMD_STOP;
}

/* Op k may start at base + k * cycles_per_op. Ops that fall
 * behind run unthrottled until they catch up, but by at most `slack` (10 ms
 * of writes): after a longer stall the schedule moves on rather than
 * releasing a burst. */
struct pace {
  uint64_t cycles_per_op_x65536, base, slack;
};

static bool wait_turn(struct pace* pc, struct stop* s, struct meter* m, uint64_t ops) {
  uint64_t due = pc->base + (uint64_t)(((__uint128_t)ops * pc->cycles_per_op_x65536) >> 16);
  uint64_t now = m->last;
  while (now < due) {
    cpu_pause();
    now = meter_now(m);
    if (should_stop(s, now, ops)) return false;
  }
  if (now - due > pc->slack) pc->base += now - due - pc->slack;
  return true;
}

/* Reads word 1 of the probe page (guest/abi.h: probe=). A hole reads as all
 * ones through the VMM's MMIO exit; RAM must hold generation probe_gen. */
static void probe(const struct guest_config* cfg, struct fl_report_phase* r) {
  uint64_t word = *(volatile const uint64_t*)(uintptr_t)(cfg->probe_gpa + 8);
  if (word == ~0ull) {
    ++r->probe_hole;
  } else if (word == fl_page_word(cfg->probe_gpa, cfg->probe_gen, 1)) {
    ++r->probe_ram;
  } else {
    ++r->probe_bad;
  }
}

/* random (hot == false): pseudo-random pages at cfg.rate; hotset: the first
 * cfg.hot_pages pages in turn. Each write stores ledger + 1. */
static void phase_writes(struct guest_vcpu* v, struct meter* m, bool hot) {
  const struct guest_config* cfg = &v->cfg;
  struct fl_report_phase* r = m->r;
  if (v->included_pages == 0) return;
  struct stop s = {
      UINT64_MAX, m->last, cfg->duration_ms * cfg->tsc_khz, cfg->until_command, cfg->tsc_khz,
      m->last,    0};
  if (cfg->has_ops) {
    s.max_ops = cfg->ops;
  } else if (!cfg->has_duration && !cfg->until_command) {
    s.max_ops = v->included_pages;
  }
  if (cfg->has_duration && s.duration == 0) s.max_ops = 0;
  if (hot && cfg->hot_ops) { /* a fixed amount of work, e.g. after a restore */
    s.max_ops = cfg->hot_ops;
    s.duration = 0;
    s.poll = false;
  }
  /* 4 KiB per op at rate MiB/s: tsc_khz * 1000 * 4096 / (rate << 20) cycles. */
  struct pace pc = {0, m->last, cfg->tsc_khz * 10};
  if (!hot && cfg->rate_mibps) pc.cycles_per_op_x65536 = cfg->tsc_khz * 256000 / cfg->rate_mibps;

  const uint64_t stride = cfg->hot_stride ? cfg->hot_stride : 1;
  uint64_t hot_first = guest_next_included(v, 0), hot_end = hot_first;
  for (uint64_t n = 0, p = hot_first; n < cfg->hot_pages && p < v->pages; ++n) {
    hot_end = p + 1;
    p = guest_next_included(v, p + stride);
  }
  uint64_t cursor = hot_first;

  for (uint64_t ops = 0; !should_stop(&s, m->last, ops); ++ops) {
    if (pc.cycles_per_op_x65536 && !wait_turn(&pc, &s, m, ops)) break;
    uint64_t p;
    if (hot) {
      p = cursor;
      cursor = guest_next_included(v, cursor + stride);
      if (cursor >= hot_end) cursor = hot_first;
    } else {
      v->rng += WORD_STEP; /* splitmix64 */
      p = (uint64_t)(((__uint128_t)fl_mix64(v->rng) * v->pages) >> 64);
      p = guest_next_included(v, p);
      if (p >= v->pages) p = hot_first;
    }
    if (cfg->probe_gpa && ops % PROBE_EVERY_OPS == 0) probe(cfg, r);
    uint64_t gpa = page_gpa(v, p);
    uint32_t gen = v->ledger[p] + 1;
    uint64_t t0 = meter_now(m);
    fill_words(page_ptr(gpa), gpa, gen);
    v->ledger[p] = gen;
    meter_op(m, t0, meter_now(m));
    if (gen > r->generation) r->generation = gen;
  }
}

/* "N cycles", and the time too when the TSC frequency is known. */
static void format_cycles(char* out, size_t size, uint64_t cycles, uint64_t tsc_khz) {
  if (tsc_khz) {
    guest_format(out, size, "%lu cycles (%lu us)", cycles, cycles * 1000 / tsc_khz);
  } else {
    guest_format(out, size, "%lu cycles", cycles);
  }
}

static void print_phase(const struct guest_vcpu* v, const struct fl_report_phase* r) {
  char took[48], stall[48];
  format_cycles(took, sizeof(took), r->tsc_end - r->tsc_start, v->cfg.tsc_khz);
  format_cycles(stall, sizeof(stall), r->max_stall_cycles, v->cfg.tsc_khz);
  const char* name = guest_phase_name(r->phase);
  if (r->phase == FL_PHASE_VERIFY) {
    guest_print(v->index,
                "%s: %lu pages, bad %lu, generations up to %u, checksum 0x%lx, %s, max stall %s",
                name, r->pages_verified, r->bad_pages, r->generation, r->checksum, took, stall);
  } else {
    guest_print(v->index, "%s: %lu pages, generation %u, %s, max stall %s", name, r->ops,
                r->generation, took, stall);
  }
  if (r->probe_ram + r->probe_hole + r->probe_bad) {
    guest_print(v->index, "%s: probe 0x%lx read RAM %lu, hole %lu, wrong %lu times", name,
                v->cfg.probe_gpa, r->probe_ram, r->probe_hole, r->probe_bad);
  }
}

void guest_run_phase(struct guest_vcpu* v, uint32_t phase) {
  struct fl_report_phase* r = &v->phase;
  guest_report_init(&r->header, FL_REPORT_PHASE, v->index, sizeof(*r));
  r->phase = phase;
  struct meter m = {r, rdtsc()};
  r->tsc_start = m.last;
  switch (phase) {
    case FL_PHASE_FILL:
      phase_fill(v, &m);
      break;
    case FL_PHASE_VERIFY:
      phase_verify(v, &m);
      break;
    case FL_PHASE_RANDOM:
      phase_writes(v, &m, false);
      break;
    case FL_PHASE_HOTSET:
      phase_writes(v, &m, true);
      break;
    case FL_PHASE_TOUCH:
      phase_touch(v, &m);
      break;
  }
  r->tsc_end = meter_now(&m);

  if (phase != FL_PHASE_VERIFY && phase != FL_PHASE_TOUCH && r->generation > v->max_gen) {
    v->max_gen = r->generation;
  }
  if (v->next_gen <= v->max_gen) v->next_gen = v->max_gen + 1; /* a later fill is new */
  ++v->phases_done;
  v->pages_verified += r->pages_verified;
  v->bad_pages += r->bad_pages;
  if (r->max_stall_cycles > v->max_stall) v->max_stall = r->max_stall_cycles;

  guest_send_report(r);
  if (!v->cfg.quiet) print_phase(v, r);
  if (r->probe_bad) ++v->bad_pages; /* a wrong probe is a wrong page */
  if (r->bad_pages > FL_MAX_BAD_PAGE_REPORTS) {
    guest_print(v->index, "%s: %lu more bad pages not reported one by one", guest_phase_name(phase),
                r->bad_pages - FL_MAX_BAD_PAGE_REPORTS);
  }
}
