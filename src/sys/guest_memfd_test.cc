#include "src/sys/guest_memfd.h"

#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include <cstring>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "faultline/types.h"
#include "src/sys/mapping.h"
#include "src/sys/memfd.h"
#include "src/sys/userfaultfd.h"

namespace faultline::sys {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kSharedMmap = kGuestMemfdFlagMmap | kGuestMemfdFlagInitShared;

// A VM fd for guest_memfd to bind to; invalid (and the test skips) without
// /dev/kvm.
UniqueFd OpenVm() {
  UniqueFd kvm(::open("/dev/kvm", O_RDWR | O_CLOEXEC));
  if (!kvm.valid()) return UniqueFd();
  return UniqueFd(::ioctl(kvm.get(), KVM_CREATE_VM, 0));
}

#define SKIP_WITHOUT_VM(vm) \
  if (!(vm).valid()) GTEST_SKIP() << "/dev/kvm is not available: " << std::strerror(errno)

TEST(GuestMemfdTest, SharedMappingsAndPunchHole) {
  UniqueFd vm = OpenVm();
  SKIP_WITHOUT_VM(vm);
  EXPECT_EQ(SupportedGuestMemfdFlags(vm.get()) & kSharedMmap, kSharedMmap);
  const uint64_t size = 16 * kPageSize;
  auto gmem = CreateGuestMemfd(vm.get(), size, kSharedMmap);
  ASSERT_TRUE(gmem.has_value()) << gmem.status().ToString();

  auto a = Mapping::Map(size, PROT_READ | PROT_WRITE, MAP_SHARED, gmem->get(), 0, "gmem a");
  auto b = Mapping::Map(size, PROT_READ | PROT_WRITE, MAP_SHARED, gmem->get(), 0, "gmem b");
  ASSERT_TRUE(a.has_value()) << a.status().ToString();
  ASSERT_TRUE(b.has_value()) << b.status().ToString();
  std::memset(a->data(), 0x42, size);
  EXPECT_EQ(b->data()[7 * kPageSize + 3], 0x42);

  ASSERT_TRUE(PunchHole(gmem->get(), 4 * kPageSize, 2 * kPageSize).ok());
  for (uint64_t i = 4 * kPageSize; i < 6 * kPageSize; ++i) ASSERT_EQ(a->data()[i], 0) << i;
  EXPECT_EQ(b->data()[6 * kPageSize], 0x42);
}

TEST(GuestMemfdTest, UnsupportedFlagsNameTheCapability) {
  UniqueFd vm = OpenVm();
  SKIP_WITHOUT_VM(vm);
  auto gmem = CreateGuestMemfd(vm.get(), kPageSize, 1ull << 62);
  ASSERT_FALSE(gmem.has_value());
  EXPECT_EQ(gmem.error().code(), EINVAL);
  EXPECT_THAT(gmem.error().message(), HasSubstr("KVM_CAP_GUEST_MEMFD_FLAGS"));
}

TEST(GuestMemfdTest, SizeMustBePageMultiple) {
  auto gmem = CreateGuestMemfd(-1, kPageSize + 1, kSharedMmap);
  ASSERT_FALSE(gmem.has_value());
  EXPECT_THAT(gmem.error().message(), HasSubstr("multiple of 4096"));
}

TEST(GuestMemfdTest, NotAVmFd) {
  auto memfd = CreateMemfd("not-a-vm", kPageSize, 0);
  ASSERT_TRUE(memfd.has_value());
  auto gmem = CreateGuestMemfd(memfd->get(), kPageSize, 0);
  ASSERT_FALSE(gmem.has_value());
  EXPECT_THAT(gmem.error().message(), HasSubstr("not a KVM VM fd"));
}

// A fact the paging design depends on (DESIGN.md): guest_memfd mappings
// cannot be registered with userfaultfd, so they demand-page through memslot
// holes instead. If a kernel lifts this, the test says so.
TEST(GuestMemfdTest, UserfaultfdCannotRegisterMapping) {
  UniqueFd vm = OpenVm();
  SKIP_WITHOUT_VM(vm);
  auto gmem = CreateGuestMemfd(vm.get(), kPageSize, kSharedMmap);
  ASSERT_TRUE(gmem.has_value()) << gmem.status().ToString();
  auto map = Mapping::Map(kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED, gmem->get(), 0, "gmem");
  ASSERT_TRUE(map.has_value());
  auto uffd = Userfaultfd::Create(O_NONBLOCK, 0);
  ASSERT_TRUE(uffd.has_value()) << uffd.status().ToString();
  auto reg = uffd->Register(map->hva(), kPageSize, UffdMode::kMissing);
  if (reg.has_value()) GTEST_SKIP() << "this kernel registers guest_memfd mappings with uffd";
  EXPECT_EQ(reg.error().code(), EINVAL);
  EXPECT_THAT(reg.error().message(), HasSubstr("guest_memfd"));
}

}  // namespace
}  // namespace faultline::sys
