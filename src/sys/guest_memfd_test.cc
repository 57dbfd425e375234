#include "src/sys/guest_memfd.h"

#include <fcntl.h>
#include <sys/mman.h>

#include <cstring>
#include <optional>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "faultline/types.h"
#include "src/sys/kvm.h"
#include "src/sys/mapping.h"
#include "src/sys/memfd.h"
#include "src/sys/userfaultfd.h"

namespace faultline::sys {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kSharedMmap = kGuestMemfdFlagMmap | kGuestMemfdFlagInitShared;

// Each test gets a VM for its guest_memfds to bind to, or skips, saying
// why, without /dev/kvm or on a KVM without guest_memfd (MMAP, INIT_SHARED).
class GuestMemfdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (Status probe = ProbeGuestMemfd(); !probe.ok()) {
      GTEST_SKIP() << "needs guest_memfd: " << probe.ToString();
    }
    auto kvm = KvmSystem::Open();
    ASSERT_TRUE(kvm.has_value()) << kvm.status().ToString();
    auto vm = kvm->CreateVm();
    ASSERT_TRUE(vm.has_value()) << vm.status().ToString();
    vm_.emplace(std::move(*vm));
  }
  int vm_fd() const { return vm_->fd(); }

  std::optional<KvmVm> vm_;
};

TEST_F(GuestMemfdTest, SharedMappingsAndPunchHole) {
  EXPECT_EQ(SupportedGuestMemfdFlags(vm_fd()) & kSharedMmap, kSharedMmap);
  const uint64_t size = 16 * kPageSize;
  auto gmem = CreateGuestMemfd(vm_fd(), size, kSharedMmap);
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

TEST_F(GuestMemfdTest, UnsupportedFlagsNameTheCapability) {
  auto gmem = CreateGuestMemfd(vm_fd(), kPageSize, 1ull << 62);
  ASSERT_FALSE(gmem.has_value());
  EXPECT_EQ(gmem.error().code(), EINVAL);
  EXPECT_THAT(gmem.error().message(), HasSubstr("KVM_CAP_GUEST_MEMFD_FLAGS"));
}

TEST(GuestMemfdArgsTest, SizeMustBePageMultiple) {
  auto gmem = CreateGuestMemfd(-1, kPageSize + 1, kSharedMmap);
  ASSERT_FALSE(gmem.has_value());
  EXPECT_THAT(gmem.error().message(), HasSubstr("multiple of 4096"));
}

TEST(GuestMemfdArgsTest, NotAVmFd) {
  auto memfd = CreateMemfd("not-a-vm", kPageSize, 0);
  ASSERT_TRUE(memfd.has_value());
  auto gmem = CreateGuestMemfd(memfd->get(), kPageSize, 0);
  ASSERT_FALSE(gmem.has_value());
  EXPECT_THAT(gmem.error().message(), HasSubstr("not a KVM VM fd"));
}

// On a KVM without guest_memfd (a nested or older kernel), the error names
// the capability that is missing.
TEST(GuestMemfdArgsTest, KvmWithoutGuestMemfdNamesTheCapability) {
  auto kvm = KvmSystem::Open();
  if (!kvm.has_value()) GTEST_SKIP() << "needs /dev/kvm: " << kvm.status().ToString();
  auto vm = kvm->CreateVm();
  ASSERT_TRUE(vm.has_value()) << vm.status().ToString();
  if (vm->CheckExtension(KVM_CAP_GUEST_MEMFD) > 0) {
    GTEST_SKIP() << "this KVM has guest_memfd (the tests above cover it)";
  }
  auto gmem = CreateGuestMemfd(vm->fd(), kPageSize, kSharedMmap);
  ASSERT_FALSE(gmem.has_value());
  EXPECT_THAT(gmem.error().message(), HasSubstr("KVM_CAP_GUEST_MEMFD is 0"));
  Status probe = ProbeGuestMemfd();
  ASSERT_FALSE(probe.ok());
  EXPECT_THAT(probe.ToString(), HasSubstr("KVM_CAP_GUEST_MEMFD is 0"));
}

// A fact the paging design depends on (DESIGN.md): guest_memfd mappings
// cannot be registered with userfaultfd, so they demand-page through memslot
// holes instead. If a kernel lifts this, the test says so.
TEST_F(GuestMemfdTest, UserfaultfdCannotRegisterMapping) {
  auto gmem = CreateGuestMemfd(vm_fd(), kPageSize, kSharedMmap);
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
