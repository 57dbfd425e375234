#include "faultline/ram_block.h"

#include <fcntl.h>

#include <array>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/sys/guest_memfd.h"
#include "src/sys/memfd.h"
#include "src/sys/userfaultfd.h"

namespace faultline {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kMiB = 1ull << 20;

std::shared_ptr<RamBlock> MustCreate(const RamBlockOptions& options) {
  auto block = RamBlock::Create(options);
  EXPECT_TRUE(block.has_value()) << block.status().ToString();
  return block.has_value() ? *block : nullptr;
}

bool AllZero(const uint8_t* p, uint64_t n) {
  for (uint64_t i = 0; i < n; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

// Writes a pattern at `offset` through `writer` and checks it through
// `reader`; then discards the page-size-aligned range around it and checks
// that both read back zeros while the neighbours keep their data.
void CheckWriteAndDiscard(RamBlock& block, uint8_t* writer, uint8_t* reader) {
  const uint64_t page = block.page_size();
  ASSERT_GE(block.pages(), 3u);
  std::memset(writer, 0x5c, 3 * page);
  EXPECT_EQ(reader[page + 17], 0x5c);
  ASSERT_TRUE(block.Discard(page, page).ok());
  EXPECT_TRUE(AllZero(block.host() + page, page));
  if (block.alias() != nullptr) {
    EXPECT_TRUE(AllZero(block.alias() + page, page));
  }
  EXPECT_EQ(reader[page - 1], 0x5c);
  EXPECT_EQ(reader[2 * page], 0x5c);
}

TEST(RamBlockTest, BackingNames) {
  for (Backing b :
       {Backing::kAnonymous, Backing::kMemfd, Backing::kHugetlb, Backing::kGuestMemfd}) {
    auto parsed = ParseBacking(BackingName(b));
    ASSERT_TRUE(parsed.has_value());
    EXPECT_EQ(*parsed, b);
  }
  EXPECT_STREQ(BackingName(Backing::kGuestMemfd), "gmem");
  auto bad = ParseBacking("shmem");
  ASSERT_FALSE(bad.has_value());
  EXPECT_THAT(bad.error().message(), HasSubstr("anon, memfd, hugetlb or gmem"));
}

TEST(RamBlockTest, SizeMustBeNonZeroPageMultiple) {
  auto zero = RamBlock::Create({.name = "ram0", .size = 0});
  ASSERT_FALSE(zero.has_value());
  EXPECT_THAT(zero.error().message(), HasSubstr("RAM block 'ram0'"));
  auto odd = RamBlock::Create({.name = "ram1", .size = kPageSize + 1, .backing = Backing::kMemfd});
  ASSERT_FALSE(odd.has_value());
  EXPECT_THAT(odd.error().message(), HasSubstr("'ram1': size 4097 is not a non-zero multiple"));
  auto huge = RamBlock::Create({.name = "ram2", .size = 3 * kMiB, .backing = Backing::kHugetlb});
  ASSERT_FALSE(huge.has_value());
  EXPECT_THAT(huge.error().message(), HasSubstr("hugetlb page size (2 MiB)"));
}

TEST(RamBlockTest, Anonymous) {
  auto block = MustCreate({.name = "anon", .size = 4 * kMiB, .transparent_huge_pages = true});
  ASSERT_NE(block, nullptr);
  EXPECT_EQ(block->backing(), Backing::kAnonymous);
  EXPECT_EQ(block->page_size(), kPageSize);
  EXPECT_EQ(block->pages(), 1024u);
  EXPECT_EQ(block->alias(), nullptr);
  EXPECT_EQ(block->fd(), -1);
  CheckWriteAndDiscard(*block, block->host(), block->host());
}

TEST(RamBlockTest, MemfdAliasSharesPages) {
  auto block = MustCreate({.name = "shm", .size = 1 * kMiB, .backing = Backing::kMemfd});
  ASSERT_NE(block, nullptr);
  ASSERT_NE(block->alias(), nullptr);
  EXPECT_NE(block->alias(), block->host());
  EXPECT_GE(block->fd(), 0);
  CheckWriteAndDiscard(*block, block->alias(), block->host());
}

TEST(RamBlockTest, DiscardChecksRange) {
  auto block = MustCreate({.name = "r", .size = 8 * kPageSize, .backing = Backing::kMemfd});
  ASSERT_NE(block, nullptr);
  Status misaligned = block->Discard(1, kPageSize);
  EXPECT_THAT(misaligned.message(), HasSubstr("not aligned"));
  Status outside = block->Discard(4 * kPageSize, 8 * kPageSize);
  EXPECT_THAT(outside.message(), HasSubstr("outside"));
  Status wraps = block->Discard(4 * kPageSize, ~uint64_t{0} - kPageSize + 1);
  EXPECT_FALSE(wraps.ok());
  EXPECT_TRUE(block->Discard(8 * kPageSize, 0).ok());
}

// The contract the post-copy installer relies on: writing through alias()
// does not fault, and host() still takes a MINOR fault that CONTINUE resolves.
TEST(RamBlockTest, MemfdAliasWritesDoNotFaultHost) {
  auto block = MustCreate({.name = "minor", .size = 16 * kPageSize, .backing = Backing::kMemfd});
  ASSERT_NE(block, nullptr);
  auto uffd = sys::Userfaultfd::Create(O_NONBLOCK, sys::kUffdFeatureMinorShmem);
  ASSERT_TRUE(uffd.has_value()) << uffd.status().ToString();
  uint8_t seen = 0;
  std::jthread toucher;  // joined after the registration is gone (wakes it)
  auto reg = uffd->Register(Hva(block->host()), block->size(), sys::UffdMode::kMinor);
  ASSERT_TRUE(reg.has_value()) << reg.status().ToString();
  std::memset(block->alias() + 5 * kPageSize, 0x99, kPageSize);
  toucher = std::jthread(
      [&] { seen = *reinterpret_cast<volatile uint8_t*>(block->host() + 5 * kPageSize); });
  auto ready = uffd->WaitReadable(10'000);
  ASSERT_TRUE(ready.has_value() && *ready);
  std::array<sys::UffdMessage, 1> msg;
  ASSERT_EQ(uffd->ReadEvents(msg).value_or(0), 1u);
  EXPECT_TRUE(msg[0].is_minor());
  EXPECT_EQ(msg[0].fault_address(), Hva(block->host() + 5 * kPageSize));
  auto fill = uffd->Continue(msg[0].fault_address(), kPageSize);
  ASSERT_TRUE(fill.has_value() && fill->done()) << fill.status().ToString();
  toucher.join();
  EXPECT_EQ(seen, 0x99);
}

// Sets /proc/sys/vm/nr_hugepages for the test's duration.
class ScopedNrHugepages {
 public:
  static constexpr const char* kPath = "/proc/sys/vm/nr_hugepages";

  explicit ScopedNrHugepages(uint64_t extra) {
    std::ifstream in(kPath);
    uint64_t value = 0;
    if (!(in >> value)) return;
    original_ = value;
    ok_ = Write(value + extra);
  }
  ~ScopedNrHugepages() {
    if (original_.has_value()) Write(*original_);
  }
  bool ok() const { return ok_; }

 private:
  static bool Write(uint64_t value) {
    std::ofstream out(kPath);
    out << value << '\n';
    out.flush();
    return out.good();
  }
  std::optional<uint64_t> original_;
  bool ok_ = false;
};

// KernelPageSize (kB) of the mapping that starts at `addr`, from smaps.
uint64_t KernelPageSizeKb(const void* addr) {
  std::ifstream smaps("/proc/self/smaps");
  const std::string start = fmt::format("{:x}-", reinterpret_cast<uintptr_t>(addr));
  std::string line;
  bool in_entry = false;
  while (std::getline(smaps, line)) {
    std::istringstream fields(line);
    std::string first;
    fields >> first;
    if (first.find(':') == std::string::npos) {  // "start-end perms ..." starts an entry
      in_entry = first.rfind(start, 0) == 0;
    } else if (in_entry && first == "KernelPageSize:") {
      uint64_t kb = 0;
      fields >> kb;
      return kb;
    }
  }
  return 0;
}

TEST(RamBlockTest, HugetlbUses2MiBPages) {
  constexpr uint64_t kPages = 3;
  auto before = sys::ReadHugePagePool();
  ASSERT_TRUE(before.has_value());
  ScopedNrHugepages reserve(kPages);
  if (!reserve.ok()) GTEST_SKIP() << "cannot write /proc/sys/vm/nr_hugepages (not root?)";
  auto pool = sys::ReadHugePagePool();
  ASSERT_TRUE(pool.has_value());
  if (pool->available() < kPages) {
    GTEST_SKIP() << "the kernel could not allocate " << kPages << " huge pages (fragmented?)";
  }
  auto block =
      MustCreate({.name = "huge", .size = kPages * kHugePageSize, .backing = Backing::kHugetlb});
  ASSERT_NE(block, nullptr);
  EXPECT_EQ(block->page_size(), kHugePageSize);
  EXPECT_EQ(block->pages(), kPages);
  ASSERT_NE(block->alias(), nullptr);
  EXPECT_EQ(KernelPageSizeKb(block->host()), 2048u);
  EXPECT_EQ(KernelPageSizeKb(block->alias()), 2048u);

  auto reserved = sys::ReadHugePagePool();
  ASSERT_TRUE(reserved.has_value());
  EXPECT_GE(reserved->reserved, kPages);  // reserved at mmap, before any touch
  CheckWriteAndDiscard(*block, block->alias(), block->host());
  auto touched = sys::ReadHugePagePool();
  ASSERT_TRUE(touched.has_value());
  // Three pages touched, the middle one discarded again.
  EXPECT_LE(touched->free + 2, pool->free);
  block.reset();
}

TEST(RamBlockTest, HugetlbShortageSaysHowToReserve) {
  // More huge pages than the machine has memory: no pool can satisfy it, so
  // the test does not depend on what else runs.
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  uint64_t mem_total_kb = 0;
  ASSERT_TRUE(meminfo >> key >> mem_total_kb);
  ASSERT_EQ(key, "MemTotal:");
  const uint64_t size = AlignUp(mem_total_kb * 1024, kHugePageSize) + kHugePageSize;
  auto block = RamBlock::Create({.name = "toobig", .size = size, .backing = Backing::kHugetlb});
  ASSERT_FALSE(block.has_value());
  const std::string message = block.error().ToString();
  EXPECT_THAT(message, HasSubstr("RAM block 'toobig' needs"));
  EXPECT_THAT(message, HasSubstr(fmt::format("needs {} free 2 MiB huge pages", size >> 21)));
  EXPECT_THAT(message, HasSubstr("> /proc/sys/vm/nr_hugepages"));
}

TEST(RamBlockTest, GuestMemfd) {
  if (Status probe = sys::ProbeGuestMemfd(); !probe.ok()) {
    GTEST_SKIP() << "needs guest_memfd: " << probe.ToString();
  }
  auto vm = sys::CreateGuestMemfdOwner();
  ASSERT_TRUE(vm.has_value()) << vm.status().ToString();
  auto block = MustCreate(
      {.name = "gmem", .size = 2 * kMiB, .backing = Backing::kGuestMemfd, .vm_fd = vm->get()});
  ASSERT_NE(block, nullptr);
  EXPECT_GE(block->fd(), 0);
  ASSERT_NE(block->alias(), nullptr);
  CheckWriteAndDiscard(*block, block->alias(), block->host());
}

TEST(RamBlockTest, GuestMemfdNeedsVm) {
  auto block = RamBlock::Create({.name = "g", .size = kMiB, .backing = Backing::kGuestMemfd});
  ASSERT_FALSE(block.has_value());
  EXPECT_THAT(block.error().message(), HasSubstr("RamBlockOptions::vm_fd"));
}

}  // namespace
}  // namespace faultline
