#include "src/memory/memslot_plan.h"

#include <map>
#include <random>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace faultline {
namespace {

using ::testing::HasSubstr;
using Kind = MemslotChange::Kind;

constexpr uint64_t kMiB = 1 << 20;

std::shared_ptr<RamBlock> Anonymous(std::string name, uint64_t size) {
  auto block = RamBlock::Create({.name = std::move(name), .size = size});
  EXPECT_TRUE(block.has_value()) << block.error().ToString();
  return block.has_value() ? *block : nullptr;
}

std::shared_ptr<const MemoryMap> Must(Result<std::shared_ptr<const MemoryMap>> map) {
  EXPECT_TRUE(map.has_value()) << map.error().ToString();
  return map.has_value() ? *map : MemoryMap::Empty();
}

// One change as (kind, id, gpa, size), for compact expectations.
struct Step {
  Kind kind;
  uint16_t id;
  uint64_t gpa;
  uint64_t size;
  friend bool operator==(const Step&, const Step&) = default;
  friend std::ostream& operator<<(std::ostream& os, const Step& s) {
    return os << (s.kind == Kind::kDelete ? "delete " : "create ") << s.id << " @" << std::hex
              << s.gpa << "+" << s.size;
  }
};

std::vector<Step> Steps(const MemslotPlan& plan) {
  std::vector<Step> steps;
  for (const MemslotChange& c : plan.changes) {
    steps.push_back({c.kind, c.slot.id, c.slot.range.gpa.value, c.slot.range.size});
  }
  return steps;
}

class MemslotPlanTest : public ::testing::Test {
 protected:
  MemslotPlan Plan(const MemslotTable& current, std::shared_ptr<const MemoryMap> next) {
    auto plan = planner_.Plan(current, std::move(next));
    EXPECT_TRUE(plan.has_value()) << plan.error().ToString();
    return plan.has_value() ? std::move(*plan) : MemslotPlan{};
  }

  MemslotPlanner planner_;
  std::shared_ptr<RamBlock> ram0_ = Anonymous("ram0", 16 * kMiB);
  std::shared_ptr<RamBlock> ram1_ = Anonymous("ram1", 8 * kMiB);
  std::shared_ptr<const MemoryMap> base_ =
      Must(Must(MemoryMap::Empty()->Place(ram0_, Gpa(0)))->Place(ram1_, Gpa(64 * kMiB)));
};

TEST_F(MemslotPlanTest, FirstPlanCreatesEveryRangeWithLowIds) {
  MemslotPlan plan = Plan(MemslotTable(), base_);
  EXPECT_THAT(Steps(plan), ::testing::ElementsAre(Step{Kind::kCreate, 0, 0, 16 * kMiB},
                                                  Step{Kind::kCreate, 1, 64 * kMiB, 8 * kMiB}));
  EXPECT_EQ(plan.kept, 0u);
  EXPECT_EQ(plan.next.map(), base_);
  ASSERT_EQ(plan.next.slots().size(), 2u);
  EXPECT_EQ(plan.next.slots()[1].range.block, ram1_.get());
}

TEST_F(MemslotPlanTest, UnchangedMapChangesNothing) {
  MemslotPlan first = Plan(MemslotTable(), base_);
  auto same = base_->Edit().Build();  // a new generation, the same layout
  MemslotPlan again = Plan(first.next, same);
  EXPECT_TRUE(again.changes.empty());
  EXPECT_EQ(again.kept, 2u);
  EXPECT_TRUE(std::ranges::equal(again.next.slots(), first.next.slots()));
}

TEST_F(MemslotPlanTest, PunchingAHoleKeepsTheOtherBlocksSlot) {
  MemslotTable table = Plan(MemslotTable(), base_).next;
  MemslotPlan plan = Plan(table, Must(base_->PunchHole(Gpa(4 * kMiB), 2 * kMiB)));
  // ram1 keeps slot 1; slot 0 is freed and reused lowest-first, after the
  // delete that frees it.
  EXPECT_THAT(Steps(plan), ::testing::ElementsAre(Step{Kind::kDelete, 0, 0, 16 * kMiB},
                                                  Step{Kind::kCreate, 0, 0, 4 * kMiB},
                                                  Step{Kind::kCreate, 2, 6 * kMiB, 10 * kMiB}));
  EXPECT_EQ(plan.kept, 1u);
  EXPECT_EQ(plan.next.slots()[2].id, 1u);
  EXPECT_EQ(plan.next.slots()[1].range.block_offset, 6 * kMiB);

  // Filling it deletes both pieces and creates the whole range again.
  MemslotPlan fill = Plan(plan.next, Must(plan.next.map()->FillHole(Gpa(4 * kMiB), 2 * kMiB)));
  EXPECT_THAT(Steps(fill), ::testing::ElementsAre(Step{Kind::kDelete, 0, 0, 4 * kMiB},
                                                  Step{Kind::kDelete, 2, 6 * kMiB, 10 * kMiB},
                                                  Step{Kind::kCreate, 0, 0, 16 * kMiB}));
}

TEST_F(MemslotPlanTest, HoleAtTheStartKeepsNothingOfThatBlockButTheIdIsReused) {
  MemslotTable table = Plan(MemslotTable(), base_).next;
  MemslotPlan plan = Plan(table, Must(base_->PunchHole(Gpa(0), kMiB)));
  EXPECT_THAT(Steps(plan), ::testing::ElementsAre(Step{Kind::kDelete, 0, 0, 16 * kMiB},
                                                  Step{Kind::kCreate, 0, kMiB, 15 * kMiB}));
}

TEST_F(MemslotPlanTest, SecondHoleOnlyTouchesTheRangeItSplits) {
  auto one = Must(base_->PunchHole(Gpa(4 * kMiB), kMiB));
  MemslotTable table = Plan(MemslotTable(), one).next;  // 0:[0,4M) 1:[5M,16M) 2:ram1
  MemslotPlan plan = Plan(table, Must(one->PunchHole(Gpa(8 * kMiB), kMiB)));
  EXPECT_THAT(Steps(plan), ::testing::ElementsAre(Step{Kind::kDelete, 1, 5 * kMiB, 11 * kMiB},
                                                  Step{Kind::kCreate, 1, 5 * kMiB, 3 * kMiB},
                                                  Step{Kind::kCreate, 3, 9 * kMiB, 7 * kMiB}));
  EXPECT_EQ(plan.kept, 2u);
}

TEST_F(MemslotPlanTest, ResizeAndRemove) {
  MemslotTable table = Plan(MemslotTable(), base_).next;
  MemslotPlan grow = Plan(table, Must(base_->Resize("ram0", 8 * kMiB)));
  EXPECT_THAT(Steps(grow), ::testing::ElementsAre(Step{Kind::kDelete, 0, 0, 16 * kMiB},
                                                  Step{Kind::kCreate, 0, 0, 8 * kMiB}));
  MemslotPlan removed = Plan(grow.next, Must(grow.next.map()->Remove("ram1")));
  EXPECT_THAT(Steps(removed), ::testing::ElementsAre(Step{Kind::kDelete, 1, 64 * kMiB, 8 * kMiB}));
}

TEST_F(MemslotPlanTest, TooManyRangesForTheSlotLimitIsAnError) {
  auto map = Must(base_->PunchHole(Gpa(4 * kMiB), kMiB));
  auto plan = MemslotPlanner(2).Plan(MemslotTable(), map);
  ASSERT_FALSE(plan.has_value());
  EXPECT_EQ(plan.error().ToString(),
            "memslot plan for map generation 3: 3 mapped ranges need a slot each but KVM offers "
            "2; use fewer holes or blocks, or a larger memslot granule");
  EXPECT_THAT(MemslotPlanner(0).Plan(MemslotTable(), map).error().ToString(),
              HasSubstr("not a valid limit"));
  EXPECT_FALSE(MemslotPlanner(kMaxMemslotIds + 1).Plan(MemslotTable(), map).has_value());
  EXPECT_TRUE(MemslotPlanner(3).Plan(MemslotTable(), map).has_value());
}

// With a granule, slots never cross its multiples, and a hole replaces only
// the slot of the granule it falls in.
TEST_F(MemslotPlanTest, GranuleCutsSlotsAndLimitsWhatAHoleTouches) {
  MemslotPlanner planner(kDefaultMaxMemslots, 4 * kMiB);
  auto first = planner.Plan(MemslotTable(), base_);
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->next.slots().size(), 4u + 2u);  // 16 MiB and 8 MiB in 4 MiB pieces
  for (const Memslot& slot : first->next.slots()) {
    EXPECT_EQ(slot.range.size, 4 * kMiB);
    EXPECT_EQ(slot.range.gpa.value % (4 * kMiB), 0u);
    EXPECT_EQ(slot.range.hva, Hva(slot.range.block->host() + slot.range.block_offset));
  }
  auto holed = planner.Plan(first->next, Must(base_->PunchHole(Gpa(5 * kMiB), kMiB)));
  ASSERT_TRUE(holed.has_value());
  EXPECT_THAT(Steps(*holed), ::testing::ElementsAre(Step{Kind::kDelete, 1, 4 * kMiB, 4 * kMiB},
                                                    Step{Kind::kCreate, 1, 4 * kMiB, kMiB},
                                                    Step{Kind::kCreate, 6, 6 * kMiB, 2 * kMiB}));
  EXPECT_EQ(holed->kept, 5u);
}

TEST_F(MemslotPlanTest, SlotsBeyondALoweredLimitAreRecreated) {
  auto map = Must(base_->PunchHole(Gpa(4 * kMiB), kMiB));
  MemslotTable table = Plan(MemslotTable(), map).next;  // ids 0, 1, 2
  auto smaller = Must(map->Remove("ram0"));             // only ram1 (id 2) is left
  auto plan = MemslotPlanner(2).Plan(table, smaller);
  ASSERT_TRUE(plan.has_value());
  EXPECT_THAT(Steps(*plan), ::testing::ElementsAre(Step{Kind::kDelete, 0, 0, 4 * kMiB},
                                                   Step{Kind::kDelete, 1, 5 * kMiB, 11 * kMiB},
                                                   Step{Kind::kDelete, 2, 64 * kMiB, 8 * kMiB},
                                                   Step{Kind::kCreate, 0, 64 * kMiB, 8 * kMiB}));
}

// Applies plans to a model of KVM's slot table that enforces what KVM does
// (a created slot's id is free and its range overlaps no existing slot; a
// deleted slot exists) over random layout changes, and checks the result
// matches the map and that every unchanged range kept its id.
TEST_F(MemslotPlanTest, RandomChangesApplyCleanlyToAModelOfKvm) {
  std::mt19937_64 rng(3);
  constexpr uint64_t kPages = 16 * kMiB / kPageSize;
  std::map<uint16_t, MappedRange> kvm;
  MemslotTable table;
  std::shared_ptr<const MemoryMap> map = base_;
  for (int round = 0; round < 300; ++round) {
    auto builder = map->Edit();
    const uint64_t first = rng() % kPages;
    const uint64_t count = 1 + rng() % 256;
    const Gpa gpa(first * kPageSize);
    if (rng() % 2 == 0 || map->holes().empty()) {
      (void)builder.PunchHole(gpa, count * kPageSize);
    } else {
      const GpaRange hole = map->holes()[rng() % map->holes().size()];
      ASSERT_TRUE(builder.FillHole(hole.start, hole.size).ok());
    }
    auto next = builder.Build();
    auto plan = planner_.Plan(table, next);
    ASSERT_TRUE(plan.has_value()) << plan.error().ToString();
    bool creating = false;
    for (const MemslotChange& change : plan->changes) {
      const MappedRange& r = change.slot.range;
      if (change.kind == Kind::kDelete) {
        ASSERT_FALSE(creating) << "delete after a create";
        ASSERT_TRUE(kvm.contains(change.slot.id));
        ASSERT_EQ(kvm[change.slot.id], r);
        kvm.erase(change.slot.id);
      } else {
        creating = true;
        ASSERT_FALSE(kvm.contains(change.slot.id));
        for (const auto& [id, other] : kvm) {
          ASSERT_FALSE((GpaRange{r.gpa, r.size}.Overlaps(GpaRange{other.gpa, other.size})));
        }
        kvm[change.slot.id] = r;
      }
    }
    // KVM's table now matches the new map, and kept ids match the old table.
    ASSERT_EQ(kvm.size(), next->ranges().size());
    for (const Memslot& slot : plan->next.slots()) ASSERT_EQ(kvm[slot.id], slot.range);
    for (const Memslot& old_slot : table.slots()) {
      for (const Memslot& slot : plan->next.slots()) {
        if (slot.range == old_slot.range) {
          ASSERT_EQ(slot.id, old_slot.id);
        }
      }
    }
    table = plan->next;
    map = next;
  }
}

}  // namespace
}  // namespace faultline
