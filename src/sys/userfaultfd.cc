#include "src/sys/userfaultfd.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <string_view>

#include "src/sys/linux_abi.h"

namespace faultline::sys {
namespace {

static_assert(kUffdFeaturePagefaultFlagWp == UFFD_FEATURE_PAGEFAULT_FLAG_WP);
static_assert(kUffdFeatureEventFork == UFFD_FEATURE_EVENT_FORK);
static_assert(kUffdFeatureEventRemap == UFFD_FEATURE_EVENT_REMAP);
static_assert(kUffdFeatureEventRemove == UFFD_FEATURE_EVENT_REMOVE);
static_assert(kUffdFeatureMissingHugetlbfs == UFFD_FEATURE_MISSING_HUGETLBFS);
static_assert(kUffdFeatureMissingShmem == UFFD_FEATURE_MISSING_SHMEM);
static_assert(kUffdFeatureEventUnmap == UFFD_FEATURE_EVENT_UNMAP);
static_assert(kUffdFeatureSigbus == UFFD_FEATURE_SIGBUS);
static_assert(kUffdFeatureThreadId == UFFD_FEATURE_THREAD_ID);
static_assert(kUffdFeatureMinorHugetlbfs == UFFD_FEATURE_MINOR_HUGETLBFS);
static_assert(kUffdFeatureMinorShmem == UFFD_FEATURE_MINOR_SHMEM);
static_assert(kUffdFeatureExactAddress == UFFD_FEATURE_EXACT_ADDRESS);
static_assert(kUffdFeatureWpHugetlbfsShmem == UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
static_assert(kUffdFeatureWpUnpopulated == UFFD_FEATURE_WP_UNPOPULATED);
static_assert(kUffdFeaturePoison == UFFD_FEATURE_POISON);
static_assert(kUffdFeatureWpAsync == UFFD_FEATURE_WP_ASYNC);
static_assert(kUffdFeatureMove == UFFD_FEATURE_MOVE);
static_assert(kUffdUserModeOnly == UFFD_USER_MODE_ONLY);

static_assert(static_cast<uint64_t>(UffdMode::kMissing) == UFFDIO_REGISTER_MODE_MISSING);
static_assert(static_cast<uint64_t>(UffdMode::kWriteProtect) == UFFDIO_REGISTER_MODE_WP);
static_assert(static_cast<uint64_t>(UffdMode::kMinor) == UFFDIO_REGISTER_MODE_MINOR);

static_assert(static_cast<unsigned>(UffdIoctl::kWake) == _UFFDIO_WAKE);
static_assert(static_cast<unsigned>(UffdIoctl::kCopy) == _UFFDIO_COPY);
static_assert(static_cast<unsigned>(UffdIoctl::kZeroPage) == _UFFDIO_ZEROPAGE);
static_assert(static_cast<unsigned>(UffdIoctl::kMove) == _UFFDIO_MOVE);
static_assert(static_cast<unsigned>(UffdIoctl::kWriteProtect) == _UFFDIO_WRITEPROTECT);
static_assert(static_cast<unsigned>(UffdIoctl::kContinue) == _UFFDIO_CONTINUE);
static_assert(static_cast<unsigned>(UffdIoctl::kPoison) == _UFFDIO_POISON);

// UffdMessage decodes struct uffd_msg by offset.
static_assert(sizeof(UffdMessage) == sizeof(uffd_msg));
static_assert(offsetof(uffd_msg, event) == 0);
static_assert(offsetof(uffd_msg, arg.pagefault.flags) == 8);
static_assert(offsetof(uffd_msg, arg.pagefault.address) == 16);
static_assert(offsetof(uffd_msg, arg.pagefault.feat.ptid) == 24);
static_assert(offsetof(uffd_msg, arg.remove.start) == 8);
static_assert(offsetof(uffd_msg, arg.remove.end) == 16);
static_assert(offsetof(uffd_msg, arg.remap.from) == 8);
static_assert(offsetof(uffd_msg, arg.remap.to) == 16);
static_assert(offsetof(uffd_msg, arg.remap.len) == 24);
static_assert(offsetof(uffd_msg, arg.fork.ufd) == 8);
static_assert(static_cast<uint8_t>(UffdMessage::Type::kPagefault) == UFFD_EVENT_PAGEFAULT);
static_assert(static_cast<uint8_t>(UffdMessage::Type::kFork) == UFFD_EVENT_FORK);
static_assert(static_cast<uint8_t>(UffdMessage::Type::kRemap) == UFFD_EVENT_REMAP);
static_assert(static_cast<uint8_t>(UffdMessage::Type::kRemove) == UFFD_EVENT_REMOVE);
static_assert(static_cast<uint8_t>(UffdMessage::Type::kUnmap) == UFFD_EVENT_UNMAP);
static_assert(UffdMessage::kFlagWrite == UFFD_PAGEFAULT_FLAG_WRITE);
static_assert(UffdMessage::kFlagWriteProtect == UFFD_PAGEFAULT_FLAG_WP);
static_assert(UffdMessage::kFlagMinor == UFFD_PAGEFAULT_FLAG_MINOR);

constexpr const char* kFeatureNames[] = {
    "PAGEFAULT_FLAG_WP",
    "EVENT_FORK",
    "EVENT_REMAP",
    "EVENT_REMOVE",
    "MISSING_HUGETLBFS",
    "MISSING_SHMEM",
    "EVENT_UNMAP",
    "SIGBUS",
    "THREAD_ID",
    "MINOR_HUGETLBFS",
    "MINOR_SHMEM",
    "EXACT_ADDRESS",
    "WP_HUGETLBFS_SHMEM",
    "WP_UNPOPULATED",
    "POISON",
    "WP_ASYNC",
    "MOVE",
};

constexpr const char* kPermissionHint =
    "userfaultfd not permitted: run as root or set vm.unprivileged_userfaultfd=1 (sysctl), "
    "or grant access to /dev/userfaultfd";

// Opens a userfaultfd without the API handshake.
Result<UniqueFd> OpenUserfaultfd(int flags) {
  int fd = static_cast<int>(::syscall(SYS_userfaultfd, flags));
  if (fd >= 0) return UniqueFd(fd);
  const int syscall_errno = errno;
  if (syscall_errno != EPERM && syscall_errno != ENOSYS) {
    return ErrnoError(syscall_errno, "userfaultfd(0x{:x})", flags);
  }
  // The syscall is refused to unprivileged users (vm.unprivileged_userfaultfd
  // = 0) but /dev/userfaultfd is governed by its file permissions.
  UniqueFd dev(::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC));
  if (!dev.valid()) {
    const int dev_errno = errno;
    if (syscall_errno == ENOSYS && dev_errno == ENOENT) {
      return ErrnoError(ENOSYS, "userfaultfd: not supported by this kernel (CONFIG_USERFAULTFD)");
    }
    return ErrnoError(syscall_errno, "{} (open /dev/userfaultfd: {})", kPermissionHint,
                      std::strerror(dev_errno));
  }
  fd = ::ioctl(dev.get(), USERFAULTFD_IOC_NEW, flags);
  if (fd < 0) {
    const int err = errno;
    return ErrnoError(err, "{} (USERFAULTFD_IOC_NEW on /dev/userfaultfd)", kPermissionHint);
  }
  return UniqueFd(fd);
}

// UFFDIO_API. On success fills `available` with every feature the kernel
// offers. Requested features the kernel lacks make it fail with EINVAL.
int ApiHandshake(int fd, uint64_t features, uint64_t* available) {
  uffdio_api api = {};
  api.api = UFFD_API;
  api.features = features;
  if (::ioctl(fd, UFFDIO_API, &api) != 0) return errno;
  *available = api.features;
  return 0;
}

std::string RangeString(Hva start, uint64_t length) {
  return fmt::format("[0x{:x}, +0x{:x})", start.value, length);
}

// Interprets the result of a page-installing ioctl. `ret` is the ioctl's
// return value, `progress` what the kernel wrote back: bytes installed, or a
// negative errno.
Result<UffdFill> FillResult(const char* what, Hva dst, uint64_t length, int ret, int err,
                            int64_t progress) {
  if (ret == 0) return UffdFill{UffdFill::Outcome::kDone, length};
  const uint64_t bytes = progress > 0 ? static_cast<uint64_t>(progress) : 0;
  if (err == EEXIST) return UffdFill{UffdFill::Outcome::kExists, bytes};
  if (err == EAGAIN) return UffdFill{UffdFill::Outcome::kRetry, bytes};
  return ErrnoError(err, "{} {}", what, RangeString(dst, length));
}

uint64_t WakeMode(UffdWake wake, uint64_t dontwake_bit) {
  return wake == UffdWake::kDontWake ? dontwake_bit : 0;
}

}  // namespace

std::string UffdFeatureNames(uint64_t features) {
  std::string out;
  for (size_t bit = 0; bit < 64; ++bit) {
    if ((features & (1ull << bit)) == 0) continue;
    if (!out.empty()) out += '|';
    if (bit < std::size(kFeatureNames)) {
      out += kFeatureNames[bit];
    } else {
      out += fmt::format("0x{:x}", 1ull << bit);
    }
  }
  return out.empty() ? "none" : out;
}

std::string UffdModeNames(UffdMode modes) {
  std::string out;
  auto add = [&](UffdMode mode, const char* name) {
    if (!HasMode(modes, mode)) return;
    if (!out.empty()) out += '|';
    out += name;
  };
  add(UffdMode::kMissing, "MISSING");
  add(UffdMode::kWriteProtect, "WP");
  add(UffdMode::kMinor, "MINOR");
  return out.empty() ? "none" : out;
}

UffdRegistration& UffdRegistration::operator=(UffdRegistration&& other) noexcept {
  if (this != &other) {
    (void)Unregister();
    fd_ = std::move(other.fd_);
    other.fd_ = nullptr;
    start_ = other.start_;
    length_ = other.length_;
    modes_ = other.modes_;
    ioctls_ = other.ioctls_;
  }
  return *this;
}

Status UffdRegistration::Unregister() {
  if (fd_ == nullptr) return Status::Ok();
  uffdio_range range = {};
  range.start = start_.value;
  range.len = length_;
  const int ret = ::ioctl(fd_->get(), UFFDIO_UNREGISTER, &range);
  const int err = errno;
  fd_ = nullptr;
  if (ret != 0) return ErrnoError(err, "UFFDIO_UNREGISTER {}", RangeString(start_, length_));
  return Status::Ok();
}

Result<Userfaultfd> Userfaultfd::Create(int flags, uint64_t features) {
  if ((flags & ~(O_NONBLOCK | O_CLOEXEC | kUffdUserModeOnly)) != 0) {
    return Error("userfaultfd: unsupported flags 0x{:x}", flags);
  }
  flags |= O_CLOEXEC;
  ASSIGN_OR_RETURN(UniqueFd fd, OpenUserfaultfd(flags));
  uint64_t available = 0;
  int err = ApiHandshake(fd.get(), features, &available);
  if (err == EINVAL && features != 0) {
    // Learn what is missing on a fresh fd; the failed one may not be retried
    // on older kernels.
    ASSIGN_OR_RETURN(UniqueFd probe, OpenUserfaultfd(flags));
    uint64_t offered = 0;
    if (ApiHandshake(probe.get(), 0, &offered) == 0 && (features & ~offered) != 0) {
      return ErrnoError(EINVAL, "UFFDIO_API: this kernel lacks userfaultfd features {} (has {})",
                        UffdFeatureNames(features & ~offered), UffdFeatureNames(offered));
    }
  }
  if (err == EPERM && (features & kUffdFeatureEventFork) != 0) {
    return ErrnoError(err, "UFFDIO_API: EVENT_FORK needs CAP_SYS_PTRACE");
  }
  if (err != 0) {
    return ErrnoError(err, "UFFDIO_API (features {})", UffdFeatureNames(features));
  }
  Userfaultfd uffd;
  uffd.fd_ = std::make_shared<const UniqueFd>(std::move(fd));
  // WP_ASYNC implies WP_UNPOPULATED (the kernel enables both).
  if ((features & kUffdFeatureWpAsync) != 0) features |= kUffdFeatureWpUnpopulated;
  uffd.features_ = features;
  uffd.available_features_ = available;
  uffd.non_blocking_ = (flags & O_NONBLOCK) != 0;
  return uffd;
}

Result<Userfaultfd> Userfaultfd::Adopt(UniqueFd fd) {
  if (!fd.valid()) return Error("adopting a userfaultfd: no descriptor");
  // Checked by name, without an ioctl: any ioctl could change a
  // descriptor of another kind, or the other process's userfaultfd.
  char link[64] = {};
  const std::string path = fmt::format("/proc/self/fd/{}", fd.get());
  const ssize_t n = ::readlink(path.c_str(), link, sizeof(link) - 1);
  if (n < 0 || std::string_view(link, static_cast<size_t>(n)) != "anon_inode:[userfaultfd]") {
    return Error(
        "the passed descriptor is not a userfaultfd ({}); pass the one the VMM "
        "registered its memory with",
        n < 0 ? "unreadable" : std::string(link, static_cast<size_t>(n)));
  }
  const int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags | O_NONBLOCK) != 0) {
    return ErrnoError(errno, "adopting a userfaultfd: fcntl(O_NONBLOCK)");
  }
  Userfaultfd uffd;
  uffd.fd_ = std::make_shared<const UniqueFd>(std::move(fd));
  uffd.non_blocking_ = true;
  return uffd;
}

Result<UffdRegistration> Userfaultfd::Register(Hva start, uint64_t length, UffdMode modes) const {
  if (!valid()) return Error("UFFDIO_REGISTER: userfaultfd is not open");
  uffdio_register reg = {};
  reg.range.start = start.value;
  reg.range.len = length;
  reg.mode = static_cast<uint64_t>(modes);
  if (::ioctl(fd(), UFFDIO_REGISTER, &reg) != 0) {
    const int err = errno;
    if (err == EINVAL) {
      return ErrnoError(err,
                        "UFFDIO_REGISTER {} mode {} (the range must be page-aligned and fully "
                        "mapped, and its memory must support the mode: anonymous, shmem or "
                        "hugetlbfs for MISSING, shmem or hugetlbfs for MINOR; guest_memfd "
                        "mappings cannot be registered)",
                        RangeString(start, length), UffdModeNames(modes));
    }
    return ErrnoError(err, "UFFDIO_REGISTER {} mode {}", RangeString(start, length),
                      UffdModeNames(modes));
  }
  UffdRegistration registration;
  registration.fd_ = fd_;
  registration.start_ = start;
  registration.length_ = length;
  registration.modes_ = modes;
  registration.ioctls_ = reg.ioctls;
  return registration;
}

Result<UffdFill> Userfaultfd::Copy(Hva dst, const void* src, uint64_t length, UffdWake wake) const {
  uffdio_copy arg = {};
  arg.dst = dst.value;
  arg.src = reinterpret_cast<uintptr_t>(src);
  arg.len = length;
  arg.mode = WakeMode(wake, UFFDIO_COPY_MODE_DONTWAKE);
  const int ret = ::ioctl(fd(), UFFDIO_COPY, &arg);
  return FillResult("UFFDIO_COPY", dst, length, ret, errno, arg.copy);
}

Result<UffdFill> Userfaultfd::ZeroPage(Hva dst, uint64_t length, UffdWake wake) const {
  uffdio_zeropage arg = {};
  arg.range.start = dst.value;
  arg.range.len = length;
  arg.mode = WakeMode(wake, UFFDIO_ZEROPAGE_MODE_DONTWAKE);
  const int ret = ::ioctl(fd(), UFFDIO_ZEROPAGE, &arg);
  return FillResult("UFFDIO_ZEROPAGE", dst, length, ret, errno, arg.zeropage);
}

Result<UffdFill> Userfaultfd::Continue(Hva dst, uint64_t length, UffdWake wake) const {
  uffdio_continue arg = {};
  arg.range.start = dst.value;
  arg.range.len = length;
  arg.mode = WakeMode(wake, UFFDIO_CONTINUE_MODE_DONTWAKE);
  const int ret = ::ioctl(fd(), UFFDIO_CONTINUE, &arg);
  return FillResult("UFFDIO_CONTINUE", dst, length, ret, errno, arg.mapped);
}

Result<UffdFill> Userfaultfd::Move(Hva dst, Hva src, uint64_t length, UffdWake wake,
                                   UffdSrcHoles holes) const {
  uffdio_move arg = {};
  arg.dst = dst.value;
  arg.src = src.value;
  arg.len = length;
  arg.mode = WakeMode(wake, UFFDIO_MOVE_MODE_DONTWAKE) |
             (holes == UffdSrcHoles::kAllow ? UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES : 0);
  const int ret = ::ioctl(fd(), UFFDIO_MOVE, &arg);
  return FillResult("UFFDIO_MOVE", dst, length, ret, errno, arg.move);
}

Result<UffdFill> Userfaultfd::Poison(Hva dst, uint64_t length, UffdWake wake) const {
  uffdio_poison arg = {};
  arg.range.start = dst.value;
  arg.range.len = length;
  arg.mode = WakeMode(wake, UFFDIO_POISON_MODE_DONTWAKE);
  const int ret = ::ioctl(fd(), UFFDIO_POISON, &arg);
  return FillResult("UFFDIO_POISON", dst, length, ret, errno, arg.updated);
}

Status Userfaultfd::WriteProtect(Hva start, uint64_t length, bool protect, UffdWake wake) const {
  uffdio_writeprotect arg = {};
  arg.range.start = start.value;
  arg.range.len = length;
  arg.mode = (protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0) |
             WakeMode(wake, UFFDIO_WRITEPROTECT_MODE_DONTWAKE);
  if (::ioctl(fd(), UFFDIO_WRITEPROTECT, &arg) != 0) {
    const int err = errno;
    return ErrnoError(err, "UFFDIO_WRITEPROTECT {} {}", RangeString(start, length),
                      protect ? "protect" : "unprotect");
  }
  return Status::Ok();
}

Status Userfaultfd::Wake(Hva start, uint64_t length) const {
  uffdio_range arg = {};
  arg.start = start.value;
  arg.len = length;
  if (::ioctl(fd(), UFFDIO_WAKE, &arg) != 0) {
    const int err = errno;
    return ErrnoError(err, "UFFDIO_WAKE {}", RangeString(start, length));
  }
  return Status::Ok();
}

Result<size_t> Userfaultfd::ReadEvents(std::span<UffdMessage> buffer) const {
  if (buffer.empty()) return size_t{0};
  const ssize_t n = ::read(fd(), buffer.data(), buffer.size_bytes());
  if (n < 0) {
    const int err = errno;
    if (err == EAGAIN || err == EINTR) return size_t{0};
    return ErrnoError(err, "read userfaultfd");
  }
  if (n % sizeof(UffdMessage) != 0) {
    return Error("read userfaultfd: {} bytes is not a whole number of messages", n);
  }
  return static_cast<size_t>(n) / sizeof(UffdMessage);
}

Result<bool> Userfaultfd::WaitReadable(int timeout_ms) const {
  pollfd pfd = {};
  pfd.fd = fd();
  pfd.events = POLLIN;
  const int ret = ::poll(&pfd, 1, timeout_ms);
  if (ret < 0) {
    const int err = errno;
    if (err == EINTR) return false;
    return ErrnoError(err, "poll userfaultfd");
  }
  if (ret > 0 && (pfd.revents & (POLLERR | POLLNVAL)) != 0) {
    return Error("poll userfaultfd: revents 0x{:x}", pfd.revents);
  }
  return ret > 0;
}

}  // namespace faultline::sys
