// Userfaultfd: a userfaultfd file descriptor, its registrations, and one
// typed function per ioctl.
//
// This header deliberately does not include <linux/userfaultfd.h>: code
// outside src/sys uses the constants below (values checked against the
// kernel's in userfaultfd.cc).
//
// Installing a page races with other installers and with the faulting
// thread, so the page-installing ioctls (Copy, ZeroPage, Continue, Move,
// Poison) report EEXIST and EAGAIN as outcomes, not errors: see UffdFill.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>

#include "faultline/status.h"
#include "faultline/types.h"
#include "src/sys/unique_fd.h"

namespace faultline::sys {

// UFFD_FEATURE_* bits for Userfaultfd::Create.
inline constexpr uint64_t kUffdFeaturePagefaultFlagWp = 1ull << 0;
inline constexpr uint64_t kUffdFeatureEventFork = 1ull << 1;
inline constexpr uint64_t kUffdFeatureEventRemap = 1ull << 2;
inline constexpr uint64_t kUffdFeatureEventRemove = 1ull << 3;
inline constexpr uint64_t kUffdFeatureMissingHugetlbfs = 1ull << 4;
inline constexpr uint64_t kUffdFeatureMissingShmem = 1ull << 5;
inline constexpr uint64_t kUffdFeatureEventUnmap = 1ull << 6;
inline constexpr uint64_t kUffdFeatureSigbus = 1ull << 7;
inline constexpr uint64_t kUffdFeatureThreadId = 1ull << 8;
inline constexpr uint64_t kUffdFeatureMinorHugetlbfs = 1ull << 9;
inline constexpr uint64_t kUffdFeatureMinorShmem = 1ull << 10;
inline constexpr uint64_t kUffdFeatureExactAddress = 1ull << 11;
inline constexpr uint64_t kUffdFeatureWpHugetlbfsShmem = 1ull << 12;
inline constexpr uint64_t kUffdFeatureWpUnpopulated = 1ull << 13;
inline constexpr uint64_t kUffdFeaturePoison = 1ull << 14;
inline constexpr uint64_t kUffdFeatureWpAsync = 1ull << 15;
inline constexpr uint64_t kUffdFeatureMove = 1ull << 16;

// "MOVE|POISON" for a set of feature bits (unknown bits as hex).
std::string UffdFeatureNames(uint64_t features);

// Flags for Userfaultfd::Create besides O_NONBLOCK (O_CLOEXEC is implied).
inline constexpr int kUffdUserModeOnly = 1;  // UFFD_USER_MODE_ONLY

// Registration modes; combine with |.
enum class UffdMode : uint64_t {
  kMissing = 1ull << 0,       // fault on pages with no page table entry
  kWriteProtect = 1ull << 1,  // fault on writes to write-protected pages
  kMinor = 1ull << 2,         // fault on pages in the page cache but not mapped
};
constexpr UffdMode operator|(UffdMode a, UffdMode b) {
  return static_cast<UffdMode>(static_cast<uint64_t>(a) | static_cast<uint64_t>(b));
}
constexpr bool HasMode(UffdMode set, UffdMode mode) {
  return (static_cast<uint64_t>(set) & static_cast<uint64_t>(mode)) != 0;
}
std::string UffdModeNames(UffdMode modes);  // "MISSING|MINOR"

// The range ioctls a registration reports (bit numbers are _UFFDIO_*).
enum class UffdIoctl : unsigned {
  kWake = 0x02,
  kCopy = 0x03,
  kZeroPage = 0x04,
  kMove = 0x05,
  kWriteProtect = 0x06,
  kContinue = 0x07,
  kPoison = 0x08,
};

// Whether an ioctl that acts on a range wakes the threads waiting on it.
enum class UffdWake { kWake, kDontWake };

// UFFDIO_MOVE: whether holes in the source range are skipped or an error.
enum class UffdSrcHoles { kError, kAllow };

// What a page-installing ioctl did. Anything else is an error Status.
struct UffdFill {
  enum class Outcome {
    kDone,    // The whole range was installed.
    kExists,  // EEXIST: the first page of the range was already present
              // (another installer won the race). Nothing was installed and
              // nobody woken; the winner normally woke the faulter, but
              // Wake() if it installed with kDontWake.
    kRetry,   // EAGAIN: the kernel stopped early, after installing (and
              // waking, unless kDontWake) `bytes`: it met a present page, or
              // the address space was changing. Retry from dst + bytes; a
              // present page then shows as kExists.
  };
  Outcome outcome = Outcome::kDone;
  uint64_t bytes = 0;  // Installed from the start of the range.

  bool done() const { return outcome == Outcome::kDone; }
};

// One message read from a userfaultfd: a typed view of struct uffd_msg.
class UffdMessage {
 public:
  enum class Type : uint8_t {
    kPagefault = 0x12,
    kFork = 0x13,
    kRemap = 0x14,
    kRemove = 0x15,  // MADV_DONTNEED/MADV_REMOVE on a registered range
    kUnmap = 0x16,
  };

  Type type() const { return static_cast<Type>(raw_[0]); }

  // kPagefault. The address is page-aligned unless kUffdFeatureExactAddress
  // was requested.
  Hva fault_address() const { return Hva(Field<uint64_t>(16)); }
  uint64_t fault_flags() const { return Field<uint64_t>(8); }
  bool is_write() const { return (fault_flags() & kFlagWrite) != 0; }
  bool is_write_protect() const { return (fault_flags() & kFlagWriteProtect) != 0; }
  bool is_minor() const { return (fault_flags() & kFlagMinor) != 0; }
  // The faulting thread's id; 0 unless kUffdFeatureThreadId was requested.
  uint32_t thread_id() const { return Field<uint32_t>(24); }

  // kRemove and kUnmap: the range [start, end).
  Hva range_start() const { return Hva(Field<uint64_t>(8)); }
  Hva range_end() const { return Hva(Field<uint64_t>(16)); }

  // kRemap: mremap moved `remap_length()` bytes from `remap_from()`.
  Hva remap_from() const { return Hva(Field<uint64_t>(8)); }
  Hva remap_to() const { return Hva(Field<uint64_t>(16)); }
  uint64_t remap_length() const { return Field<uint64_t>(24); }

  // kFork: the new userfaultfd for the child (the reader owns it).
  int fork_fd() const { return static_cast<int>(Field<uint32_t>(8)); }

  static constexpr uint64_t kFlagWrite = 1ull << 0;         // UFFD_PAGEFAULT_FLAG_WRITE
  static constexpr uint64_t kFlagWriteProtect = 1ull << 1;  // UFFD_PAGEFAULT_FLAG_WP
  static constexpr uint64_t kFlagMinor = 1ull << 2;         // UFFD_PAGEFAULT_FLAG_MINOR

 private:
  template <typename T>
  T Field(size_t offset) const {
    T value;
    std::memcpy(&value, raw_ + offset, sizeof(T));
    return value;
  }
  alignas(8) unsigned char raw_[32] = {};  // struct uffd_msg, as read().
};
static_assert(sizeof(UffdMessage) == 32);

class Userfaultfd;

// A registered range; unregisters it on destruction. Keeps the userfaultfd
// open while it lives, so unregistering never hits a reused fd number.
// Unregister before the range is unmapped or remapped: after munmap the
// kernel has already forgotten the registration, and a new mapping at the
// same address is not ours to unregister.
class UffdRegistration {
 public:
  UffdRegistration() = default;
  ~UffdRegistration() { (void)Unregister(); }
  UffdRegistration(UffdRegistration&& other) noexcept { *this = std::move(other); }
  UffdRegistration& operator=(UffdRegistration&& other) noexcept;
  UffdRegistration(const UffdRegistration&) = delete;
  UffdRegistration& operator=(const UffdRegistration&) = delete;

  bool valid() const { return fd_ != nullptr; }
  Hva start() const { return start_; }
  uint64_t length() const { return length_; }
  UffdMode modes() const { return modes_; }
  // Bitmask of 1 << UffdIoctl the kernel allows on this range.
  uint64_t ioctls() const { return ioctls_; }
  bool Allows(UffdIoctl op) const { return (ioctls_ & (1ull << static_cast<unsigned>(op))) != 0; }

  // UFFDIO_UNREGISTER now (the destructor does it otherwise); idempotent.
  Status Unregister();

 private:
  friend class Userfaultfd;
  std::shared_ptr<const UniqueFd> fd_;
  Hva start_;
  uint64_t length_ = 0;
  UffdMode modes_ = UffdMode::kMissing;
  uint64_t ioctls_ = 0;
};

class Userfaultfd {
 public:
  // Opens a userfaultfd with the userfaultfd(2) syscall, or through
  // /dev/userfaultfd (USERFAULTFD_IOC_NEW) when the syscall is not permitted,
  // and performs the UFFDIO_API handshake enabling `features`. Fails, naming
  // them, if the kernel lacks any of `features`. `flags`: O_NONBLOCK and/or
  // kUffdUserModeOnly; O_CLOEXEC is always set.
  static Result<Userfaultfd> Create(int flags, uint64_t features);
  // A userfaultfd another process opened, registered and passed here
  // (SCM_RIGHTS): its API handshake is done, its features unknown here
  // (features() is 0). It is made non-blocking (O_NONBLOCK on the open file,
  // which the other process shares: it hands the reading to us), so that
  // several threads can poll and read it. Its ioctls act on the other
  // process's memory; they fail with ESRCH once that process's memory is
  // gone (it exited).
  static Result<Userfaultfd> Adopt(UniqueFd fd);

  Userfaultfd() = default;
  Userfaultfd(Userfaultfd&&) noexcept = default;
  Userfaultfd& operator=(Userfaultfd&&) noexcept = default;
  Userfaultfd(const Userfaultfd&) = delete;
  Userfaultfd& operator=(const Userfaultfd&) = delete;

  bool valid() const { return fd_ != nullptr && fd_->valid(); }
  int fd() const { return fd_ ? fd_->get() : -1; }
  // The features requested and enabled (plus the ones they imply).
  uint64_t features() const { return features_; }
  // Everything the kernel offers (a superset of features()).
  uint64_t available_features() const { return available_features_; }
  bool non_blocking() const { return non_blocking_; }

  // UFFDIO_REGISTER of [start, start + length); both page-aligned.
  Result<UffdRegistration> Register(Hva start, uint64_t length, UffdMode modes) const;

  // UFFDIO_COPY: fills missing pages at dst from src (any readable memory).
  Result<UffdFill> Copy(Hva dst, const void* src, uint64_t length,
                        UffdWake wake = UffdWake::kWake) const;
  // UFFDIO_ZEROPAGE: fills missing pages with zeros.
  Result<UffdFill> ZeroPage(Hva dst, uint64_t length, UffdWake wake = UffdWake::kWake) const;
  // UFFDIO_CONTINUE: maps pages already in the page cache (MINOR mode).
  Result<UffdFill> Continue(Hva dst, uint64_t length, UffdWake wake = UffdWake::kWake) const;
  // UFFDIO_MOVE: moves anonymous pages from src (leaving it empty) to dst,
  // without copying. src must be in the same process, private and anonymous.
  Result<UffdFill> Move(Hva dst, Hva src, uint64_t length, UffdWake wake = UffdWake::kWake,
                        UffdSrcHoles holes = UffdSrcHoles::kError) const;
  // UFFDIO_POISON: marks missing pages so that an access raises SIGBUS
  // (a memory error in the guest, via KVM).
  Result<UffdFill> Poison(Hva dst, uint64_t length, UffdWake wake = UffdWake::kWake) const;
  // UFFDIO_WRITEPROTECT: sets or clears write protection (WP mode).
  Status WriteProtect(Hva start, uint64_t length, bool protect,
                      UffdWake wake = UffdWake::kWake) const;
  // UFFDIO_WAKE: wakes threads waiting on faults in the range.
  Status Wake(Hva start, uint64_t length) const;

  // Reads up to buffer.size() messages. Returns how many were read: 0 when
  // none was pending on a non-blocking fd (EAGAIN) or the read was
  // interrupted by a signal (EINTR). A blocking fd waits for at least one.
  Result<size_t> ReadEvents(std::span<UffdMessage> buffer) const;
  // Waits up to timeout_ms (-1: forever) for a message; false on timeout.
  Result<bool> WaitReadable(int timeout_ms) const;

 private:
  std::shared_ptr<const UniqueFd> fd_;
  uint64_t features_ = 0;
  uint64_t available_features_ = 0;
  bool non_blocking_ = false;
};

}  // namespace faultline::sys
