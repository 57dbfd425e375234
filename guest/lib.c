/*
 * Small helpers of the freestanding guest: the memory functions the
 * compiler may call, formatted serial output, number parsing, reports, exit
 * and the exception path.
 */
#include "guest.h"

/* The assembly mirrors of abi.h must agree with it. */
_Static_assert(GUEST_MAX_VCPUS == FL_MAX_VCPUS, "vCPU limit");
_Static_assert(GUEST_PAGE_TABLES == FL_PAGE_TABLES_GPA, "page tables");
_Static_assert(GUEST_IMAGE_MAGIC == FL_IMAGE_MAGIC, "image magic");
_Static_assert(GUEST_IMAGE_VERSION == FL_IMAGE_VERSION, "image version");
_Static_assert(GUEST_PORT_EXIT == FL_PORT_EXIT, "exit port");
_Static_assert(sizeof(struct fl_image_header) == 24, "image header layout");
_Static_assert(FL_PAGE_SIZE == 4096, "page size");

/* Assembly, so that the compiler cannot turn these loops into calls to
 * themselves. */
void* memset(void* dst, int c, size_t n) {
  void* d = dst;
  __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
  return dst;
}

void* memcpy(void* dst, const void* src, size_t n) {
  void* d = dst;
  __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
  return dst;
}

struct buf {
  char* p;
  size_t len, cap;
};

static void put(struct buf* b, char c) {
  if (b->len + 1 < b->cap) b->p[b->len++] = c;
}

static void put_u64(struct buf* b, uint64_t v, unsigned base, int width, char pad) {
  char digits[24];
  int n = 0;
  do {
    unsigned d = (unsigned)(v % base);
    digits[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
    v /= base;
  } while (v != 0);
  for (; width > n; --width) put(b, pad);
  while (n > 0) put(b, digits[--n]);
}

/* A printf subset: %[0][width][.*][l|ll](d|u|x|s|c) and %%. */
static void format(struct buf* b, const char* fmt, va_list ap) {
  for (; *fmt; ++fmt) {
    if (*fmt != '%') {
      put(b, *fmt);
      continue;
    }
    ++fmt;
    char pad = ' ';
    int width = 0, precision = -1, longs = 0;
    if (*fmt == '0') pad = '0', ++fmt;
    while (*fmt >= '0' && *fmt <= '9') width = width * 10 + (*fmt++ - '0');
    if (fmt[0] == '.' && fmt[1] == '*') precision = va_arg(ap, int), fmt += 2;
    while (*fmt == 'l') ++longs, ++fmt;
    switch (*fmt) {
      case 'd': {
        int64_t v = longs ? va_arg(ap, int64_t) : va_arg(ap, int);
        if (v < 0) put(b, '-');
        put_u64(b, v < 0 ? -(uint64_t)v : (uint64_t)v, 10, width, pad);
        break;
      }
      case 'u':
      case 'x': {
        uint64_t v = longs ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
        put_u64(b, v, *fmt == 'u' ? 10 : 16, width, pad);
        break;
      }
      case 's': {
        const char* s = va_arg(ap, const char*);
        for (int i = 0; s[i] && (precision < 0 || i < precision); ++i) put(b, s[i]);
        break;
      }
      case 'c':
        put(b, (char)va_arg(ap, int));
        break;
      case '%':
        put(b, '%');
        break;
      default:
        return;
    }
  }
}

/* snprintf for the subset above; always NUL-terminates. */
void guest_format(char* out, size_t size, const char* fmt, ...) {
  struct buf b = {out, 0, size};
  va_list ap;
  va_start(ap, fmt);
  format(&b, fmt, ap);
  va_end(ap);
  out[b.len] = '\0';
}

/* One line on the serial port, "[vcpuN] " first; a byte per OUT. */
void guest_print(uint32_t vcpu, const char* fmt, ...) {
  char line[320];
  struct buf b = {line, 0, sizeof(line) - 1};
  for (const char* p = "[vcpu"; *p; ++p) put(&b, *p);
  put_u64(&b, vcpu, 10, 0, ' ');
  put(&b, ']');
  put(&b, ' ');
  va_list ap;
  va_start(ap, fmt);
  format(&b, fmt, ap);
  va_end(ap);
  line[b.len++] = '\n';
  for (size_t i = 0; i < b.len; ++i) io_outb(FL_PORT_SERIAL, (uint8_t)line[i]);
}

/* Decimal, or hexadecimal with 0x; the whole of s[0, n) must be a number. */
bool guest_parse_u64(const char* s, size_t n, uint64_t* out) {
  unsigned base = 10;
  if (n > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) base = 16, s += 2, n -= 2;
  if (n == 0) return false;
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) {
    char c = s[i];
    unsigned d;
    if (c >= '0' && c <= '9') {
      d = (unsigned)(c - '0');
    } else if (base == 16 && c >= 'a' && c <= 'f') {
      d = (unsigned)(c - 'a' + 10);
    } else if (base == 16 && c >= 'A' && c <= 'F') {
      d = (unsigned)(c - 'A' + 10);
    } else {
      return false;
    }
    if (v > (UINT64_MAX - d) / base) return false;
    v = v * base + d;
  }
  *out = v;
  return true;
}

void guest_report_init(struct fl_report_header* h, uint16_t kind, uint32_t vcpu, uint32_t size) {
  memset(h, 0, size);
  h->magic = FL_REPORT_MAGIC;
  h->kind = kind;
  h->vcpu = (uint16_t)vcpu;
  h->size = size;
}

/* The VMM reads the report during the OUT exit; reports live in the image,
 * below 4 GiB, identity-mapped. */
void guest_send_report(const void* report) { io_outl(FL_PORT_REPORT, (uint32_t)(uintptr_t)report); }

/* CPL3: HLT would be a shutdown on PVM, so spin once the VMM has the code. */
void guest_exit(uint8_t code) {
  io_outb(FL_PORT_EXIT, code);
  for (;;) cpu_pause();
}

static const char* const exception_names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#MF9", "#TS",
    "#NP", "#SS", "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE",  "#CP",
};

static struct fl_report_panic panic_reports[GUEST_MAX_VCPUS];

/* CPL0, on this vCPU's kernel stack (boot.S fl_isr_common). */
void fl_panic(uint64_t vector, uint64_t error, uint64_t rip, uint64_t rsp, uint64_t cr2,
              uint64_t vcpu) {
  if (vcpu >= GUEST_MAX_VCPUS) vcpu = 0; /* TR was not ours yet: cannot happen after boot */
  struct fl_report_panic* r = &panic_reports[vcpu];
  guest_report_init(&r->header, FL_REPORT_PANIC, (uint32_t)vcpu, sizeof(*r));
  r->vector = vector;
  r->error_code = error;
  r->rip = rip;
  r->rsp = rsp;
  r->cr2 = cr2;
  const char* name = vector < 32 && exception_names[vector] ? exception_names[vector] : "?";
  guest_print((uint32_t)vcpu, "PANIC: exception %lu (%s) error 0x%lx rip 0x%lx rsp 0x%lx cr2 0x%lx",
              vector, name, error, rip, rsp, cr2);
  guest_send_report(r);
  io_outb(FL_PORT_EXIT, GUEST_EXIT_EXCEPTION);
  for (;;) __asm__ volatile("cli; hlt");
}
