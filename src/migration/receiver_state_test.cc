#include "src/migration/receiver_state.h"

#include <functional>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/migration/test_util.h"

namespace faultline::migration {
namespace {

using ::testing::HasSubstr;
using testing::TestBlocks;

constexpr uint64_t kSession = 0xfeedface;

Hello MakeHello(uint16_t channels = 2) {
  Hello h;
  h.page_channels = channels;
  h.session_id = kSession;
  h.nonce.fill(1);
  h.blocks = TestBlocks();
  return h;
}

ReceiverConfig Config(AuthKey key = {}) {
  ReceiverConfig c;
  c.blocks = TestBlocks();
  c.key = std::move(key);
  c.vcpus = 2;
  return c;
}

Nonce DestinationNonce() {
  Nonce n;
  n.fill(2);
  return n;
}

// A receiver through the handshake with both page channels bound.
SessionReceiver Ready() {
  SessionReceiver r(Config(), DestinationNonce());
  EXPECT_TRUE(r.OnMessage(MakeHello()).ok());
  EXPECT_TRUE(r.BindChannel(ChannelHello{kSession, 0, ChannelKind::kPage, {}}).has_value());
  EXPECT_TRUE(r.BindChannel(ChannelHello{kSession, 1, ChannelKind::kPage, {}}).has_value());
  return r;
}

TEST(ReceiverStateTest, HappyPath) {
  SessionReceiver r = Ready();
  EXPECT_EQ(r.phase(), ReceiverPhase::kPrecopy);
  EXPECT_EQ(r.ack().version, 1);
  EXPECT_EQ(r.ack().session_id, kSession);
  EXPECT_EQ(r.ack().features, 0u);
  EXPECT_TRUE(r.all_channels_bound());
  ASSERT_TRUE(r.OnMessage(PassEnd{0, 10, 5, 3}).ok());
  ASSERT_TRUE(r.OnMessage(PassEnd{1, 3, 0, 1}).ok());
  ASSERT_TRUE(r.OnMessage(Switchover{SwitchoverMode::kStopAndCopy, 2, 1, 2, 1}).ok());
  EXPECT_EQ(r.phase(), ReceiverPhase::kStopAndCopy);
  ASSERT_TRUE(r.OnMessage(VcpuStateMessage{1, {1}}).ok());
  ASSERT_TRUE(r.OnMessage(VcpuStateMessage{0, {1}}).ok());
  ASSERT_TRUE(r.OnMessage(DeviceState{"serial", {}}).ok());
  ASSERT_TRUE(r.RecordChannelEnd(0, {2, 10, 3}).ok());
  ASSERT_TRUE(r.RecordChannelEnd(1, {2, 4, 2}).ok());
  ASSERT_TRUE(r.OnMessage(Complete{3, 14, 5}).ok());
  EXPECT_EQ(r.phase(), ReceiverPhase::kComplete);
  EXPECT_THAT(r.OnMessage(PassEnd{}).message(),
              HasSubstr("PassEnd not expected on the main channel in phase Complete"));
}

TEST(ReceiverStateTest, OutOfOrderMessagesAreRejected) {
  struct Case {
    std::function<void(SessionReceiver&)> setup;
    Message message;
    std::string error;
  };
  const std::vector<Case> cases = {
      {[](auto&) {}, PassEnd{},
       "PassEnd not expected on the main channel in phase AwaitHello (expected Hello)"},
      {[](auto&) {}, Complete{},
       "Complete not expected on the main channel in phase AwaitHello (expected Hello)"},
      {[](auto& r) { (void)r.OnMessage(MakeHello()); }, MakeHello(),
       "Hello not expected on the main channel in phase Precopy (expected PassEnd or "
       "Switchover)"},
      {[](auto& r) { (void)r.OnMessage(MakeHello()); }, VcpuStateMessage{0, {1}},
       "VcpuState not expected on the main channel in phase Precopy (expected PassEnd or "
       "Switchover)"},
      {[](auto& r) { (void)r.OnMessage(MakeHello()); }, PagesHeader{0, 0, 0, {1}},
       "Pages not expected on the main channel in phase Precopy (expected PassEnd or "
       "Switchover)"},
      {[](auto& r) { (void)r.OnMessage(MakeHello()); }, PassEnd{1, 0, 0, 0},
       "PassEnd for pass 1, expected pass 0"},
      {[](auto& r) { (void)r.OnMessage(MakeHello()); },
       Switchover{SwitchoverMode::kStopAndCopy, 3, 0, 2, 0},
       "Switchover: final pass 3, but 0 pre-copy passes ended"},
      {[](auto& r) { (void)r.OnMessage(MakeHello()); },
       Switchover{SwitchoverMode::kStopAndCopy, 0, 0, 4, 0},
       "Switchover: the source has 4 vCPUs, this destination VM 2"},
      {[](auto& r) { (void)r.OnMessage(MakeHello()); },
       Switchover{SwitchoverMode::kPostcopy, 0, 0, 2, 0},
       "Switchover: post-copy was not negotiated"},
      {[](auto& r) {
         (void)r.OnMessage(MakeHello());
         (void)r.OnMessage(Switchover{SwitchoverMode::kStopAndCopy, 0, 0, 2, 0});
       },
       VcpuStateMessage{2, {1}}, "VcpuState for vCPU 2, but the source announced 2 vCPUs"},
      {[](auto& r) {
         (void)r.OnMessage(MakeHello());
         (void)r.OnMessage(Switchover{SwitchoverMode::kStopAndCopy, 0, 0, 2, 0});
         (void)r.OnMessage(VcpuStateMessage{0, {1}});
       },
       VcpuStateMessage{0, {1}}, "VcpuState for vCPU 0 received twice"},
      {[](auto& r) {
         (void)r.OnMessage(MakeHello());
         (void)r.OnMessage(Switchover{SwitchoverMode::kStopAndCopy, 0, 0, 2, 0});
       },
       DeviceState{"serial", {}}, "DeviceState 'serial': more than the 0 devices announced"},
      {[](auto& r) {
         (void)r.OnMessage(MakeHello());
         (void)r.OnMessage(Switchover{SwitchoverMode::kStopAndCopy, 0, 0, 2, 0});
         (void)r.OnMessage(VcpuStateMessage{0, {1}});
       },
       Complete{1, 0, 0}, "Complete after the state of 1 of 2 vCPUs"},
      {[](auto& r) {
         (void)r.OnMessage(MakeHello());
         (void)r.OnMessage(Switchover{SwitchoverMode::kStopAndCopy, 0, 0, 2, 0});
       },
       Switchover{SwitchoverMode::kStopAndCopy, 0, 0, 2, 0},
       "Switchover not expected on the main channel in phase StopAndCopy (expected VcpuState, "
       "DeviceState or Complete)"},
      {[](auto& r) { (void)r.OnMessage(MakeHello()); },
       ErrorMessage{ErrorCode::kCancelled, "operator gave up"},
       "peer reported error (code 7): operator gave up"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.error);
    SessionReceiver r(Config(), DestinationNonce());
    c.setup(r);
    EXPECT_EQ(r.OnMessage(c.message).message(), c.error);
    EXPECT_EQ(r.phase(), ReceiverPhase::kFailed);
    EXPECT_EQ(r.OnMessage(PassEnd{}).message(), "PassEnd after the session failed");
  }
}

TEST(ReceiverStateTest, CompleteChecksChannelsAndTotals) {
  auto stop = [](SessionReceiver& r) {
    ASSERT_TRUE(r.OnMessage(Switchover{SwitchoverMode::kStopAndCopy, 0, 0, 2, 0}).ok());
    ASSERT_TRUE(r.OnMessage(VcpuStateMessage{0, {1}}).ok());
    ASSERT_TRUE(r.OnMessage(VcpuStateMessage{1, {1}}).ok());
  };
  {
    SessionReceiver r = Ready();
    stop(r);
    ASSERT_TRUE(r.RecordChannelEnd(0, {0, 1, 1}).ok());
    EXPECT_EQ(r.OnMessage(Complete{1, 1, 1}).message(),
              "Complete while 1 of 2 page channels have not ended");
  }
  {
    SessionReceiver r = Ready();
    stop(r);
    ASSERT_TRUE(r.RecordChannelEnd(0, {0, 1, 1}).ok());
    ASSERT_TRUE(r.RecordChannelEnd(1, {0, 1, 0}).ok());
    EXPECT_EQ(r.OnMessage(Complete{1, 3, 1}).message(),
              "Complete: the source sent 3 data and 1 zero pages; 2 and 1 arrived");
  }
  {
    SessionReceiver r = Ready();
    stop(r);
    EXPECT_EQ(r.RecordChannelEnd(0, {5, 0, 0}).message(),
              "page channel 0 ended in pass 5, but the final pass is 0");
    EXPECT_EQ(r.RecordChannelEnd(0, {0, 0, 0}).message(), "page channel 0 ended twice");
    EXPECT_EQ(r.RecordChannelEnd(2, {0, 0, 0}).message(),
              "page channel 2 ended but was never bound");
  }
}

TEST(ReceiverStateTest, NegotiationErrors) {
  {
    SessionReceiver r(Config(), DestinationNonce());
    Hello h = MakeHello();
    h.min_version = 2;
    h.max_version = 3;
    EXPECT_EQ(r.OnMessage(h).message(),
              "no common protocol version: the source speaks 2..3, this destination 1..1");
    EXPECT_EQ(r.error_code(), ErrorCode::kVersion);
  }
  {
    SessionReceiver r(Config(), DestinationNonce());
    Hello h = MakeHello();
    h.features_offered = h.features_required = kFeaturePostcopy;
    EXPECT_EQ(r.OnMessage(h).message(),
              "the source requires features 0x2 that this destination does not support");
    EXPECT_EQ(r.error_code(), ErrorCode::kFeatures);
  }
  {
    SessionReceiver r(Config(), DestinationNonce());
    Hello h = MakeHello();
    h.features_offered = 0xff00;  // unknown offered features are declined, not an error
    ASSERT_TRUE(r.OnMessage(h).ok());
    EXPECT_EQ(r.ack().features, 0u);
  }
  {
    SessionReceiver r(Config(), DestinationNonce());
    Hello h = MakeHello();
    h.blocks[0].size *= 2;
    EXPECT_EQ(r.OnMessage(h).message(),
              "RAM block list mismatch: block 'ram0' is 2147483648 bytes in the source, "
              "1073741824 here");
    EXPECT_EQ(r.error_code(), ErrorCode::kBlockMismatch);
  }
  {
    ReceiverConfig c = Config();
    c.max_page_channels = 1;
    SessionReceiver r(c, DestinationNonce());
    EXPECT_EQ(r.OnMessage(MakeHello(2)).message(),
              "the source wants 2 page channels; this destination allows 1");
  }
  {
    // A destination that cannot take any migration as it is set up (a
    // post-copy installer its backing does not support) says why at Hello.
    ReceiverConfig c = Config();
    c.refusal = Error("installer 'move' needs anonymous memory");
    SessionReceiver r(c, DestinationNonce());
    EXPECT_EQ(r.OnMessage(MakeHello()).message(), "installer 'move' needs anonymous memory");
    EXPECT_EQ(r.error_code(), ErrorCode::kFeatures);
    EXPECT_EQ(r.phase(), ReceiverPhase::kFailed);
  }
}

// vCPU state does not move between KVM and the software CPU: refused at the
// Hello, before any page; an end that does not say accepts.
TEST(ReceiverStateTest, AcceleratorMismatchIsRefusedAtHello) {
  {
    ReceiverConfig config = Config();
    config.accel = HelloAccel::kTcg;
    SessionReceiver r(config, DestinationNonce());
    Hello h = MakeHello();
    h.hello_flags = static_cast<uint32_t>(HelloAccel::kKvm);
    Status s = r.OnMessage(h);
    EXPECT_EQ(s.message(),
              "the source VM runs on kvm and this destination on tcg (the software CPU): vCPU "
              "state does not move between accelerators — start both ends with the same --accel");
    EXPECT_EQ(r.error_code(), ErrorCode::kFeatures);
    EXPECT_EQ(r.phase(), ReceiverPhase::kFailed);
  }
  for (auto [source, destination] :
       {std::pair{HelloAccel::kTcg, HelloAccel::kTcg}, std::pair{HelloAccel::kKvm, HelloAccel::kKvm},
        std::pair{HelloAccel::kUnspecified, HelloAccel::kTcg},
        std::pair{HelloAccel::kKvm, HelloAccel::kUnspecified}}) {
    ReceiverConfig config = Config();
    config.accel = destination;
    SessionReceiver r(config, DestinationNonce());
    Hello h = MakeHello();
    h.hello_flags = static_cast<uint32_t>(source);
    EXPECT_TRUE(r.OnMessage(h).ok()) << HelloAccelName(source) << " -> "
                                     << HelloAccelName(destination);
  }
}

TEST(ReceiverStateTest, Authentication) {
  const AuthKey key(32, 0x42);
  const AuthKey wrong(32, 0x43);
  Hello hello = MakeHello();
  hello.features_offered = hello.features_required = kFeatureAuth;
  {
    SessionReceiver r(Config(key), DestinationNonce());
    ASSERT_TRUE(r.OnMessage(hello).ok());
    EXPECT_EQ(r.phase(), ReceiverPhase::kAwaitAuth);
    EXPECT_TRUE(r.authenticated());
    EXPECT_TRUE(MacEqual(r.ack().mac, DestinationProof(key, hello, r.ack())));
    EXPECT_FALSE(MacEqual(r.ack().mac, DestinationProof(wrong, hello, r.ack())));
    // Nothing but Auth is accepted before authentication.
    EXPECT_EQ(r.BindChannel(ChannelHello{kSession, 0, ChannelKind::kPage, {}}).error().message(),
              "ChannelHello in phase AwaitAuth: channels are bound after the handshake");
    ASSERT_TRUE(r.OnMessage(Auth{SourceProof(key, hello, r.ack())}).ok());
    EXPECT_EQ(r.phase(), ReceiverPhase::kPrecopy);
    const Mac proof =
        ChannelProof(key, kSession, 1, ChannelKind::kPage, hello.nonce, DestinationNonce());
    EXPECT_EQ(r.BindChannel(ChannelHello{kSession, 0, ChannelKind::kPage, proof}).error().message(),
              "ChannelHello: page channel 0 failed authentication");  // proof is for channel 1
    EXPECT_TRUE(r.BindChannel(ChannelHello{kSession, 1, ChannelKind::kPage, proof}).has_value());
  }
  {
    SessionReceiver r(Config(key), DestinationNonce());
    ASSERT_TRUE(r.OnMessage(hello).ok());
    EXPECT_EQ(r.OnMessage(Auth{SourceProof(wrong, hello, r.ack())}).message(),
              "authentication failed: the source's proof does not match (different keys?)");
    EXPECT_EQ(r.error_code(), ErrorCode::kAuth);
  }
  {
    SessionReceiver r(Config(key), DestinationNonce());
    EXPECT_EQ(r.OnMessage(MakeHello()).message(),
              "this destination requires authentication, and the source did not offer it (give "
              "the source the same key)");
  }
  {
    SessionReceiver r(Config(), DestinationNonce());  // no key here
    EXPECT_THAT(r.OnMessage(hello).message(), HasSubstr("give the destination the key"));
  }
}

TEST(ReceiverStateTest, ChannelBinding) {
  SessionReceiver r(Config(), DestinationNonce());
  ASSERT_TRUE(r.OnMessage(MakeHello()).ok());
  EXPECT_EQ(r.BindChannel(ChannelHello{kSession + 1, 0, ChannelKind::kPage, {}}).error().message(),
            "ChannelHello for session 0xfeedfacf, but this session is 0xfeedface");
  EXPECT_EQ(r.BindChannel(ChannelHello{kSession, 2, ChannelKind::kPage, {}}).error().message(),
            "ChannelHello: page channel 2 of 2");
  EXPECT_THAT(
      r.BindChannel(ChannelHello{kSession, 0, ChannelKind::kPriority, {}}).error().message(),
      HasSubstr("was not negotiated"));
  ASSERT_TRUE(r.BindChannel(ChannelHello{kSession, 0, ChannelKind::kPage, {}}).has_value());
  EXPECT_EQ(r.BindChannel(ChannelHello{kSession, 0, ChannelKind::kPage, {}}).error().message(),
            "ChannelHello: page channel 0 is already bound");
  EXPECT_FALSE(r.all_channels_bound());
}

TEST(ChannelReceiverTest, PassesAndBarrier) {
  ChannelReceiver c(3);
  ASSERT_TRUE(c.OnMessage(PagesHeader{0, 0, 0, {1, 2}}).ok());
  ASSERT_TRUE(c.OnMessage(ZeroPages{0, 0, {{5, 10}}}).ok());
  ASSERT_TRUE(c.OnMessage(PassEnd{0, 2, 10, 0}).ok());
  EXPECT_EQ(c.phase(), ChannelReceiver::Phase::kPassEnded);
  ASSERT_TRUE(c.BeginNextPass().ok());
  ASSERT_TRUE(c.OnMessage(PagesHeader{0, 1, 0, {1}}).ok());
  ASSERT_TRUE(c.OnMessage(ChannelEnd{1, 1, 0, 3, 10}).ok());
  EXPECT_EQ(c.phase(), ChannelReceiver::Phase::kEnded);
  const ChannelTotals t = c.totals();
  EXPECT_EQ(t.final_pass, 1u);
  EXPECT_EQ(t.data_pages, 3u);
  EXPECT_EQ(t.zero_pages, 10u);
  EXPECT_EQ(c.OnMessage(PagesHeader{0, 1, 0, {1}}).message(),
            "page channel 3: Pages after ChannelEnd");
}

TEST(ChannelReceiverTest, Errors) {
  auto fails = [](std::vector<Message> before, const Message& m) {
    ChannelReceiver c(0);
    for (const Message& b : before) EXPECT_TRUE(c.OnMessage(b).ok());
    Status s = c.OnMessage(m);
    EXPECT_EQ(c.phase(), ChannelReceiver::Phase::kFailed);
    return s.message();
  };
  EXPECT_EQ(fails({}, PagesHeader{0, 1, 0, {1}}),
            "page channel 0: Pages for pass 1 while in pass 0");
  EXPECT_EQ(fails({PassEnd{0, 0, 0, 0}}, PagesHeader{0, 1, 0, {1}}),
            "page channel 0: Pages after PassEnd(0) before the next pass began");
  EXPECT_EQ(fails({PagesHeader{0, 0, 0, {1}}}, PassEnd{0, 2, 0, 0}),
            "page channel 0: PassEnd of pass 0 counts 2 data and 0 zero pages; 1 and 0 arrived");
  EXPECT_EQ(fails({}, ChannelEnd{0, 0, 0, 1, 0}),
            "page channel 0: ChannelEnd counts 1 data and 0 zero pages in all; 0 and 0 arrived");
  EXPECT_EQ(fails({}, Switchover{}), "page channel 0: Switchover not expected on a page channel");
  EXPECT_EQ(fails({}, ErrorMessage{ErrorCode::kInternal, "disk on fire"}),
            "page channel 0: peer reported error (code 8): disk on fire");
  ChannelReceiver c(1);
  EXPECT_EQ(c.BeginNextPass().message(),
            "page channel 1: BeginNextPass in pass 0 before its PassEnd");
}

}  // namespace
}  // namespace faultline::migration
