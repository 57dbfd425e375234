// ServedMemory over blocks in memory (serve-pages --from): the memory file
// is the blocks end to end, every page is data, and a client's fetch makes
// its range present first (the pager's EnsurePresent), then copies it.
#include "src/migration/served_memory.h"

#include <cstring>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "faultline/types.h"

namespace faultline::migration {
namespace {

std::shared_ptr<RamBlock> Block(const char* name, uint64_t pages, uint8_t fill) {
  auto block = RamBlock::Create({.name = name, .size = pages * kPageSize});
  if (!block.has_value()) return nullptr;
  for (uint64_t p = 0; p < pages; ++p) {
    std::memset((*block)->host() + p * kPageSize, fill + static_cast<uint8_t>(p), kPageSize);
  }
  return *block;
}

struct Ensured {
  uint32_t block;
  uint64_t offset, length;
  friend bool operator==(const Ensured&, const Ensured&) = default;
};

TEST(ServedMemoryTest, BlocksAreOneFileOfDataMadePresentBeforeEachCopy) {
  auto a = Block("ram0", 3, 0x10), b = Block("ram1", 2, 0x40);
  ASSERT_TRUE(a && b);
  std::vector<Ensured> ensured;
  auto memory = ServedMemory::FromBlocks(
      {a, b}, [&](uint32_t block, uint64_t offset, uint64_t length) -> Status {
        ensured.push_back({block, offset, length});
        if (block == 1 && offset == kPageSize) return Error("the link broke");
        return Status::Ok();
      });
  ASSERT_TRUE(memory.has_value()) << memory.error().ToString();
  EXPECT_EQ((*memory)->size(), 5 * kPageSize);
  EXPECT_EQ((*memory)->data_pages(), 5u);
  EXPECT_TRUE((*memory)->ZeroUnits(0, 5 * kPageSize, kPageSize).empty());
  const auto ranges = (*memory)->DataRanges(kPageSize, 3 * kPageSize);
  ASSERT_EQ(ranges.size(), 1u);
  EXPECT_EQ(ranges[0], std::make_pair(uint64_t{kPageSize}, uint64_t{3 * kPageSize}));

  // One region from the memory file's page 2 on: it straddles both blocks.
  auto source = (*memory)->SourceFor({{.base_host_virt_addr = 0x7f0000000000,
                                       .size = 3 * kPageSize,
                                       .offset = 2 * kPageSize,
                                       .page_size = kPageSize}});
  std::vector<uint8_t> dest(2 * kPageSize);
  paging::FetchResult result = paging::FetchResult::Failed(Error("not called"));
  source->Fetch({.block_id = 0, .offset = 0, .dest = dest},
                [&](paging::FetchResult r) { result = std::move(r); });
  ASSERT_EQ(result.kind, paging::FetchResult::Kind::kFilled) << result.error.ToString();
  EXPECT_EQ(dest[0], 0x12);          // ram0's page 2
  EXPECT_EQ(dest[kPageSize], 0x40);  // ram1's page 0
  EXPECT_EQ(ensured, (std::vector<Ensured>{{0, 2 * kPageSize, kPageSize}, {1, 0, kPageSize}}));

  // A range that cannot be made present is not copied: the fetch fails.
  std::memset(dest.data(), 0, dest.size());
  source->Fetch({.block_id = 0, .offset = 2 * kPageSize, .dest = {dest.data(), kPageSize}},
                [&](paging::FetchResult r) { result = std::move(r); });
  EXPECT_EQ(result.kind, paging::FetchResult::Kind::kFailed);
  EXPECT_NE(result.error.ToString().find("the link broke"), std::string::npos);
  EXPECT_EQ(dest[0], 0);
}

TEST(ServedMemoryTest, NoBlocksIsRefused) {
  auto memory =
      ServedMemory::FromBlocks({}, [](uint32_t, uint64_t, uint64_t) { return Status::Ok(); });
  ASSERT_FALSE(memory.has_value());
  EXPECT_NE(memory.error().ToString().find("no memory"), std::string::npos);
}

}  // namespace
}  // namespace faultline::migration
