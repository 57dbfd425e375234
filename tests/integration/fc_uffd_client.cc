// fc_uffd_client: a VMM's side of the userfaultfd handshake, behaving as
// Firecracker does when it resumes a snapshot with a page-fault handler.
//
// Written ONLY from Firecracker's public documentation,
// docs/snapshotting/handling-page-faults-on-snapshot-resume.md (the
// interaction flow: the VMM anonymously mmaps the regions, creates a
// userfaultfd, registers the regions, connects to the handler's Unix socket
// and passes the userfaultfd with the memory layout, then touches memory;
// the balloon's MADV_DONTNEED raises UFFD_EVENT_REMOVE and those pages must
// read as zero afterwards), docs/ballooning.md, and the man pages
// userfaultfd(2) and ioctl_userfaultfd(2). No Faultline code: only libc and
// the kernel's headers, so that it checks the page server against the
// protocol, not against our own reading of it.
//
//   fc_uffd_client --socket PATH --memory FILE --region SIZE[:PAGESIZE]...
//                  [--dontneed OFFSET:LENGTH] [--touch-delay-us N] [--wait-ms N]
//                  [--page-size-kib] [--keep-socket] [--bad MODE]
//
// FILE holds the whole guest memory file (what the snapshot serves); the
// regions lie in it back to back. Exit status: 0 when every page read back
// right (or, with --bad, when the server refused the handshake by closing
// the connection); 1 when a page was wrong; 2 on a setup error.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Region {
  uint8_t* base = nullptr;
  uint64_t size = 0;
  uint64_t offset = 0;  // in the memory file
  uint64_t page_size = 4096;
};

struct Args {
  std::string socket, memory, bad;
  std::vector<Region> regions;
  uint64_t dontneed_offset = 0, dontneed_length = 0;
  unsigned touch_delay_us = 0;
  unsigned wait_ms = 0;  // before touching (a guest that starts late)
  bool page_size_kib = false, keep_socket = false;
};

[[noreturn]] void Die(const char* what) {
  std::fprintf(stderr, "fc_uffd_client: %s: %s\n", what, std::strerror(errno));
  std::exit(2);
}

uint64_t Size(const char* text) {
  char* end = nullptr;
  uint64_t v = std::strtoull(text, &end, 0);
  if (*end == 'K') v <<= 10;
  if (*end == 'M') v <<= 20;
  return v;
}

Args Parse(int argc, char** argv) {
  Args a;
  uint64_t offset = 0;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : "";
    if (k == "--socket")
      a.socket = v, ++i;
    else if (k == "--memory")
      a.memory = v, ++i;
    else if (k == "--bad")
      a.bad = v, ++i;
    else if (k == "--touch-delay-us")
      a.touch_delay_us = static_cast<unsigned>(Size(v)), ++i;
    else if (k == "--wait-ms")
      a.wait_ms = static_cast<unsigned>(Size(v)), ++i;
    else if (k == "--page-size-kib")
      a.page_size_kib = true;
    else if (k == "--keep-socket")
      a.keep_socket = true;
    else if (k == "--dontneed") {
      a.dontneed_offset = Size(v);
      a.dontneed_length = Size(std::strchr(v, ':') + 1);
      ++i;
    } else if (k == "--region") {
      Region r;
      r.size = Size(v);
      if (const char* colon = std::strchr(v, ':')) r.page_size = Size(colon + 1);
      r.offset = offset;
      offset += r.size;
      a.regions.push_back(r);
      ++i;
    } else {
      std::fprintf(stderr, "fc_uffd_client: unknown argument %s\n", k.c_str());
      std::exit(2);
    }
  }
  return a;
}

// The userfaultfd: the syscall, or /dev/userfaultfd where the syscall is
// not allowed (the documentation's kernel 6.1 route).
int OpenUffd() {
  int fd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd >= 0) return fd;
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev < 0) Die("userfaultfd");
  fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
  close(dev);
  if (fd < 0) Die("USERFAULTFD_IOC_NEW");
  return fd;
}

// Maps each region (anonymous private; hugetlbfs for 2 MiB pages), and
// registers it for MISSING faults on a userfaultfd with EVENT_REMOVE.
int SetUpMemory(std::vector<Region>& regions) {
  const int uffd = OpenUffd();
  uffdio_api api = {};
  api.api = UFFD_API;
  api.features = UFFD_FEATURE_EVENT_REMOVE;
  if (ioctl(uffd, UFFDIO_API, &api) != 0) Die("UFFDIO_API");
  for (Region& r : regions) {
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    if (r.page_size == (2u << 20)) flags |= MAP_HUGETLB;
    void* p = mmap(nullptr, r.size, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED) Die("mmap");
    r.base = static_cast<uint8_t*>(p);
    uffdio_register reg = {};
    reg.range.start = reinterpret_cast<uintptr_t>(r.base);
    reg.range.len = r.size;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) Die("UFFDIO_REGISTER");
  }
  return uffd;
}

std::string Json(const Args& a) {
  std::string out = "[";
  for (size_t i = 0; i < a.regions.size(); ++i) {
    const Region& r = a.regions[i];
    uint64_t base = reinterpret_cast<uintptr_t>(r.base), size = r.size, offset = r.offset;
    if (a.bad == "unaligned" && i == 0) base += 8;
    if (a.bad == "overlap" && i == 1) base = reinterpret_cast<uintptr_t>(a.regions[0].base);
    if (a.bad == "pastend" && i + 1 == a.regions.size()) offset += 1ull << 30;
    if (a.bad == "zerosize" && i == 0) size = 0;
    char page[64];
    const uint64_t page_size = a.bad == "pagesize" ? 65536 : r.page_size;
    if (a.page_size_kib) {
      std::snprintf(page, sizeof(page), "\"page_size_kib\": %llu",
                    (unsigned long long)(page_size >> 10));
    } else {
      std::snprintf(page, sizeof(page), "\"page_size\": %llu", (unsigned long long)page_size);
    }
    char one[256];
    std::snprintf(one, sizeof(one),
                  "%s{\"base_host_virt_addr\": %llu, \"size\": %llu, \"offset\": %llu, %s}",
                  i == 0 ? "" : ", ", (unsigned long long)base, (unsigned long long)size,
                  (unsigned long long)offset, page);
    out += one;
  }
  out += "]";
  if (a.bad == "json") out.resize(out.size() / 2);
  return out;
}

// Connects and sends the layout with the userfaultfd attached: one
// sendmsg, SCM_RIGHTS.
int Handshake(const Args& a, int uffd) {
  const int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, a.socket.c_str(), sizeof(addr.sun_path) - 1);
  if (connect(s, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) Die("connect");
  std::string body = Json(a);
  iovec iov = {body.data(), body.size()};
  int fds[2] = {uffd, uffd};
  const int nfds = a.bad == "nofd" ? 0 : a.bad == "twofds" ? 2 : 1;
  char control[CMSG_SPACE(sizeof(fds))] = {};
  msghdr msg = {};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (nfds > 0) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    std::memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  if (sendmsg(s, &msg, MSG_NOSIGNAL) != static_cast<ssize_t>(body.size())) Die("sendmsg");
  return s;
}

// Reads every page (each first read is a fault the handler serves) and
// compares it with the memory file; returns the wrong pages.
uint64_t TouchAndCheck(const Args& a, const uint8_t* file, bool expect_removed) {
  uint64_t wrong = 0;
  static const uint8_t zeros[4096] = {};
  for (const Region& r : a.regions) {
    for (uint64_t at = 0; at < r.size; at += 4096) {
      const uint64_t file_at = r.offset + at;
      const bool removed = expect_removed && file_at >= a.dontneed_offset &&
                           file_at < a.dontneed_offset + a.dontneed_length;
      const uint8_t* want = removed ? zeros : file + file_at;
      if (std::memcmp(r.base + at, want, 4096) != 0) ++wrong;
      if (a.touch_delay_us > 0) usleep(a.touch_delay_us);
    }
  }
  return wrong;
}

// The balloon's discard: MADV_DONTNEED on the range (memory-file offsets).
void Discard(const Args& a) {
  for (const Region& r : a.regions) {
    const uint64_t lo = std::max(a.dontneed_offset, r.offset);
    const uint64_t hi = std::min(a.dontneed_offset + a.dontneed_length, r.offset + r.size);
    if (lo < hi && madvise(r.base + (lo - r.offset), hi - lo, MADV_DONTNEED) != 0) {
      Die("madvise(MADV_DONTNEED)");
    }
  }
}

// A refused handshake: the handler closes the connection.
int ExpectRefusal(int s) {
  pollfd p = {s, POLLIN, 0};
  if (poll(&p, 1, 10000) <= 0) {
    std::fprintf(stderr, "fc_uffd_client: the bad handshake was not refused within 10 s\n");
    return 1;
  }
  char c;
  return recv(s, &c, 1, 0) == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Args a = Parse(argc, argv);
  if (a.socket.empty() || a.regions.empty()) {
    std::fprintf(stderr, "usage: fc_uffd_client --socket PATH --memory FILE --region SIZE...\n");
    return 2;
  }
  const int uffd = SetUpMemory(a.regions);
  const int s = Handshake(a, uffd);
  if (!a.bad.empty()) return ExpectRefusal(s);
  // Firecracker says nothing more on the socket after the handshake.
  if (!a.keep_socket) close(s);
  const int mem = open(a.memory.c_str(), O_RDONLY | O_CLOEXEC);
  struct stat st = {};
  if (mem < 0 || fstat(mem, &st) != 0) Die("open --memory");
  void* file = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, mem, 0);
  if (file == MAP_FAILED) Die("mmap --memory");
  if (a.wait_ms > 0) usleep(a.wait_ms * 1000);
  uint64_t wrong = TouchAndCheck(a, static_cast<const uint8_t*>(file), false);
  if (a.dontneed_length > 0) {
    Discard(a);
    wrong += TouchAndCheck(a, static_cast<const uint8_t*>(file), true);
  }
  std::printf("{\"pages_wrong\": %llu}\n", (unsigned long long)wrong);
  return wrong == 0 ? 0 : 1;
}
