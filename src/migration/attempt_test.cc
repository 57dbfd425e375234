#include "src/migration/attempt.h"

#include <cerrno>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/migration/test_util.h"

namespace faultline::migration {
namespace {

using ::testing::HasSubstr;
using testing::MemoryChannel;

// A session with a main channel that records what is sent, and `pages`
// page channels.
struct Links {
  MemoryChannel* main = nullptr;
  Session session;
};

Links MakeLinks(size_t pages) {
  Links l;
  auto main = std::make_unique<MemoryChannel>();
  l.main = main.get();
  l.session.main = std::make_unique<Link>(std::move(main));
  for (size_t c = 0; c < pages; ++c) {
    l.session.pages.push_back(std::make_unique<Link>(std::make_unique<MemoryChannel>()));
  }
  return l;
}

// The messages sent on a recording channel.
std::vector<Message> Sent(const MemoryChannel& channel) {
  Link link(std::make_unique<MemoryChannel>(channel.output()));
  std::vector<Message> out;
  for (Result<Message> m = link.reader().Read(); m; m = link.reader().Read()) {
    out.push_back(std::move(*m));
  }
  return out;
}

TEST(AttemptTest, TheFirstFailureWinsButACauseReplacesAConsequence) {
  Attempt a(Attempt::Reporting::kSilent);
  Links l = MakeLinks(1);
  ASSERT_TRUE(a.Adopt(std::move(l.session)).ok());
  EXPECT_FALSE(a.failed());
  EXPECT_TRUE(a.error().ok());
  a.Fail(Status(ECONNRESET, "main channel: end of stream"));
  a.Fail(Error("page channel 0: Pages for pass 1 while in pass 0"));
  a.Fail(Error("a later failure"));
  a.Fail(Status(ESHUTDOWN, "shut down"));
  EXPECT_TRUE(a.failed());
  EXPECT_EQ(a.error().message(), "page channel 0: Pages for pass 1 while in pass 0");
  EXPECT_TRUE(Sent(*l.main).empty()) << "a silent attempt tells nobody";
}

TEST(AttemptTest, ADestinationTellsTheSourceOnceAndNeverEchoesIt) {
  {
    Attempt a(Attempt::Reporting::kTellPeer);
    Links l = MakeLinks(1);
    ASSERT_TRUE(a.Adopt(std::move(l.session)).ok());
    a.Fail(Error("bad index"), ErrorCode::kProtocol);
    a.Fail(Error("second"), ErrorCode::kInternal);
    const std::vector<Message> sent = Sent(*l.main);
    ASSERT_EQ(sent.size(), 1u);
    const auto* e = std::get_if<ErrorMessage>(&sent[0]);
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->code, ErrorCode::kProtocol);
    EXPECT_THAT(e->text, HasSubstr("bad index"));
  }
  {
    Attempt a(Attempt::Reporting::kTellPeer);
    Links l = MakeLinks(1);
    ASSERT_TRUE(a.Adopt(std::move(l.session)).ok());
    const Status s =
        a.FailByPeer(ErrorMessage{ErrorCode::kCancelled, "operator"}, "page channel 0");
    EXPECT_THAT(s.message(), HasSubstr("page channel 0"));
    EXPECT_THAT(s.message(), HasSubstr("operator"));
    EXPECT_EQ(a.error().message(), s.message());
    EXPECT_TRUE(Sent(*l.main).empty()) << "the source knows why it gave up";
  }
}

TEST(AttemptTest, NoErrorLeavesOnceReportingStopped) {
  Attempt a(Attempt::Reporting::kTellPeer);
  Links l = MakeLinks(1);
  ASSERT_TRUE(a.Adopt(std::move(l.session)).ok());
  ASSERT_TRUE(a.StopReporting().ok());
  a.Fail(Error("after the guest ran"));
  EXPECT_TRUE(Sent(*l.main).empty());
  // The caller that knows the guest did not run may still say so.
  a.TellPeer(Error("could not start"), ErrorCode::kProtocol);
  EXPECT_EQ(Sent(*l.main).size(), 1u);
}

TEST(AttemptTest, StopReportingAfterAFailureReturnsIt) {
  Attempt a(Attempt::Reporting::kTellPeer);
  Links l = MakeLinks(1);
  ASSERT_TRUE(a.Adopt(std::move(l.session)).ok());
  a.Fail(Error("page channel 0: broken"));
  const Status s = a.StopReporting();
  EXPECT_EQ(s.message(), "page channel 0: broken") << "the guest must not run";
}

TEST(AttemptTest, AFailureBeforeTheHandshakeEndsIsReturnedByAdopt) {
  Attempt a(Attempt::Reporting::kTellPeer);
  a.Fail(Status(ECANCELED, "migration cancelled"), ErrorCode::kCancelled);
  Links l = MakeLinks(2);
  const Status adopted = a.Adopt(std::move(l.session));
  EXPECT_EQ(adopted.code(), ECANCELED);
  EXPECT_TRUE(Sent(*l.main).empty()) << "there was no main channel to tell";
}

TEST(AttemptTest, MilestonesAndWaitersEndWithTheAttempt) {
  Attempt a(Attempt::Reporting::kSilent);
  Links l = MakeLinks(2);
  ASSERT_TRUE(a.Adopt(std::move(l.session)).ok());
  std::thread reacher([&] {
    a.Reach(Milestone::kGuestRuns);
    a.Reach(Milestone::kGuestRuns);
  });
  EXPECT_TRUE(a.Await(Milestone::kGuestRuns, 2));
  reacher.join();
  EXPECT_EQ(a.reached(Milestone::kGuestRuns), 2u);
  EXPECT_FALSE(a.AwaitFor(Milestone::kMainEnded, 1, std::chrono::milliseconds(0)));

  bool waited = true;
  std::thread waiter([&] { waited = a.Await(Milestone::kMainEnded, 1); });
  a.Fail(Error("broken"));
  waiter.join();
  EXPECT_FALSE(waited);
  EXPECT_EQ(a.failure().message(), "broken");
}

TEST(AttemptTest, CloseEndsWithoutAFailure) {
  Attempt a(Attempt::Reporting::kTellPeer);
  Links l = MakeLinks(1);
  ASSERT_TRUE(a.Adopt(std::move(l.session)).ok());
  a.Close();
  a.Fail(Error("a thread winding down"));
  EXPECT_FALSE(a.failed());
  EXPECT_TRUE(Sent(*l.main).empty());
  EXPECT_FALSE(a.Await(Milestone::kChannelEnded, 1));
  EXPECT_EQ(a.failure().code(), ECANCELED);
}

TEST(AttemptTest, ChannelThreadsFailTheAttemptWithTheirIndex) {
  Attempt a(Attempt::Reporting::kSilent);
  Links l = MakeLinks(3);
  ASSERT_TRUE(a.Adopt(std::move(l.session)).ok());
  a.StartChannels([](size_t c) -> Status {
    if (c == 1) return Error("Pages for pass 2 while in pass 1");
    return Status::Ok();
  });
  a.Join();
  EXPECT_EQ(a.reached(Milestone::kChannelEnded), 3u);
  EXPECT_EQ(a.error().message(), "page channel 1: Pages for pass 2 while in pass 1");
}

TEST(PassBarrierTest, NoPartyPassesBeforeAllArrived) {
  PassBarrier barrier(3);
  std::atomic<int> released{0};
  std::vector<std::thread> parties;
  for (int i = 0; i < 2; ++i) {
    parties.emplace_back([&] {
      EXPECT_TRUE(barrier.Arrive(0));
      released.fetch_add(1);
    });
  }
  std::thread observer([&] { EXPECT_TRUE(barrier.AwaitAll(0)); });
  // Two of three arrived: nobody may be released. (Not a timing check: the
  // last arrival below is what releases them.)
  EXPECT_EQ(released.load(), 0);
  EXPECT_TRUE(barrier.Arrive(0));
  for (auto& t : parties) t.join();
  observer.join();
  EXPECT_EQ(released.load(), 2);
}

TEST(PassBarrierTest, CancelReleasesEveryWaiter) {
  PassBarrier barrier(2);
  bool arrived = true, awaited = true;
  std::thread party([&] { arrived = barrier.Arrive(4); });
  std::thread observer([&] { awaited = barrier.AwaitAll(4); });
  barrier.Cancel();
  party.join();
  observer.join();
  EXPECT_FALSE(arrived);
  EXPECT_FALSE(awaited);
  EXPECT_FALSE(barrier.Arrive(5));
}

}  // namespace
}  // namespace faultline::migration
