#include "src/sys/userfaultfd.h"

#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cstring>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/sys/linux_abi.h"
#include "src/sys/mapping.h"
#include "src/sys/memfd.h"

namespace faultline::sys {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kPage = kPageSize;
constexpr int kTimeoutMs = 10'000;

Userfaultfd MakeUffd(uint64_t features = 0) {
  auto uffd = Userfaultfd::Create(O_NONBLOCK, features);
  EXPECT_TRUE(uffd.has_value()) << uffd.status().ToString();
  return uffd.has_value() ? std::move(*uffd) : Userfaultfd();
}

Mapping MakeAnon(uint64_t pages) {
  auto map = Mapping::Anonymous(pages * kPage, "uffd test");
  EXPECT_TRUE(map.has_value()) << map.status().ToString();
  return map.has_value() ? std::move(*map) : Mapping();
}

// Waits for and reads exactly one message.
UffdMessage ReadOne(const Userfaultfd& uffd) {
  auto ready = uffd.WaitReadable(kTimeoutMs);
  EXPECT_TRUE(ready.has_value() && *ready) << "no userfaultfd message within the timeout";
  std::array<UffdMessage, 1> msgs;
  auto n = uffd.ReadEvents(msgs);
  EXPECT_TRUE(n.has_value()) << n.status().ToString();
  EXPECT_EQ(n.value_or(0), 1u);
  return msgs[0];
}

// Declare before the UffdRegistration it depends on: the registration is then
// destroyed first, which wakes a thread still blocked in a fault, and only
// then is the thread joined. A failing test thus cannot hang.
using Toucher = std::jthread;

TEST(UserfaultfdTest, CreateNegotiatesFeatures) {
  const uint64_t wanted = kUffdFeatureMove | kUffdFeaturePoison | kUffdFeatureThreadId |
                          kUffdFeatureMinorShmem | kUffdFeatureMissingShmem;
  auto uffd = Userfaultfd::Create(O_NONBLOCK, wanted);
  ASSERT_TRUE(uffd.has_value()) << uffd.status().ToString();
  EXPECT_TRUE(uffd->valid());
  EXPECT_TRUE(uffd->non_blocking());
  EXPECT_EQ(uffd->features() & wanted, wanted);
  EXPECT_EQ(uffd->available_features() & wanted, wanted);
  EXPECT_EQ(::fcntl(uffd->fd(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
}

TEST(UserfaultfdTest, UnknownFeatureIsNamed) {
  auto uffd = Userfaultfd::Create(0, 1ull << 62);
  ASSERT_FALSE(uffd.has_value());
  EXPECT_THAT(uffd.error().message(), HasSubstr("lacks userfaultfd features 0x4000000000000000"));
}

TEST(UserfaultfdTest, FeatureAndModeNames) {
  EXPECT_EQ(UffdFeatureNames(kUffdFeatureMove | kUffdFeaturePoison), "POISON|MOVE");
  EXPECT_EQ(UffdFeatureNames(0), "none");
  EXPECT_EQ(UffdModeNames(UffdMode::kMissing | UffdMode::kMinor), "MISSING|MINOR");
}

TEST(UserfaultfdTest, NothingPendingReadsZero) {
  Userfaultfd uffd = MakeUffd();
  std::array<UffdMessage, 4> msgs;
  auto n = uffd.ReadEvents(msgs);
  ASSERT_TRUE(n.has_value()) << n.status().ToString();
  EXPECT_EQ(*n, 0u);
  auto ready = uffd.WaitReadable(0);
  ASSERT_TRUE(ready.has_value());
  EXPECT_FALSE(*ready);
}

TEST(UserfaultfdTest, MissingFaultResolvedByCopy) {
  Userfaultfd uffd = MakeUffd(kUffdFeatureThreadId);
  Mapping map = MakeAnon(4);
  std::atomic<pid_t> toucher_tid{0};
  uint8_t seen = 0;
  Toucher toucher;
  auto reg = uffd.Register(map.hva(), map.size(), UffdMode::kMissing);
  ASSERT_TRUE(reg.has_value()) << reg.status().ToString();
  EXPECT_TRUE(reg->Allows(UffdIoctl::kCopy));
  EXPECT_TRUE(reg->Allows(UffdIoctl::kZeroPage));
  EXPECT_TRUE(reg->Allows(UffdIoctl::kMove));
  EXPECT_TRUE(reg->Allows(UffdIoctl::kPoison));
  EXPECT_TRUE(reg->Allows(UffdIoctl::kWake));

  toucher = std::jthread([&] {
    toucher_tid = ::gettid();
    seen = *reinterpret_cast<volatile uint8_t*>(map.data() + 2 * kPage + 123);
  });
  UffdMessage msg = ReadOne(uffd);
  ASSERT_EQ(msg.type(), UffdMessage::Type::kPagefault);
  EXPECT_EQ(msg.fault_address(), map.hva() + 2 * kPage);
  EXPECT_FALSE(msg.is_write());
  EXPECT_FALSE(msg.is_minor());
  EXPECT_EQ(msg.thread_id(), static_cast<uint32_t>(toucher_tid.load()));

  std::array<uint8_t, kPage> page;
  page.fill(0x5a);
  auto fill = uffd.Copy(msg.fault_address(), page.data(), kPage);
  ASSERT_TRUE(fill.has_value()) << fill.status().ToString();
  EXPECT_EQ(fill->outcome, UffdFill::Outcome::kDone);
  EXPECT_EQ(fill->bytes, kPage);
  toucher.join();
  EXPECT_EQ(seen, 0x5a);

  // The page is present now: a second copy races with nobody but still is
  // told apart from failure.
  auto again = uffd.Copy(msg.fault_address(), page.data(), kPage);
  ASSERT_TRUE(again.has_value()) << again.status().ToString();
  EXPECT_EQ(again->outcome, UffdFill::Outcome::kExists);
  EXPECT_EQ(again->bytes, 0u);

  // A copy over two pages whose second exists installs the first, then
  // stops: partial progress is reported as kRetry with the bytes done.
  auto partial = uffd.Copy(map.hva() + kPage, page.data(), kPage, UffdWake::kDontWake);
  ASSERT_TRUE(partial.has_value());
  EXPECT_EQ(partial->outcome, UffdFill::Outcome::kDone);
  std::array<uint8_t, 2 * kPage> two;
  two.fill(0x77);
  auto stopped = uffd.Copy(map.hva(), two.data(), 2 * kPage);
  ASSERT_TRUE(stopped.has_value()) << stopped.status().ToString();
  EXPECT_EQ(stopped->outcome, UffdFill::Outcome::kRetry);
  EXPECT_EQ(stopped->bytes, kPage);
  EXPECT_EQ(map.data()[0], 0x77);
  EXPECT_EQ(map.data()[kPage], 0x5a);
}

TEST(UserfaultfdTest, CopyWithoutWakeThenWake) {
  Userfaultfd uffd = MakeUffd();
  Mapping map = MakeAnon(1);
  uint8_t seen = 0;
  Toucher toucher;
  auto reg = uffd.Register(map.hva(), map.size(), UffdMode::kMissing);
  ASSERT_TRUE(reg.has_value()) << reg.status().ToString();
  toucher = std::jthread([&] { seen = *reinterpret_cast<volatile uint8_t*>(map.data()); });
  UffdMessage msg = ReadOne(uffd);
  ASSERT_EQ(msg.type(), UffdMessage::Type::kPagefault);
  std::array<uint8_t, kPage> page;
  page.fill(0x11);
  auto fill = uffd.Copy(map.hva(), page.data(), kPage, UffdWake::kDontWake);
  ASSERT_TRUE(fill.has_value() && fill->done()) << fill.status().ToString();
  ASSERT_TRUE(uffd.Wake(map.hva(), kPage).ok());
  toucher.join();
  EXPECT_EQ(seen, 0x11);
}

TEST(UserfaultfdTest, ZeroPage) {
  Userfaultfd uffd = MakeUffd();
  Mapping map = MakeAnon(2);
  uint8_t seen = 0xff;
  Toucher toucher;
  auto reg = uffd.Register(map.hva(), map.size(), UffdMode::kMissing);
  ASSERT_TRUE(reg.has_value()) << reg.status().ToString();
  toucher =
      std::jthread([&] { seen = *reinterpret_cast<volatile uint8_t*>(map.data() + kPage + 7); });
  UffdMessage msg = ReadOne(uffd);
  ASSERT_EQ(msg.type(), UffdMessage::Type::kPagefault);
  EXPECT_EQ(msg.fault_address(), map.hva() + kPage);
  auto fill = uffd.ZeroPage(msg.fault_address(), kPage);
  ASSERT_TRUE(fill.has_value()) << fill.status().ToString();
  EXPECT_TRUE(fill->done());
  toucher.join();
  EXPECT_EQ(seen, 0);
  auto again = uffd.ZeroPage(msg.fault_address(), kPage);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->outcome, UffdFill::Outcome::kExists);
}

TEST(UserfaultfdTest, MinorFaultResolvedByContinue) {
  Userfaultfd uffd = MakeUffd(kUffdFeatureMinorShmem);
  const uint64_t size = 4 * kPage;
  auto memfd = CreateMemfd("uffd-minor", size, 0);
  ASSERT_TRUE(memfd.has_value()) << memfd.status().ToString();
  auto primary = Mapping::Map(size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd->get(), 0, "primary");
  auto alias = Mapping::Map(size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd->get(), 0, "alias");
  ASSERT_TRUE(primary.has_value() && alias.has_value());
  uint8_t seen = 0;
  Toucher toucher;
  auto reg = uffd.Register(primary->hva(), size, UffdMode::kMinor);
  ASSERT_TRUE(reg.has_value()) << reg.status().ToString();
  EXPECT_TRUE(reg->Allows(UffdIoctl::kContinue));
  EXPECT_EQ(reg->modes(), UffdMode::kMinor);

  // The "received" data goes into the page cache through the alias, which is
  // not registered; the primary mapping still faults on it.
  std::memset(alias->data() + kPage, 0xc3, kPage);
  toucher = std::jthread(
      [&] { seen = *reinterpret_cast<volatile uint8_t*>(primary->data() + kPage + 9); });
  UffdMessage msg = ReadOne(uffd);
  ASSERT_EQ(msg.type(), UffdMessage::Type::kPagefault);
  EXPECT_TRUE(msg.is_minor());
  EXPECT_EQ(msg.fault_address(), primary->hva() + kPage);
  auto fill = uffd.Continue(msg.fault_address(), kPage);
  ASSERT_TRUE(fill.has_value()) << fill.status().ToString();
  EXPECT_TRUE(fill->done());
  toucher.join();
  EXPECT_EQ(seen, 0xc3);

  auto again = uffd.Continue(msg.fault_address(), kPage);
  ASSERT_TRUE(again.has_value()) << again.status().ToString();
  EXPECT_EQ(again->outcome, UffdFill::Outcome::kExists);
}

TEST(UserfaultfdTest, MoveStagingPage) {
  Userfaultfd uffd = MakeUffd(kUffdFeatureMove);
  Mapping dst = MakeAnon(2);
  Mapping staging = MakeAnon(1);
  uint8_t seen = 0;
  Toucher toucher;
  auto reg = uffd.Register(dst.hva(), dst.size(), UffdMode::kMissing);
  ASSERT_TRUE(reg.has_value()) << reg.status().ToString();
  ASSERT_TRUE(reg->Allows(UffdIoctl::kMove));

  std::memset(staging.data(), 0x3c, kPage);  // "received" into the staging page
  toucher =
      std::jthread([&] { seen = *reinterpret_cast<volatile uint8_t*>(dst.data() + kPage + 100); });
  UffdMessage msg = ReadOne(uffd);
  ASSERT_EQ(msg.type(), UffdMessage::Type::kPagefault);
  auto fill = uffd.Move(msg.fault_address(), staging.hva(), kPage);
  ASSERT_TRUE(fill.has_value()) << fill.status().ToString();
  EXPECT_TRUE(fill->done());
  toucher.join();
  EXPECT_EQ(seen, 0x3c);
  // The page moved rather than being copied: the staging page is empty.
  EXPECT_EQ(staging.data()[0], 0);

  // Moving from a hole fails unless holes are allowed.
  Mapping empty = MakeAnon(1);
  auto hole = uffd.Move(dst.hva(), empty.hva(), kPage);
  ASSERT_FALSE(hole.has_value());
  EXPECT_EQ(hole.error().code(), ENOENT);
  auto allowed = uffd.Move(dst.hva(), empty.hva(), kPage, UffdWake::kWake, UffdSrcHoles::kAllow);
  ASSERT_TRUE(allowed.has_value()) << allowed.status().ToString();
}

sigjmp_buf g_sigbus_jump;  // Only touched by PoisonRaisesSigbus and its handler.
std::atomic<uintptr_t> g_sigbus_addr{0};

void OnSigbus(int, siginfo_t* info, void*) {
  g_sigbus_addr = reinterpret_cast<uintptr_t>(info->si_addr);
  siglongjmp(g_sigbus_jump, 1);
}

TEST(UserfaultfdTest, PoisonRaisesSigbus) {
  Userfaultfd uffd = MakeUffd(kUffdFeaturePoison);
  Mapping map = MakeAnon(2);
  auto reg = uffd.Register(map.hva(), map.size(), UffdMode::kMissing);
  ASSERT_TRUE(reg.has_value()) << reg.status().ToString();
  auto fill = uffd.Poison(map.hva() + kPage, kPage);
  ASSERT_TRUE(fill.has_value()) << fill.status().ToString();
  EXPECT_TRUE(fill->done());

  struct sigaction action = {};
  struct sigaction old = {};
  action.sa_sigaction = OnSigbus;
  action.sa_flags = SA_SIGINFO;
  sigemptyset(&action.sa_mask);
  ASSERT_EQ(::sigaction(SIGBUS, &action, &old), 0);
  volatile bool faulted = false;
  if (sigsetjmp(g_sigbus_jump, 1) == 0) {
    (void)*reinterpret_cast<volatile uint8_t*>(map.data() + kPage + 5);
  } else {
    faulted = true;
  }
  ::sigaction(SIGBUS, &old, nullptr);
  EXPECT_TRUE(faulted);
  EXPECT_EQ(g_sigbus_addr.load(), reinterpret_cast<uintptr_t>(map.data() + kPage + 5));

  // Poisoning a present page is a race that lost, not a failure.
  auto again = uffd.Poison(map.hva() + kPage, kPage);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->outcome, UffdFill::Outcome::kExists);
}

TEST(UserfaultfdTest, RegistrationUnregistersOnDestruction) {
  Userfaultfd first = MakeUffd();
  Userfaultfd second = MakeUffd();
  Mapping map = MakeAnon(2);
  {
    auto reg = first.Register(map.hva(), map.size(), UffdMode::kMissing);
    ASSERT_TRUE(reg.has_value()) << reg.status().ToString();
    // A range belongs to one userfaultfd at a time.
    auto taken = second.Register(map.hva(), map.size(), UffdMode::kMissing);
    ASSERT_FALSE(taken.has_value());
    EXPECT_EQ(taken.error().code(), EBUSY);
    // Moving keeps one registration alive.
    UffdRegistration moved = std::move(*reg);
    EXPECT_FALSE(reg->valid());
    EXPECT_TRUE(moved.valid());
  }
  auto reg = second.Register(map.hva(), map.size(), UffdMode::kMissing);
  ASSERT_TRUE(reg.has_value()) << reg.status().ToString();
  ASSERT_TRUE(reg->Unregister().ok());
  EXPECT_FALSE(reg->valid());
  ASSERT_TRUE(reg->Unregister().ok());  // idempotent
  // Unregistered: touching the memory no longer faults to us.
  map.data()[0] = 1;
  EXPECT_EQ(map.data()[0], 1);
}

TEST(UserfaultfdTest, RegistrationOutlivesUserfaultfd) {
  Mapping map = MakeAnon(1);
  UffdRegistration reg;
  {
    Userfaultfd uffd = MakeUffd();
    auto r = uffd.Register(map.hva(), map.size(), UffdMode::kMissing);
    ASSERT_TRUE(r.has_value()) << r.status().ToString();
    reg = std::move(*r);
  }
  // The fd is still open through the registration, so this unregisters the
  // right thing rather than whatever reused the fd number.
  EXPECT_TRUE(reg.Unregister().ok());
  map.data()[0] = 2;
  EXPECT_EQ(map.data()[0], 2);
}

TEST(UserfaultfdTest, RegisterBadRangeExplains) {
  Userfaultfd uffd = MakeUffd();
  Mapping map = MakeAnon(1);
  auto reg = uffd.Register(map.hva() + 1, kPage, UffdMode::kMissing);
  ASSERT_FALSE(reg.has_value());
  EXPECT_EQ(reg.error().code(), EINVAL);
  EXPECT_THAT(reg.error().message(), HasSubstr("page-aligned"));
}

TEST(UserfaultfdTest, RemoveEvent) {
  Userfaultfd uffd = MakeUffd(kUffdFeatureEventRemove);
  Mapping map = MakeAnon(4);
  std::memset(map.data(), 1, map.size());  // populate before registering
  Toucher remover;
  auto reg = uffd.Register(map.hva(), map.size(), UffdMode::kMissing);
  ASSERT_TRUE(reg.has_value()) << reg.status().ToString();
  // MADV_DONTNEED waits until the monitor has read the event.
  remover = std::jthread([&] { ::madvise(map.data() + kPage, 2 * kPage, MADV_DONTNEED); });
  UffdMessage msg = ReadOne(uffd);
  ASSERT_EQ(msg.type(), UffdMessage::Type::kRemove);
  EXPECT_EQ(msg.range_start(), map.hva() + kPage);
  EXPECT_EQ(msg.range_end(), map.hva() + 3 * kPage);
}

// Runs Userfaultfd::Create in a child process in which the userfaultfd
// syscall fails with EPERM (as for an unprivileged user with
// vm.unprivileged_userfaultfd = 0) and, if `deny_device`, so does
// USERFAULTFD_IOC_NEW on /dev/userfaultfd. Returns "OK" or the error.
std::string CreateWithSyscallDenied(bool deny_device) {
  int pipe_fds[2];
  if (::pipe(pipe_fds) != 0) return "pipe failed";
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(pipe_fds[0]);
    // x86-64 only, like the rest of the project; the arch is not checked.
    sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_userfaultfd, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_ioctl, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, args[1])),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, deny_device ? USERFAULTFD_IOC_NEW : ~0u, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    sock_fprog prog = {static_cast<unsigned short>(std::size(filter)), filter};
    std::string result = "seccomp setup failed";
    if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
        ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0) {
      auto uffd = Userfaultfd::Create(O_NONBLOCK, kUffdFeatureMove);
      result = uffd.has_value() ? "OK" : uffd.error().ToString();
    }
    (void)!::write(pipe_fds[1], result.data(), result.size());
    ::_exit(0);
  }
  ::close(pipe_fds[1]);
  std::string out;
  char buf[512];
  ssize_t n;
  while ((n = ::read(pipe_fds[0], buf, sizeof(buf))) > 0) out.append(buf, n);
  ::close(pipe_fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return out;
}

TEST(UserfaultfdTest, FallsBackToDevUserfaultfd) {
  if (::access("/dev/userfaultfd", R_OK | W_OK) != 0) GTEST_SKIP() << "no /dev/userfaultfd";
  EXPECT_EQ(CreateWithSyscallDenied(/*deny_device=*/false), "OK");
}

TEST(UserfaultfdTest, NotPermittedSaysWhatToDo) {
  EXPECT_THAT(CreateWithSyscallDenied(/*deny_device=*/true),
              HasSubstr("userfaultfd not permitted: run as root or set "
                        "vm.unprivileged_userfaultfd=1 (sysctl), or grant access to "
                        "/dev/userfaultfd"));
}

}  // namespace
}  // namespace faultline::sys
