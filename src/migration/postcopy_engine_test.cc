// The post-copy engines end to end over loopback TCP with fake VMs, as
// engine_test.cc does for pre-copy: real RAM blocks in a GuestMemory (dirty
// pages tracked with userfaultfd write-protect, faults served by the real
// pager), a "guest" thread on the source that writes until the switchover,
// and on the destination a "vCPU" thread that reads every page while its
// memory arrives. No /dev/kvm, no software CPU: the engines' switchover,
// demand fetch, push, device state and link recovery on their own.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/memory/guest_memory.h"
#include "src/migration/fault_transport.h"
#include "src/migration/memory_vm.h"
#include "src/migration/memory_vm_fakes.h"
#include "src/migration/postcopy_destination.h"
#include "src/migration/postcopy_session.h"
#include "src/migration/postcopy_source.h"
#include "src/migration/socket_transport.h"
#include "src/migration/test_util.h"

namespace faultline::migration {
namespace {

using ::testing::ElementsAre;

using testing::FakeControl;
using testing::Memory;
using testing::Record;
using testing::Writer;

struct Outcome {
  Result<PostcopySourceStats> source = Error("not run");
  Result<PostcopyDestinationStats> destination = Error("not run");
  uint32_t resumes = 0;
};

// Runs a post-copy migration; `cut_at` (0..1): the link is cut once that
// share of the pages is at the destination, and both sides resume.
Outcome Migrate(Memory& from, Memory& to, Record& source_record, Record& destination_record,
                uint32_t precopy_passes, std::optional<double> cut_at = std::nullopt,
                bool answers_on_bulk = false) {
  auto source_vm = MakeMemorySource(
      *from.memory, std::make_unique<FakeControl>(source_record, from.host(), from.size()));
  auto destination_vm = MakeMemoryPostcopyDestination(
      *to.memory, std::make_unique<FakeControl>(destination_record, to.host(), to.size()));
  EXPECT_TRUE(destination_vm->CheckPaging().ok());
  auto listener = SocketListener::Listen(testing::Loopback(), {});
  EXPECT_TRUE(listener.has_value());
  const Address address{"tcp", "127.0.0.1", (*listener)->port()};
  PostcopySourceOptions options;
  options.base.page_channels = 2;
  options.precopy_passes = precopy_passes;
  options.answers_on_bulk = answers_on_bulk;
  PostcopySource source(*source_vm, options);
  DestinationOptions destination_options;
  destination_options.accept.timeout = std::chrono::seconds(10);
  PostcopyDestination destination(*destination_vm, destination_options);

  Outcome out;
  std::thread receiver([&] {
    out.destination = destination.Run(**listener);
    while (!out.destination && destination.phase() == PostcopyPhase::kPaused) {
      out.destination = destination.Resume(**listener);
    }
  });
  std::shared_ptr<FaultController> link = FaultController::Create();
  std::atomic<bool> done{false};
  std::thread cutter([&] {
    const uint64_t total = from.size() / kWirePageSize;
    while (cut_at && !done) {
      const PostcopyProgress p = source.progress();
      if (p.phase == PostcopyPhase::kPostcopy &&
          static_cast<double>(total - p.pages_remaining) >= *cut_at * static_cast<double>(total)) {
        link->Cut();
        return;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  });
  FaultyConnector first(std::make_unique<SocketConnector>(address, TransportOptions{}), link);
  out.source = source.Run(first);
  while (!out.source && source.phase() == PostcopyPhase::kPaused && out.resumes < 3) {
    ++out.resumes;
    SocketConnector again(address, TransportOptions{});
    out.source = source.Resume(again);
  }
  done = true;
  cutter.join();
  receiver.join();
  destination_vm.reset();  // joins the destination's vCPU
  return out;
}

class PostcopyEngineTest : public ::testing::TestWithParam<Backing> {};

TEST_P(PostcopyEngineTest, FaultsAndPushDeliverEveryPageAndTheState) {
  Memory from(GetParam(), 32 << 20), to(GetParam(), 32 << 20);
  Record source_record, destination_record;
  Writer writer(from, source_record);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  Outcome o = Migrate(from, to, source_record, destination_record, /*precopy_passes=*/1);
  writer.Stop();
  ASSERT_TRUE(o.source.has_value()) << o.source.error().ToString();
  ASSERT_TRUE(o.destination.has_value()) << o.destination.error().ToString();
  EXPECT_TRUE(source_record.IsPaused());  // for good: the guest runs at the destination
  EXPECT_TRUE(destination_record.started);
  EXPECT_GT(writer.writes(), 0u);
  EXPECT_EQ(std::memcmp(from.host(), to.host(), from.size()), 0) << "the memory differs";
  EXPECT_THAT(destination_record.vcpus_loaded,
              ElementsAre(std::vector<uint8_t>{0xc0, 0}, std::vector<uint8_t>{0xc0, 1}));
  ASSERT_EQ(destination_record.devices_loaded.size(), 2u);
  EXPECT_EQ(destination_record.devices_loaded[0].name, "uart");
  EXPECT_THAT(destination_record.devices_loaded[1].state, ElementsAre(4));
  const PostcopyDestinationStats& d = *o.destination;
  EXPECT_EQ(d.passes, 1u);
  EXPECT_EQ(d.sessions, 1u);
  // The vCPU's reads and the push between them brought every page.
  EXPECT_GT(d.paging.faults + d.network.pages_pushed, 0u);
  EXPECT_EQ(o.source->sessions, 1u);
}

TEST_P(PostcopyEngineTest, LinkCutDuringPostcopyResumesAndCompletes) {
  Memory from(GetParam(), 32 << 20), to(GetParam(), 32 << 20);
  Record source_record, destination_record;
  Writer writer(from, source_record);
  Outcome o = Migrate(from, to, source_record, destination_record, /*precopy_passes=*/0, 0.3);
  writer.Stop();
  ASSERT_TRUE(o.source.has_value()) << o.source.error().ToString();
  ASSERT_TRUE(o.destination.has_value()) << o.destination.error().ToString();
  EXPECT_EQ(o.resumes, 1u);
  EXPECT_EQ(o.destination->sessions, 2u);
  EXPECT_EQ(std::memcmp(from.host(), to.host(), from.size()), 0) << "the memory differs";
}

// Answers behind the push on page channel 0 (the comparison mode): they
// count in its PassEnd, later ones go on the priority channel, and a resumed
// session shares its new channel 0 the same way.
TEST_P(PostcopyEngineTest, AnswersOnTheBulkChannelDeliverEveryPage) {
  for (std::optional<double> cut : {std::optional<double>(), std::optional<double>(0.3)}) {
    SCOPED_TRACE(cut ? "link cut" : "unbroken");
    Memory from(GetParam(), 32 << 20), to(GetParam(), 32 << 20);
    Record source_record, destination_record;
    Writer writer(from, source_record);
    Outcome o = Migrate(from, to, source_record, destination_record, /*precopy_passes=*/0, cut,
                        /*answers_on_bulk=*/true);
    writer.Stop();
    ASSERT_TRUE(o.source.has_value()) << o.source.error().ToString();
    ASSERT_TRUE(o.destination.has_value()) << o.destination.error().ToString();
    EXPECT_EQ(o.resumes, cut ? 1u : 0u);
    EXPECT_GT(o.source->pages_requested, 0u) << "no request was answered";
    EXPECT_EQ(std::memcmp(from.host(), to.host(), from.size()), 0) << "the memory differs";
  }
}

// A source that breaks the protocol on a page channel during pre-copy: the
// destination tells it why on the main channel (before it shuts anything
// down) and does not start the VM; an Error from the source is not echoed.
TEST(PostcopyDestinationTest, PrecopyFailuresReachTheSourceAndTheVmNeverStarts) {
  const std::vector<uint8_t> page(kWirePageSize, 0x42);
  const ConstBuffer data[] = {page};
  struct Case {
    std::function<Status(Session&)> send;
    std::string error;
    bool told;  // the destination answers with Error
  };
  const std::vector<Case> cases = {
      {[&](Session& s) {
         return s.pages[1]->writer().SendPages(PagesHeader{0, 1, 0, {0}}, data);
       },
       "page channel 1: Pages for pass 1 while in pass 0", true},
      {[](Session& s) {
         return s.pages[0]->writer().Send(PassEnd{0, 3, 0, 0});
       },
       "PassEnd of pass 0 counts 3 data and 0 zero pages; 0 and 0 arrived", true},
      {[](Session& s) {
         return s.pages[0]->writer().Send(ErrorMessage{ErrorCode::kInternal, "source broke"});
       },
       "source broke", false},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.error);
    Memory to(Backing::kAnonymous, 16 << 20);
    Record record;
    auto vm = MakeMemoryPostcopyDestination(
        *to.memory, std::make_unique<FakeControl>(record, to.host(), to.size()));
    auto listener = SocketListener::Listen(testing::Loopback(), {});
    ASSERT_TRUE(listener.has_value());
    SocketConnector connector(Address{"tcp", "127.0.0.1", (*listener)->port()}, {});
    PostcopyDestination destination(*vm, {});
    Result<PostcopyDestinationStats> received = Error("not run");
    std::thread receiver([&] { received = destination.Run(**listener); });
    auto session = ConnectSession(
        connector, {{DescribeBlock(*to.block)}, 2, {}, kFeaturePostcopy | kFeatureRecovery});
    ASSERT_TRUE(session.has_value()) << session.error().ToString();
    auto priority = ConnectPriorityChannel(connector, *session, {});
    ASSERT_TRUE(priority.has_value()) << priority.error().ToString();
    ASSERT_TRUE(c.send(*session).ok());
    auto answer = Expect<CompleteAck>(session->main->reader(), "hostile source");
    receiver.join();
    ASSERT_FALSE(received.has_value());
    EXPECT_THAT(received.error().ToString(), ::testing::HasSubstr(c.error));
    EXPECT_THAT(received.error().ToString(), ::testing::HasSubstr("the VM was not started"));
    EXPECT_EQ(destination.phase(), PostcopyPhase::kFailed);
    EXPECT_FALSE(record.started);
    ASSERT_FALSE(answer.has_value());
    if (c.told) {
      EXPECT_THAT(answer.error().ToString(), ::testing::HasSubstr("peer reported error"));
      EXPECT_THAT(answer.error().ToString(), ::testing::HasSubstr(c.error));
    } else {
      EXPECT_THAT(answer.error().ToString(),
                  ::testing::Not(::testing::HasSubstr("peer reported error")));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Backings, PostcopyEngineTest,
                         ::testing::Values(Backing::kAnonymous, Backing::kMemfd),
                         [](const auto& info) { return std::string(BackingName(info.param)); });

}  // namespace
}  // namespace faultline::migration
