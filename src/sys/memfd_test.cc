#include "src/sys/memfd.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <cstring>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "faultline/types.h"
#include "src/sys/mapping.h"

namespace faultline::sys {
namespace {

using ::testing::HasSubstr;

TEST(MemfdTest, CreateMapAndPunchHole) {
  const uint64_t size = 8 * kPageSize;
  auto fd = CreateMemfd("memfd-test", size, 0);
  ASSERT_TRUE(fd.has_value()) << fd.status().ToString();
  struct stat st = {};
  ASSERT_EQ(::fstat(fd->get(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), size);
  EXPECT_EQ(::fcntl(fd->get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);

  auto a = Mapping::Map(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd->get(), 0, "a");
  auto b = Mapping::Map(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd->get(), 0, "b");
  ASSERT_TRUE(a.has_value() && b.has_value());
  std::memset(a->data(), 0xab, size);
  EXPECT_EQ(b->data()[3 * kPageSize + 1], 0xab);

  ASSERT_TRUE(PunchHole(fd->get(), 2 * kPageSize, 3 * kPageSize).ok());
  EXPECT_EQ(a->data()[2 * kPageSize - 1], 0xab);
  for (uint64_t i = 2 * kPageSize; i < 5 * kPageSize; ++i) ASSERT_EQ(b->data()[i], 0) << i;
  EXPECT_EQ(a->data()[5 * kPageSize], 0xab);
  // The file keeps its size.
  ASSERT_EQ(::fstat(fd->get(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), size);
}

TEST(MemfdTest, ZeroSizeIsAnError) {
  auto fd = CreateMemfd("empty", 0, 0);
  ASSERT_FALSE(fd.has_value());
  EXPECT_THAT(fd.error().message(), HasSubstr("size is zero"));
}

TEST(MemfdTest, HugetlbSizeMustBeHugePageMultiple) {
  auto fd = CreateMemfd("huge", kHugePageSize + kPageSize, kMemfdHugetlb | kMemfdHuge2Mb);
  ASSERT_FALSE(fd.has_value());
  EXPECT_THAT(fd.error().message(), HasSubstr("not a multiple of the 2 MiB"));
}

TEST(MemfdTest, PunchHoleOnBadFdFails) {
  Status status = PunchHole(-1, 0, kPageSize);
  EXPECT_FALSE(status.ok());
  EXPECT_EQ(status.code(), EBADF);
  EXPECT_THAT(status.message(), HasSubstr("PUNCH_HOLE"));
}

TEST(MemfdTest, HugePagePoolAndShortageMessage) {
  auto pool = ReadHugePagePool();
  ASSERT_TRUE(pool.has_value()) << pool.status().ToString();
  EXPECT_EQ(pool->page_size, kHugePageSize);
  EXPECT_LE(pool->free, pool->total);
  const std::string message = HugePageShortage("ram 'r0'", 5 * kHugePageSize + 1);
  EXPECT_THAT(message, HasSubstr("ram 'r0' needs 6 free 2 MiB huge pages"));
  EXPECT_THAT(message, HasSubstr("> /proc/sys/vm/nr_hugepages"));
}

}  // namespace
}  // namespace faultline::sys
