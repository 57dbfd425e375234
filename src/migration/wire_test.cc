#include "src/migration/wire.h"

#include <functional>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/migration/bytes.h"
#include "src/migration/test_util.h"

namespace faultline::migration {
namespace {

using ::testing::HasSubstr;
using testing::TestBlocks;

// Encodes `message` as a frame and decodes it again, checking the header.
Result<Message> RoundTrip(const Message& message, const std::vector<BlockInfo>& blocks) {
  const std::vector<uint8_t> frame = EncodeFrame(message, 7);
  EXPECT_GE(frame.size(), kFrameHeaderSize);
  auto header = DecodeFrameHeader(std::span<const uint8_t, kFrameHeaderSize>(frame.data(), 16));
  if (!header) return header.error();
  EXPECT_EQ(header->type, TypeOf(message));
  EXPECT_EQ(header->seq, 7u);
  EXPECT_EQ(header->length, frame.size() - kFrameHeaderSize);
  DecodeContext context{&blocks};
  return DecodePayload(header->type, std::span(frame).subspan(kFrameHeaderSize), context);
}

Hello SampleHello() {
  Hello h;
  h.page_channels = 4;
  h.features_offered = kFeatureAuth | kFeaturePostcopy;
  h.features_required = kFeatureAuth;
  h.session_id = 0x1122334455667788;
  h.hello_flags = static_cast<uint32_t>(HelloAccel::kTcg);
  h.nonce.fill(0xab);
  h.blocks = TestBlocks();
  return h;
}

TEST(WireTest, EveryMessageRoundTrips) {
  const auto blocks = TestBlocks();
  HelloAck ack{1, 4, kFeatureAuth, 0x1122334455667788, {}, {}};
  ack.nonce.fill(3);
  ack.mac.fill(9);
  Auth auth;
  auth.mac.fill(0x5a);
  const std::vector<Message> messages = {
      SampleHello(),
      ack,
      auth,
      ChannelHello{42, 3, ChannelKind::kPage, {}},
      ChannelAck{42, 3, ChannelKind::kPage},
      ZeroPages{0, 2, {{0, 10}, {10, 5}, {262143, 1}}},
      PassEnd{3, 1000, 20, 55},
      ChannelEnd{4, 10, 2, 1010, 22},
      Switchover{SwitchoverMode::kStopAndCopy, 4, 123, 2, 1},
      VcpuStateMessage{1, {1, 2, 3, 4, 5}},
      DeviceState{"serial0", {9, 8, 7}},
      DeviceState{"empty", {}},
      Complete{5, 12345, 678},
      CompleteAck{5, 12345, 678},
      ErrorMessage{ErrorCode::kBlockMismatch, "block 'ram0' differs"},
      PageRequest{1, 77, {0, 5, 31}},
      PresentBitmap{0, 128, 70, {~uint64_t{0}, 0x3f}},
  };
  for (const Message& m : messages) {
    SCOPED_TRACE(MessageTypeName(TypeOf(m)));
    auto decoded = RoundTrip(m, blocks);
    ASSERT_TRUE(decoded.has_value()) << decoded.error().ToString();
    EXPECT_TRUE(*decoded == m);
  }
}

TEST(WireTest, PagesRoundTripInTwoSteps) {
  const auto blocks = TestBlocks();
  const DecodeContext context{&blocks};
  PagesHeader header{0, 2, 0, {1, 2, 3, 262143}};
  const auto prefix = EncodePagesPrefix(header, 0);
  ASSERT_EQ(prefix.size(), kFrameHeaderSize + kPagesFixedSize + 16);
  auto frame = DecodeFrameHeader(std::span<const uint8_t, 16>(prefix.data(), 16));
  ASSERT_TRUE(frame.has_value()) << frame.error().ToString();
  EXPECT_EQ(frame->length, kPagesFixedSize + 16 + 4 * 4096);
  auto fixed = DecodePagesFixed(std::span<const uint8_t, 16>(prefix.data() + 16, 16), frame->length,
                                context);
  ASSERT_TRUE(fixed.has_value()) << fixed.error().ToString();
  EXPECT_EQ(fixed->data_bytes(), 4u * 4096);
  auto decoded = DecodePagesIndices(*fixed, std::span(prefix).subspan(32), context);
  ASSERT_TRUE(decoded.has_value()) << decoded.error().ToString();
  EXPECT_EQ(*decoded, header);
}

// The byte layout is the documented one, whatever the host.
TEST(WireTest, GoldenBytes) {
  const auto frame = EncodeFrame(PassEnd{0x01020304, 0x05, 0x06, 0x07}, 0x1122);
  const std::vector<uint8_t> expected = {
      0x46, 0x4c, 8, 0, 32, 0, 0, 0, 0x22, 0x11, 0, 0, 0, 0, 0, 0,  // frame header
      4,    3,    2, 1, 0,  0, 0, 0,                                // pass, reserved
      5,    0,    0, 0, 0,  0, 0, 0, 6,    0,    0, 0, 0, 0, 0, 0,  // data, zero pages
      7,    0,    0, 0, 0,  0, 0, 0,                                // dirty remaining
  };
  EXPECT_EQ(frame, expected);
  const auto hello = EncodeFrame(SampleHello(), 0);
  EXPECT_EQ(hello.size(), 16u + 80 + 2 * 80);
  EXPECT_EQ(std::string(hello.begin() + 16, hello.begin() + 24), "FLMIGRAT");
}

Status HeaderError(std::vector<uint8_t> bytes) {
  return DecodeFrameHeader(std::span<const uint8_t, 16>(bytes.data(), 16)).status();
}

TEST(WireTest, FrameHeaderErrors) {
  auto frame = EncodeFrame(PassEnd{}, 0);
  frame.resize(16);
  EXPECT_TRUE(HeaderError(frame).ok());

  auto bad = frame;
  bad[0] = 'X';
  EXPECT_THAT(HeaderError(bad).message(), HasSubstr("bad frame sync"));
  bad = frame;
  bad[2] = 0;
  EXPECT_THAT(HeaderError(bad).message(), HasSubstr("unknown message type 0"));
  bad[2] = 200;
  EXPECT_THAT(HeaderError(bad).message(), HasSubstr("unknown message type 200"));
  bad = frame;
  bad[3] = 1;
  EXPECT_THAT(HeaderError(bad).message(), HasSubstr("PassEnd: frame flags 0x01"));
  bad = frame;
  bad[4] = 33;  // PassEnd is exactly 32 bytes
  EXPECT_EQ(HeaderError(bad).message(), "PassEnd: payload is 33 bytes, must be 32");
  // An oversized length is refused before anything is allocated or read.
  auto big = EncodeFrame(VcpuStateMessage{0, {1}}, 0);
  StoreLe<uint32_t>(&big[4], 0xffffffff);
  big.resize(16);
  EXPECT_EQ(HeaderError(big).message(),
            "VcpuState: payload length 4294967295 outside [9, 4194312]");
}

Status PayloadError(const Message& m, std::function<void(std::vector<uint8_t>&)> corrupt,
                    const std::vector<BlockInfo>& blocks = TestBlocks()) {
  auto frame = EncodeFrame(m, 0);
  std::vector<uint8_t> payload(frame.begin() + 16, frame.end());
  corrupt(payload);
  DecodeContext context{&blocks};
  return DecodePayload(TypeOf(m), payload, context).status();
}

TEST(WireTest, HelloErrors) {
  const Hello hello = SampleHello();
  EXPECT_THAT(PayloadError(hello, [](auto& p) { p[0] ^= 1; }).message(),
              HasSubstr("Hello: bad magic 0x544152474"));
  EXPECT_EQ(PayloadError(hello, [](auto& p) { StoreLe<uint16_t>(&p[8], 3); }).message(),
            "Hello: bad version range 3..1");
  EXPECT_EQ(PayloadError(hello, [](auto& p) { StoreLe<uint16_t>(&p[12], 17); }).message(),
            "Hello: 17 page channels (1 to 16 allowed)");
  EXPECT_EQ(PayloadError(hello, [](auto& p) { StoreLe<uint16_t>(&p[14], 3); }).message(),
            "Hello: 3 RAM blocks need 320 payload bytes, got 240");
  EXPECT_EQ(PayloadError(hello, [](auto& p) { StoreLe<uint16_t>(&p[14], 65); }).message(),
            "Hello: 65 RAM blocks (1 to 64 allowed)");
  EXPECT_EQ(PayloadError(hello, [](auto& p) { StoreLe<uint64_t>(&p[32], 0); }).message(),
            "Hello: session id 0 is not allowed");
  for (uint32_t flags : {3u, 0x100u, 0x80000002u}) {
    EXPECT_EQ(PayloadError(hello, [&](auto& p) { StoreLe<uint32_t>(&p[40], flags); }).message(),
              fmt::format("Hello: flags {:#x}; version 1 defines only an accelerator (1 kvm, 2 "
                          "tcg) in bits 0..7",
                          flags));
  }
  // Block entries start at 80: size, page size, backing, name length, name.
  EXPECT_EQ(PayloadError(hello, [](auto& p) { StoreLe<uint32_t>(&p[88], 8192); }).message(),
            "Hello: RAM block 'ram0': page size 8192 (4096 or 2097152 supported)");
  EXPECT_EQ(PayloadError(hello, [](auto& p) { StoreLe<uint64_t>(&p[80], 4097); }).message(),
            "Hello: RAM block 'ram0': size 4097 is not a non-zero multiple of its page size 4096");
  EXPECT_EQ(PayloadError(hello, [](auto& p) { p[92] = 9; }).message(),
            "Hello: block 0 has unknown backing code 9");
  EXPECT_EQ(PayloadError(hello, [](auto& p) { p[93] = 65; }).message(),
            "Hello: block 0 name length 65 (1 to 64 allowed)");
  EXPECT_EQ(PayloadError(hello, [](auto& p) { p[96 + 10] = 'x'; }).message(),
            "Hello: block 0 name is not zero-padded");
  EXPECT_EQ(PayloadError(hello, [](auto& p) { p[160 + 16 + 3] = '0'; }).message(),
            "Hello: RAM block 'ram0' listed twice");
  EXPECT_EQ(PayloadError(hello, [](auto& p) { p[96] = '\n'; }).message(),
            "Hello: RAM block name '?am0': only printable ASCII without spaces is allowed");
}

TEST(WireTest, PageIndexOutOfRange) {
  const auto blocks = TestBlocks();
  const DecodeContext context{&blocks};
  PagesHeader header{0, 0, 0, {5, 262144}};
  const auto prefix = EncodePagesPrefix(header, 0);
  auto fixed = DecodePagesFixed(std::span<const uint8_t, 16>(prefix.data() + 16, 16),
                                kPagesFixedSize + 8 + 2 * 4096, context);
  ASSERT_TRUE(fixed.has_value());
  EXPECT_EQ(DecodePagesIndices(*fixed, std::span(prefix).subspan(32), context).error().message(),
            "Pages: page index 262144 out of range for block 'ram0' (262144 pages)");

  header.pages = {7, 7};
  const auto dup = EncodePagesPrefix(header, 0);
  EXPECT_EQ(DecodePagesIndices(*fixed, std::span(dup).subspan(32), context).error().message(),
            "Pages: page indices not strictly increasing (7 after 7) in block 'ram0'");

  EXPECT_EQ(PayloadError(ZeroPages{1, 0, {{16380, 10}}}, [](auto&) {}).message(),
            "ZeroPages: run [16380, 16390) out of range for block 'ram1' (16384 pages)");
  EXPECT_EQ(PayloadError(PageRequest{0, 1, {262144}}, [](auto&) {}).message(),
            "PageRequest: page index 262144 out of range for block 'ram0' (262144 pages)");
  EXPECT_EQ(PayloadError(PresentBitmap{0, 262144, 1, {1}}, [](auto&) {}).message(),
            "PresentBitmap: pages [262144, 262145) out of range for block 'ram0' (262144 pages)");
}

TEST(WireTest, PagesFixedErrors) {
  const auto blocks = TestBlocks();
  const DecodeContext context{&blocks};
  auto fixed_error = [&](uint32_t block, uint32_t count, uint32_t flags, uint32_t length,
                         const DecodeContext& ctx) {
    uint8_t fixed[16];
    StoreLe<uint32_t>(fixed, block);
    StoreLe<uint32_t>(fixed + 4, count);
    StoreLe<uint32_t>(fixed + 8, 0);
    StoreLe<uint32_t>(fixed + 12, flags);
    return DecodePagesFixed(std::span<const uint8_t, 16>(fixed), length, ctx).error().message();
  };
  EXPECT_EQ(fixed_error(2, 1, 0, 4116, context), "Pages: block index 2 out of range (2 blocks)");
  EXPECT_EQ(fixed_error(0, 1, 0, 4116, DecodeContext{}),
            "Pages before the handshake named any RAM block");
  EXPECT_EQ(fixed_error(0, 0, 0, 16, context), "Pages: 0 pages in one batch (1 to 512 allowed)");
  EXPECT_EQ(fixed_error(0, 513, 0, 16, context),
            "Pages: 513 pages in one batch (1 to 512 allowed)");
  EXPECT_EQ(fixed_error(0, 1, 4, 4116, context), "Pages: flags 0x4; version 1 defines none");
  EXPECT_EQ(fixed_error(0, 2, 0, 4116, context),
            "Pages: 2 pages in block 'ram0' need 8216 payload bytes, got 4116");
}

TEST(WireTest, TruncatedAndOversizedPayloads) {
  const auto blocks = TestBlocks();
  const DecodeContext context{&blocks};
  const std::vector<Message> messages = {SampleHello(),
                                         PassEnd{},
                                         ZeroPages{0, 0, {{1, 2}}},
                                         DeviceState{"dev", {1, 2}},
                                         VcpuStateMessage{0, {1}},
                                         ErrorMessage{ErrorCode::kAuth, "no"}};
  for (const Message& m : messages) {
    SCOPED_TRACE(MessageTypeName(TypeOf(m)));
    auto frame = EncodeFrame(m, 0);
    std::vector<uint8_t> payload(frame.begin() + 16, frame.end());
    for (size_t cut = 0; cut < payload.size(); ++cut) {
      auto r = DecodePayload(TypeOf(m), std::span(payload).first(cut), context);
      EXPECT_FALSE(r.has_value()) << "cut at " << cut;
    }
    payload.push_back(0);
    EXPECT_FALSE(DecodePayload(TypeOf(m), payload, context).has_value());
  }
  EXPECT_EQ(
      PayloadError(VcpuStateMessage{0, {1, 2}}, [](auto& p) { StoreLe<uint32_t>(&p[4], 1000); })
          .message(),
      "VcpuState: 1000 state bytes need 1008 payload bytes, got 10");
}

TEST(WireTest, OtherFieldErrors) {
  EXPECT_EQ(
      PayloadError(Switchover{SwitchoverMode::kStopAndCopy, 0, 0, 0, 0}, [](auto&) {}).message(),
      "Switchover: 0 vCPUs (1 to 64 allowed)");
  EXPECT_EQ(
      PayloadError(Switchover{static_cast<SwitchoverMode>(5), 0, 0, 1, 0}, [](auto&) {}).message(),
      "Switchover: unknown mode 5");
  EXPECT_EQ(PayloadError(PassEnd{}, [](auto& p) { p[4] = 1; }).message(),
            "PassEnd: reserved field is 0x1, must be 0");
  EXPECT_EQ(PayloadError(ZeroPages{0, 0, {{10, 5}, {12, 1}}}, [](auto&) {}).message(),
            "ZeroPages: run at page 12 overlaps or precedes the previous run (ends at 15)");
  EXPECT_EQ(PayloadError(ZeroPages{0, 0, {{10, 0}}}, [](auto&) {}).message(),
            "ZeroPages: empty run at page 10");
  EXPECT_EQ(PayloadError(ChannelHello{1, 0, ChannelKind::kPage, {}}, [](auto& p) { p[18] = 7; })
                .message(),
            "ChannelHello: unknown channel kind 7");
  EXPECT_EQ(PayloadError(PresentBitmap{0, 64, 3, {0xf}}, [](auto&) {}).message(),
            "PresentBitmap: bits set past page count 3");
  EXPECT_EQ(PayloadError(PresentBitmap{0, 3, 3, {1}}, [](auto&) {}).message(),
            "PresentBitmap: first page 3 is not a multiple of 64");
  // A peer's error text is made printable before anyone logs it.
  auto e = RoundTrip(ErrorMessage{ErrorCode::kProtocol, "bad\x1b[31m"}, TestBlocks());
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(std::get<ErrorMessage>(*e).text, "bad?[31m");
}

TEST(WireTest, BlockListMismatch) {
  auto local = TestBlocks();
  auto source = local;
  EXPECT_TRUE(CheckBlocksMatch(source, local).ok());
  source[1].backing = Backing::kMemfd;  // backing may differ
  EXPECT_TRUE(CheckBlocksMatch(source, local).ok());
  source[0].size = 2ull << 30;
  EXPECT_EQ(CheckBlocksMatch(source, local).message(),
            "RAM block list mismatch: block 'ram0' is 2147483648 bytes in the source, "
            "1073741824 here");
  source = local;
  source[1].name = "rom";
  EXPECT_EQ(CheckBlocksMatch(source, local).message(),
            "RAM block list mismatch: block 1 is 'rom' in the source, 'ram1' here");
  source = local;
  source.pop_back();
  EXPECT_EQ(CheckBlocksMatch(source, local).message(),
            "RAM block list mismatch: the source has 1 blocks, this destination 2");
  source = local;
  source[0].page_size = 2u << 20;  // so may the page size: wire pages are 4 KiB
  EXPECT_TRUE(CheckBlocksMatch(source, local).ok());
}

}  // namespace
}  // namespace faultline::migration
