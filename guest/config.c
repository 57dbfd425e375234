/*
 * The guest's command line: space-separated key=value options.
 *
 *   workload=PHASE[,PHASE...]  fill verify random hotset touch triplefault,
 *                              run in order (default fill,verify)
 *   gen=N                      generation of the first fill (default 1)
 *   seed=N                     random page choice, mixed with the vCPU index
 *   rate=MiBps                 random: write rate, 0 = unthrottled (needs tsc_khz)
 *   duration_ms=N              random/hotset: stop after N ms (needs tsc_khz)
 *   ops=N                      random/hotset: stop after N page writes
 *   until_command=0|1          random/hotset: stop when FL_PORT_COMMAND says stop
 *   hot_pages=N                hotset: size of the working set (default 64)
 *   hot_ops=N                  hotset: stop after N page writes, whatever ends
 *                              the random phase (duration, ops, the command)
 *   hot_stride=N               hotset: every Nth page is hot (default 1)
 *   tsc_khz=N                  TSC frequency, from the VMM
 *   skip=START:SIZE            GPA window no phase touches
 *   quiet=0|1                  only warnings, errors and the final line
 *
 * Numbers are decimal or 0x-prefixed hexadecimal. A first word without '='
 * is the kernel's name (multiboot loaders pass it) and is ignored; unknown
 * keys draw a warning; bad values are errors (exit code 2).
 */
#include "guest.h"

struct phase_name {
  const char* name;
  uint32_t phase;
};

static const struct phase_name phase_names[] = {
    {"fill", FL_PHASE_FILL},     {"verify", FL_PHASE_VERIFY},
    {"random", FL_PHASE_RANDOM}, {"hotset", FL_PHASE_HOTSET},
    {"touch", FL_PHASE_TOUCH},   {"triplefault", GUEST_PHASE_TRIPLEFAULT},
};
#define PHASE_NAME_COUNT (sizeof(phase_names) / sizeof(phase_names[0]))

const char* guest_phase_name(uint32_t phase) {
  for (size_t i = 0; i < PHASE_NAME_COUNT; ++i) {
    if (phase_names[i].phase == phase) return phase_names[i].name;
  }
  return "?";
}

/* s[0, n) equals the C string `word`. */
static bool equals(const char* s, size_t n, const char* word) {
  for (size_t i = 0; i < n; ++i) {
    if (word[i] != s[i]) return false; /* also stops at the end of `word` */
  }
  return word[n] == '\0';
}

static bool parse_workload(struct guest_config* cfg, const char* s, size_t n, uint32_t vcpu) {
  cfg->phase_count = 0;
  size_t i = 0;
  while (i <= n) {
    size_t j = i;
    while (j < n && s[j] != ',') ++j;
    size_t k = 0;
    while (k < PHASE_NAME_COUNT && !equals(s + i, j - i, phase_names[k].name)) ++k;
    if (k == PHASE_NAME_COUNT) {
      guest_print(vcpu,
                  "error: unknown phase '%.*s' (phases: fill verify random hotset touch "
                  "triplefault)",
                  (int)(j - i), s + i);
      return false;
    }
    if (cfg->phase_count == GUEST_MAX_PHASES) {
      guest_print(vcpu, "error: more than %d phases", GUEST_MAX_PHASES);
      return false;
    }
    cfg->phases[cfg->phase_count++] = phase_names[k].phase;
    i = j + 1;
  }
  return true;
}

static bool parse_skip(struct guest_config* cfg, const char* s, size_t n) {
  size_t colon = 0;
  while (colon < n && s[colon] != ':') ++colon;
  uint64_t start, size;
  if (colon == n || !guest_parse_u64(s, colon, &start) ||
      !guest_parse_u64(s + colon + 1, n - colon - 1, &size) || start + size < start) {
    return false;
  }
  /* Whole pages: round the window outwards. */
  cfg->skip_start = start & ~(FL_PAGE_SIZE - 1);
  cfg->skip_end = size ? (start + size + FL_PAGE_SIZE - 1) & ~(FL_PAGE_SIZE - 1) : cfg->skip_start;
  return true;
}

enum option {
  OPT_GEN,
  OPT_SEED,
  OPT_RATE,
  OPT_DURATION,
  OPT_OPS,
  OPT_UNTIL,
  OPT_HOT,
  OPT_HOT_OPS,
  OPT_HOT_STRIDE,
  OPT_TSC,
  OPT_QUIET,
  OPT_PROBE,
  OPT_PROBE_GEN
};

static const struct {
  const char* key;
  enum option option;
  uint64_t max;
} numeric_options[] = {
    {"gen", OPT_GEN, UINT32_MAX},
    {"seed", OPT_SEED, UINT64_MAX},
    {"rate", OPT_RATE, UINT32_MAX},
    {"duration_ms", OPT_DURATION, UINT32_MAX},
    {"ops", OPT_OPS, UINT64_MAX},
    {"until_command", OPT_UNTIL, 1},
    {"hot_pages", OPT_HOT, UINT64_MAX},
    {"hot_ops", OPT_HOT_OPS, UINT64_MAX},
    {"hot_stride", OPT_HOT_STRIDE, UINT32_MAX},
    {"tsc_khz", OPT_TSC, UINT32_MAX},
    {"quiet", OPT_QUIET, 1},
    {"probe", OPT_PROBE, UINT64_MAX},
    {"probe_gen", OPT_PROBE_GEN, UINT32_MAX},
};

static void set_option(struct guest_config* cfg, enum option option, uint64_t v) {
  switch (option) {
    case OPT_GEN:
      cfg->gen = (uint32_t)v;
      break;
    case OPT_SEED:
      cfg->seed = v;
      break;
    case OPT_RATE:
      cfg->rate_mibps = v;
      break;
    case OPT_DURATION:
      cfg->duration_ms = v;
      cfg->has_duration = true;
      break;
    case OPT_OPS:
      cfg->ops = v;
      cfg->has_ops = true;
      break;
    case OPT_UNTIL:
      cfg->until_command = v != 0;
      break;
    case OPT_HOT:
      cfg->hot_pages = v;
      break;
    case OPT_HOT_OPS:
      cfg->hot_ops = v;
      break;
    case OPT_HOT_STRIDE:
      cfg->hot_stride = v;
      break;
    case OPT_TSC:
      cfg->tsc_khz = v;
      break;
    case OPT_QUIET:
      cfg->quiet = v != 0;
      break;
    case OPT_PROBE:
      cfg->probe_gpa = v & ~(FL_PAGE_SIZE - 1);
      break;
    case OPT_PROBE_GEN:
      cfg->probe_gen = (uint32_t)v;
      break;
  }
}

static bool parse_option(struct guest_config* cfg, const char* key, size_t key_len,
                         const char* value, size_t value_len, uint32_t vcpu) {
  if (equals(key, key_len, "workload")) return parse_workload(cfg, value, value_len, vcpu);
  if (equals(key, key_len, "skip")) {
    if (parse_skip(cfg, value, value_len)) return true;
    guest_print(vcpu, "error: skip=%.*s: expected skip=START:SIZE", (int)value_len, value);
    return false;
  }
  for (size_t i = 0; i < sizeof(numeric_options) / sizeof(numeric_options[0]); ++i) {
    if (!equals(key, key_len, numeric_options[i].key)) continue;
    uint64_t v;
    if (!guest_parse_u64(value, value_len, &v) || v > numeric_options[i].max) {
      guest_print(vcpu, "error: bad value in %.*s=%.*s (at most %lu)", (int)key_len, key,
                  (int)value_len, value, numeric_options[i].max);
      return false;
    }
    set_option(cfg, numeric_options[i].option, v);
    return true;
  }
  if (vcpu == 0) guest_print(vcpu, "warning: unknown option '%.*s' ignored", (int)key_len, key);
  return true;
}

/* Fills *cfg from the command line; false (after printing why) if it is
 * unusable. Every vCPU parses the same line; only vCPU 0 prints warnings. */
bool guest_parse_config(struct guest_config* cfg, const char* cmdline, uint32_t vcpu) {
  memset(cfg, 0, sizeof(*cfg));
  cfg->gen = 1;
  cfg->hot_pages = 64;
  cfg->phases[0] = FL_PHASE_FILL;
  cfg->phases[1] = FL_PHASE_VERIFY;
  cfg->phase_count = 2;

  const char* s = cmdline;
  const char* end = s;
  while (*end && end - s < (long)FL_CMDLINE_MAX) ++end;
  bool first = true;
  while (s < end) {
    while (s < end && (*s == ' ' || *s == '\t')) ++s;
    const char* word = s;
    while (s < end && *s != ' ' && *s != '\t') ++s;
    if (s == word) break;
    const char* eq = word;
    while (eq < s && *eq != '=') ++eq;
    if (eq == s) {
      if (!first && vcpu == 0) {
        guest_print(vcpu, "warning: '%.*s' is not key=value, ignored", (int)(s - word), word);
      }
    } else if (!parse_option(cfg, word, (size_t)(eq - word), eq + 1, (size_t)(s - eq - 1), vcpu)) {
      return false;
    }
    first = false;
  }

  if (cfg->rate_mibps != 0 && cfg->tsc_khz == 0) {
    guest_print(vcpu, "error: rate needs tsc_khz (the TSC frequency) to pace writes");
    return false;
  }
  if (cfg->has_duration && cfg->tsc_khz == 0) {
    guest_print(vcpu, "error: duration_ms needs tsc_khz (the TSC frequency)");
    return false;
  }
  if (cfg->hot_pages == 0) {
    guest_print(vcpu, "error: hot_pages must be at least 1");
    return false;
  }
  return true;
}
