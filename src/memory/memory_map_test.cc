#include "faultline/memory_map.h"

#include <atomic>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace faultline {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr uint64_t kMiB = 1 << 20;

std::shared_ptr<RamBlock> Anonymous(std::string name, uint64_t size) {
  auto block = RamBlock::Create({.name = std::move(name), .size = size});
  EXPECT_TRUE(block.has_value()) << block.error().ToString();
  return block.has_value() ? *block : nullptr;
}

// Geometry only: a block with 2 MiB pages and no memory behind it, because
// this machine may have no huge pages reserved. Never dereferenced.
class HugePageGeometry : public RamBlock {
 public:
  HugePageGeometry(std::string name, uint64_t size)
      : RamBlock(std::move(name), Backing::kHugetlb, size, kHugePageSize) {}
  int fd() const override { return -1; }
  Status Discard(uint64_t, uint64_t) override { return Status::Ok(); }
};

std::shared_ptr<const MemoryMap> Must(Result<std::shared_ptr<const MemoryMap>> map) {
  EXPECT_TRUE(map.has_value()) << map.error().ToString();
  return map.has_value() ? *map : MemoryMap::Empty();
}

std::string ErrorOf(const Result<std::shared_ptr<const MemoryMap>>& map) {
  return map.has_value() ? "(no error)" : map.error().ToString();
}

// [start, end) pairs of the mapped ranges, for compact expectations.
std::vector<std::pair<uint64_t, uint64_t>> Spans(const MemoryMap& map) {
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  for (const MappedRange& range : map.ranges())
    spans.emplace_back(range.gpa.value, range.end().value);
  return spans;
}
using Span = std::pair<uint64_t, uint64_t>;

class MemoryMapTest : public ::testing::Test {
 protected:
  std::shared_ptr<RamBlock> ram0_ = Anonymous("ram0", 16 * kMiB);
  std::shared_ptr<RamBlock> ram1_ = Anonymous("ram1", 8 * kMiB);
  std::shared_ptr<const MemoryMap> empty_ = MemoryMap::Empty();
};

TEST_F(MemoryMapTest, EmptyMap) {
  EXPECT_EQ(empty_->generation(), 0u);
  EXPECT_THAT(empty_->ranges(), IsEmpty());
  EXPECT_FALSE(empty_->Lookup(Gpa(0)).has_value());
}

TEST_F(MemoryMapTest, PlaceAndLookup) {
  auto one = Must(empty_->Place(ram0_, Gpa(0)));
  auto two = Must(one->Place(ram1_, Gpa(64 * kMiB)));
  EXPECT_EQ(two->generation(), 2u);
  EXPECT_THAT(Spans(*two), ElementsAre(Span{0, 16 * kMiB}, Span{64 * kMiB, 72 * kMiB}));
  EXPECT_EQ(two->mapped_bytes(), 24 * kMiB);
  // The maps it came from are untouched.
  EXPECT_EQ(one->generation(), 1u);
  EXPECT_EQ(one->ranges().size(), 1u);
  EXPECT_THAT(empty_->ranges(), IsEmpty());

  auto t = two->Lookup(Gpa(64 * kMiB + 0x1234));
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->block, ram1_.get());
  EXPECT_EQ(t->offset, 0x1234u);
  EXPECT_EQ(t->hva, Hva(ram1_->host() + 0x1234));
  EXPECT_EQ(t->contiguous, 8 * kMiB - 0x1234);
  EXPECT_EQ(two->Lookup(Gpa(16 * kMiB - 1))->block, ram0_.get());
  EXPECT_FALSE(two->Lookup(Gpa(16 * kMiB)).has_value());
  EXPECT_FALSE(two->Lookup(Gpa(72 * kMiB)).has_value());
  EXPECT_EQ(two->FindPlacement("ram1")->base, Gpa(64 * kMiB));
  EXPECT_EQ(two->FindPlacement("nope"), nullptr);
}

TEST_F(MemoryMapTest, PlaceRejectsOverlapsNamingBothBlocks) {
  auto map = Must(empty_->Place(ram0_, Gpa(0)));
  EXPECT_EQ(ErrorOf(map->Place(ram1_, Gpa(8 * kMiB))),
            "place 'ram1' at 0x800000: overlaps 'ram0' [0x0, 0x1000000)");
  auto high = Must(empty_->Place(ram0_, Gpa(16 * kMiB)));
  EXPECT_EQ(ErrorOf(high->Place(ram1_, Gpa(12 * kMiB))),
            "place 'ram1' at 0xc00000: overlaps 'ram0' [0x1000000, 0x2000000)");
  // Adjacent is fine.
  EXPECT_TRUE(high->Place(ram1_, Gpa(8 * kMiB)).has_value());
  EXPECT_EQ(map->generation(), 1u);
}

TEST_F(MemoryMapTest, PlaceReservesTheWholeBlockEvenWhenPartlyInUse) {
  auto map = Must(empty_->Place(ram0_, Gpa(0), 4 * kMiB));
  EXPECT_THAT(Spans(*map), ElementsAre(Span{0, 4 * kMiB}));
  EXPECT_THAT(ErrorOf(map->Place(ram1_, Gpa(8 * kMiB))), HasSubstr("overlaps 'ram0'"));
  // Nothing in use at all is a valid virtio-mem starting point.
  auto unplugged = Must(empty_->Place(ram0_, Gpa(0), 0));
  EXPECT_THAT(unplugged->ranges(), IsEmpty());
  EXPECT_EQ(unplugged->placements().size(), 1u);
}

TEST_F(MemoryMapTest, PlaceRejectsBadInput) {
  auto map = Must(empty_->Place(ram0_, Gpa(0)));
  EXPECT_EQ(ErrorOf(map->Place(nullptr, Gpa(0))), "place at 0x0: no block given");
  EXPECT_EQ(ErrorOf(map->Place(ram0_, Gpa(64 * kMiB))),
            "place 'ram0' at 0x4000000: a block named 'ram0' is already placed at 0x0; remove "
            "it first");
  EXPECT_EQ(ErrorOf(empty_->Place(ram1_, Gpa(0x1800))),
            "place 'ram1' at 0x1800: the address is not a multiple of the block's page size "
            "0x1000");
  EXPECT_EQ(ErrorOf(empty_->Place(ram1_, Gpa(0), 0x1800)),
            "place 'ram1' at 0x0: size in use 0x1800 is not a multiple of the block's page size "
            "0x1000");
  EXPECT_EQ(ErrorOf(empty_->Place(ram1_, Gpa(0), 9 * kMiB)),
            "place 'ram1' at 0x0: size in use 0x900000 exceeds the block's size 0x800000");
  EXPECT_THAT(ErrorOf(empty_->Place(ram1_, Gpa(~uint64_t{0} - 0xfff))),
              HasSubstr("run past the end of the address space"));
}

TEST_F(MemoryMapTest, HugePageBlocksNeedHugePageAlignment) {
  auto huge = std::make_shared<HugePageGeometry>("huge", 8 * kMiB);
  EXPECT_THAT(ErrorOf(empty_->Place(huge, Gpa(0x1000))), HasSubstr("page size 0x200000"));
  auto map = Must(empty_->Place(huge, Gpa(0x40000000)));
  EXPECT_EQ(ErrorOf(map->PunchHole(Gpa(0x40000000), 0x1000)),
            "punch hole [0x40000000, 0x40001000): not aligned to the page size 0x200000 of "
            "'huge'");
  EXPECT_TRUE(map->PunchHole(Gpa(0x40200000), kHugePageSize).has_value());
}

TEST_F(MemoryMapTest, PunchHoleSplitsTheRange) {
  auto map = Must(empty_->Place(ram0_, Gpa(0)));
  auto holed = Must(map->PunchHole(Gpa(4 * kMiB), 2 * kMiB));
  EXPECT_THAT(Spans(*holed), ElementsAre(Span{0, 4 * kMiB}, Span{6 * kMiB, 16 * kMiB}));
  EXPECT_EQ(holed->ranges()[1].block_offset, 6 * kMiB);
  EXPECT_THAT(holed->holes(), ElementsAre(GpaRange{Gpa(4 * kMiB), 2 * kMiB}));
  EXPECT_THAT(holed->placements()[0].holes, ElementsAre(GpaRange{Gpa(4 * kMiB), 2 * kMiB}));
  EXPECT_FALSE(holed->Lookup(Gpa(5 * kMiB)).has_value());
  EXPECT_EQ(holed->Lookup(Gpa(6 * kMiB))->offset, 6 * kMiB);
  EXPECT_EQ(holed->Lookup(Gpa(4 * kMiB - 1))->contiguous, 1u);
  EXPECT_EQ(map->ranges().size(), 1u);  // the source map is unchanged
}

TEST_F(MemoryMapTest, HolesAtTheEdgesAndAdjacentHolesLeaveNoEmptyRanges) {
  auto map = Must(empty_->Place(ram0_, Gpa(0)));
  auto builder = map->Edit();
  ASSERT_TRUE(builder.PunchHole(Gpa(0), kMiB).ok());
  ASSERT_TRUE(builder.PunchHole(Gpa(15 * kMiB), kMiB).ok());
  ASSERT_TRUE(builder.PunchHole(Gpa(4 * kMiB), kMiB).ok());
  ASSERT_TRUE(builder.PunchHole(Gpa(5 * kMiB), kMiB).ok());  // adjacent, kept apart
  auto holed = builder.Build();
  EXPECT_EQ(holed->generation(), map->generation() + 1);  // one batch, one generation
  EXPECT_THAT(Spans(*holed), ElementsAre(Span{kMiB, 4 * kMiB}, Span{6 * kMiB, 15 * kMiB}));
  EXPECT_EQ(holed->holes().size(), 4u);

  auto all = Must(map->PunchHole(Gpa(0), 16 * kMiB));
  EXPECT_THAT(all->ranges(), IsEmpty());
  EXPECT_FALSE(all->Lookup(Gpa(0)).has_value());
}

TEST_F(MemoryMapTest, PunchHoleRejectsBadInput) {
  auto map = Must(empty_->Place(ram0_, Gpa(0), 12 * kMiB));
  map = Must(map->Place(ram1_, Gpa(16 * kMiB)));
  map = Must(map->PunchHole(Gpa(2 * kMiB), 2 * kMiB));
  EXPECT_EQ(ErrorOf(map->PunchHole(Gpa(64 * kMiB), kMiB)),
            "punch hole [0x4000000, 0x4100000): outside every placed block");
  EXPECT_EQ(ErrorOf(map->PunchHole(Gpa(13 * kMiB), kMiB)),
            "punch hole [0xd00000, 0xe00000): beyond the part of 'ram0' in use [0x0, 0xc00000)");
  EXPECT_EQ(ErrorOf(map->PunchHole(Gpa(11 * kMiB), 2 * kMiB)),
            "punch hole [0xb00000, 0xd00000): crosses the end of 'ram0' in use [0x0, 0xc00000); "
            "a hole must lie inside one block");
  EXPECT_EQ(ErrorOf(map->PunchHole(Gpa(3 * kMiB), 2 * kMiB)),
            "punch hole [0x300000, 0x500000): overlaps hole [0x200000, 0x400000) in 'ram0'");
  EXPECT_EQ(ErrorOf(map->PunchHole(Gpa(kMiB), 2 * kMiB)),
            "punch hole [0x100000, 0x300000): overlaps hole [0x200000, 0x400000) in 'ram0'");
  EXPECT_EQ(ErrorOf(map->PunchHole(Gpa(0x800), 0x1000)),
            "punch hole [0x800, 0x1800): not aligned to the page size 0x1000 of 'ram0'");
  EXPECT_EQ(ErrorOf(map->PunchHole(Gpa(0), 0)), "punch hole at 0x0: the length is 0");
  EXPECT_THAT(ErrorOf(map->PunchHole(Gpa(0x1000), ~uint64_t{0})),
              HasSubstr("runs past the end of the address space"));
  EXPECT_EQ(map->holes().size(), 1u);
}

TEST_F(MemoryMapTest, FillHoleRestoresTheRangesAndTheContent) {
  auto map = Must(empty_->Place(ram0_, Gpa(0)));
  std::memset(ram0_->host() + 5 * kMiB, 0xab, 4096);
  auto holed = Must(map->PunchHole(Gpa(4 * kMiB), 2 * kMiB));
  auto filled = Must(holed->FillHole(Gpa(4 * kMiB), 2 * kMiB));
  EXPECT_TRUE(std::ranges::equal(filled->ranges(), map->ranges()));
  EXPECT_THAT(filled->holes(), IsEmpty());
  auto t = filled->Lookup(Gpa(5 * kMiB + 100));
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(*t->hva.ptr(), 0xab);
}

TEST_F(MemoryMapTest, FillHoleMustMatchAHoleExactly) {
  auto map = Must(empty_->Place(ram0_, Gpa(0)));
  map = Must(map->PunchHole(Gpa(4 * kMiB), 2 * kMiB));
  map = Must(map->PunchHole(Gpa(6 * kMiB), 2 * kMiB));
  EXPECT_EQ(ErrorOf(map->FillHole(Gpa(4 * kMiB), kMiB)),
            "fill hole [0x400000, 0x500000): does not match hole [0x400000, 0x600000) in 'ram0'; "
            "fill holes exactly as punched");
  EXPECT_EQ(ErrorOf(map->FillHole(Gpa(5 * kMiB), 2 * kMiB)),
            "fill hole [0x500000, 0x700000): does not match hole [0x400000, 0x600000) in 'ram0'; "
            "fill holes exactly as punched");
  EXPECT_THAT(ErrorOf(map->FillHole(Gpa(4 * kMiB), 4 * kMiB)), HasSubstr("does not match"));
  EXPECT_EQ(ErrorOf(map->FillHole(Gpa(12 * kMiB), kMiB)),
            "fill hole [0xc00000, 0xd00000): 'ram0' has no hole there");
  EXPECT_EQ(ErrorOf(map->FillHole(Gpa(32 * kMiB), kMiB)),
            "fill hole [0x2000000, 0x2100000): outside every placed block");
  EXPECT_EQ(map->holes().size(), 2u);
}

TEST_F(MemoryMapTest, ResizeWithinTheBlock) {
  auto map = Must(empty_->Place(ram0_, Gpa(0), 4 * kMiB));
  auto grown = Must(map->Resize("ram0", 16 * kMiB));
  EXPECT_THAT(Spans(*grown), ElementsAre(Span{0, 16 * kMiB}));
  auto holed = Must(grown->PunchHole(Gpa(8 * kMiB), kMiB));
  auto shrunk = Must(holed->Resize("ram0", 10 * kMiB));
  EXPECT_THAT(Spans(*shrunk), ElementsAre(Span{0, 8 * kMiB}, Span{9 * kMiB, 10 * kMiB}));
  EXPECT_FALSE(shrunk->Lookup(Gpa(10 * kMiB)).has_value());

  EXPECT_EQ(ErrorOf(holed->Resize("ram0", 8 * kMiB + 0x1000)),
            "resize 'ram0' to 0x801000: hole [0x800000, 0x900000) lies beyond the new end "
            "0x801000; fill it first");
  EXPECT_EQ(ErrorOf(map->Resize("ram0", 17 * kMiB)),
            "resize 'ram0' to 0x1100000: exceeds the block's size 0x1000000");
  EXPECT_EQ(ErrorOf(map->Resize("ram0", 0x10)),
            "resize 'ram0' to 0x10: not a multiple of the block's page size 0x1000");
  EXPECT_EQ(ErrorOf(map->Resize("ram9", 0)),
            "resize 'ram9' to 0x0: no block of that name is placed");
  // Hole exactly at the new end is still inside.
  EXPECT_TRUE(holed->Resize("ram0", 9 * kMiB).has_value());
}

TEST_F(MemoryMapTest, Remove) {
  auto map = Must(empty_->Place(ram0_, Gpa(0)));
  map = Must(map->Place(ram1_, Gpa(32 * kMiB)));
  map = Must(map->PunchHole(Gpa(kMiB), kMiB));
  auto removed = Must(map->Remove("ram0"));
  EXPECT_THAT(Spans(*removed), ElementsAre(Span{32 * kMiB, 40 * kMiB}));
  EXPECT_THAT(removed->holes(), IsEmpty());
  EXPECT_EQ(ErrorOf(removed->Remove("ram0")), "remove 'ram0': no block of that name is placed");
  // The name is free again.
  EXPECT_TRUE(removed->Place(ram0_, Gpa(0)).has_value());
}

TEST_F(MemoryMapTest, FailedBuilderStepChangesNothing) {
  auto map = Must(empty_->Place(ram0_, Gpa(0)));
  auto builder = map->Edit();
  ASSERT_TRUE(builder.PunchHole(Gpa(kMiB), kMiB).ok());
  const std::string before = builder.Build()->DebugString();
  EXPECT_FALSE(builder.PunchHole(Gpa(kMiB), 2 * kMiB).ok());
  EXPECT_FALSE(builder.FillHole(Gpa(kMiB), 2 * kMiB).ok());
  EXPECT_FALSE(builder.Place(ram1_, Gpa(kMiB)).ok());
  EXPECT_FALSE(builder.Resize("ram0", kMiB).ok());
  EXPECT_EQ(builder.Build()->DebugString(), before);
  EXPECT_EQ(before,
            "generation 2\n'ram0' reserved [0x0, 0x1000000) in use 0x1000000 hole [0x100000, "
            "0x200000)\n");
}

// Against a brute-force page-by-page model, over random layouts.
TEST_F(MemoryMapTest, LookupMatchesAPageModel) {
  constexpr uint64_t kPages = 16 * kMiB / kPageSize;
  std::mt19937_64 rng(1);
  for (int round = 0; round < 20; ++round) {
    auto builder = empty_->Edit();
    ASSERT_TRUE(builder.Place(ram0_, Gpa(0x100000000)).ok());
    std::vector<bool> mapped(kPages, true);
    for (int k = 0; k < 40; ++k) {
      const uint64_t first = rng() % kPages;
      const uint64_t count = 1 + rng() % 64;
      if (first + count > kPages) continue;
      if (builder.PunchHole(Gpa(0x100000000 + first * kPageSize), count * kPageSize).ok()) {
        for (uint64_t p = first; p < first + count; ++p) mapped[p] = false;
      }
    }
    auto map = builder.Build();
    for (uint64_t page = 0; page < kPages; ++page) {
      auto t = map->Lookup(Gpa(0x100000000 + page * kPageSize + 8));
      ASSERT_EQ(t.has_value(), mapped[page]) << "page " << page;
      if (t) {
        ASSERT_EQ(t->offset, page * kPageSize + 8);
      }
    }
    EXPECT_FALSE(map->Lookup(Gpa(0x100000000 - 1)).has_value());
    EXPECT_FALSE(map->Lookup(Gpa(0x100000000 + 16 * kMiB)).has_value());
  }
}

TEST_F(MemoryMapTest, AtomicMapPublishesOnlySuccessfulEdits) {
  AtomicMemoryMap atomic;
  EXPECT_EQ(atomic.Load()->generation(), 0u);
  auto placed = atomic.Update([&](const MemoryMap& map) { return map.Place(ram0_, Gpa(0)); });
  ASSERT_TRUE(placed.has_value());
  EXPECT_EQ(atomic.Load(), *placed);
  auto failed = atomic.Update([&](const MemoryMap& map) { return map.Place(ram1_, Gpa(0)); });
  EXPECT_THAT(failed.error().ToString(), HasSubstr("overlaps 'ram0'"));
  EXPECT_EQ(atomic.Load(), *placed);
  EXPECT_EQ(atomic.publications(), 1u);

  AtomicMemoryMap::Reader reader(atomic);
  EXPECT_EQ(&reader.Get(), placed->get());
  auto holed = atomic.Update([](const MemoryMap& map) { return map.PunchHole(Gpa(0), kMiB); });
  EXPECT_EQ(&reader.Get(), holed->get());

  // Once replaced, a map is kept alive only by those who hold it.
  std::shared_ptr<const MemoryMap> old = *placed;
  placed = Status();
  EXPECT_EQ(old.use_count(), 1);
}

// Readers look up while a writer punches and fills a hole. Each snapshot a
// reader takes must be whole: the hole is either there (two ranges, lookups
// in it fail) or not (one range, lookups in it find the RAM, content intact).
TEST_F(MemoryMapTest, ReadersSeeWholeSnapshotsWhileAWriterChangesTheMap) {
  std::memset(ram0_->host() + 5 * kMiB, 0x5a, kPageSize);
  AtomicMemoryMap atomic(Must(empty_->Place(ram0_, Gpa(0))));
  std::atomic<bool> done{false};
  std::atomic<uint64_t> lookups{0};
  auto read = [&](bool cached) {
    AtomicMemoryMap::Reader reader(atomic);
    uint64_t last_generation = 0;
    while (!done.load(std::memory_order_relaxed)) {
      std::shared_ptr<const MemoryMap> held = cached ? nullptr : atomic.Load();
      const MemoryMap& map = cached ? reader.Get() : *held;
      ASSERT_GE(map.generation(), last_generation);
      last_generation = map.generation();
      const bool hole = !map.holes().empty();
      ASSERT_EQ(map.ranges().size(), hole ? 2u : 1u);
      auto t = map.Lookup(Gpa(5 * kMiB));
      ASSERT_EQ(t.has_value(), !hole);
      if (t) {
        ASSERT_EQ(*t->hva.ptr(), 0x5a);
      }
      ASSERT_TRUE(map.Lookup(Gpa(kMiB)).has_value());
      lookups.fetch_add(1, std::memory_order_relaxed);
    }
  };
  std::thread plain(read, false);
  std::thread cached(read, true);
  // On a loaded machine the readers may not run at all during 2,000 quick
  // updates: start writing once both are reading.
  while (lookups.load() < 2) std::this_thread::yield();
  for (int i = 0; i < 2000; ++i) {
    auto next = atomic.Update([&](const MemoryMap& map) {
      return i % 2 == 0 ? map.PunchHole(Gpa(4 * kMiB), 2 * kMiB)
                        : map.FillHole(Gpa(4 * kMiB), 2 * kMiB);
    });
    if (!next.has_value()) {
      ADD_FAILURE() << next.error().ToString();  // still join the readers below
      break;
    }
  }
  done = true;
  plain.join();
  cached.join();
  EXPECT_EQ(atomic.Load()->generation(), 2001u);
  EXPECT_GT(lookups.load(), 0u);
}

}  // namespace
}  // namespace faultline
