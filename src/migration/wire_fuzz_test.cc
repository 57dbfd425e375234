// Feeds random, truncated and mutated bytes to the decoders and to the
// MessageReader. The property: every input ends in a value or an error
// Status, never in undefined behaviour (this runs under ASan and UBSan), and
// any payload the decoder accepts re-encodes to exactly the same bytes (the
// encoding is canonical, so nothing a peer sends is silently reinterpreted).
#include <random>

#include <gtest/gtest.h>

#include "src/migration/bytes.h"
#include "src/migration/message_io.h"
#include "src/migration/test_util.h"
#include "src/migration/wire.h"

namespace faultline::migration {
namespace {

using testing::MemoryChannel;
using testing::TestBlocks;

constexpr uint64_t kSeed = 0x5eed'f417;

std::vector<uint8_t> RandomBytes(std::mt19937_64& rng, size_t n) {
  std::vector<uint8_t> out(n);
  for (uint8_t& b : out) b = static_cast<uint8_t>(rng());
  return out;
}

// A valid stream of every kind of message a destination sees, pages included.
std::vector<uint8_t> ValidStream() {
  std::vector<uint8_t> out;
  uint64_t seq = 0;
  auto add = [&](const Message& m) {
    auto f = EncodeFrame(m, seq++);
    out.insert(out.end(), f.begin(), f.end());
  };
  Hello hello;
  hello.session_id = 1;
  hello.blocks = TestBlocks();
  add(hello);
  add(ZeroPages{0, 0, {{0, 4}, {9, 1}}});
  PagesHeader pages{0, 0, 0, {4, 5, 8}};
  auto prefix = EncodePagesPrefix(pages, seq++);
  out.insert(out.end(), prefix.begin(), prefix.end());
  out.insert(out.end(), 3 * 4096, 0x77);
  add(PassEnd{0, 3, 5, 0});
  add(Switchover{SwitchoverMode::kStopAndCopy, 1, 0, 1, 1});
  add(VcpuStateMessage{0, {1, 2, 3}});
  add(DeviceState{"serial", {4}});
  add(Complete{2, 3, 5});
  add(ErrorMessage{ErrorCode::kInternal, "x"});
  return out;
}

// Reads messages until an error; returns how many were read.
int ReadAll(std::vector<uint8_t> stream, const std::vector<BlockInfo>& blocks) {
  MemoryChannel channel(std::move(stream));
  MessageReader reader(channel);
  reader.set_blocks(&blocks);
  static std::vector<uint8_t> page(kWirePageSize);  // every page of a batch lands here
  for (int n = 0;; ++n) {
    Result<Message> m = reader.Read();
    if (!m) return n;
    if (auto* h = std::get_if<PagesHeader>(&*m)) {
      std::vector<MutableBuffer> dest(h->pages.size(), MutableBuffer(page));
      if (!reader.ReceivePageData(dest).ok()) return n;
    }
  }
}

TEST(WireFuzzTest, RandomFrameHeaders) {
  std::mt19937_64 rng(kSeed);
  int accepted = 0;
  for (int i = 0; i < 200000; ++i) {
    auto bytes = RandomBytes(rng, kFrameHeaderSize);
    // Make the sync right half the time so that the later checks are reached.
    if (i % 2 == 0) StoreLe<uint16_t>(bytes.data(), kFrameSync);
    if (i % 4 == 0) bytes[3] = 0;
    auto header = DecodeFrameHeader(std::span<const uint8_t, kFrameHeaderSize>(bytes.data(), 16));
    if (header) {
      ++accepted;
      EXPECT_LE(header->length, MaxPayload(header->type));
    } else {
      EXPECT_FALSE(header.error().message().empty());
    }
  }
  EXPECT_GT(accepted, 0);
}

TEST(WireFuzzTest, RandomPayloadsEveryType) {
  std::mt19937_64 rng(kSeed + 1);
  const auto blocks = TestBlocks();
  const DecodeContext context{&blocks};
  for (uint8_t t = 1; t <= kMaxMessageType; ++t) {
    const auto type = static_cast<MessageType>(t);
    if (type == MessageType::kPages) continue;  // below, through the reader
    for (int i = 0; i < 3000; ++i) {
      const size_t n = rng() % std::min<uint64_t>(MaxPayload(type) + 2, 6000);
      auto payload = RandomBytes(rng, n);
      auto decoded = DecodePayload(type, payload, context);
      if (!decoded || type == MessageType::kError) continue;
      std::vector<uint8_t> again;
      EncodePayload(*decoded, again);
      EXPECT_EQ(again, payload) << MessageTypeName(type);
    }
  }
}

TEST(WireFuzzTest, MutatedValidPayloadsReencodeCanonically) {
  std::mt19937_64 rng(kSeed + 2);
  const auto blocks = TestBlocks();
  const DecodeContext context{&blocks};
  const std::vector<Message> seeds = {
      Hello{1, 1, 2, 0, 0, 9, 0, {}, TestBlocks()},
      HelloAck{},
      ChannelHello{5, 1, ChannelKind::kPage, {}},
      ZeroPages{1, 3, {{0, 2}, {5, 7}}},
      ChannelEnd{1, 2, 3, 4, 5},
      Switchover{SwitchoverMode::kStopAndCopy, 2, 3, 4, 5},
      DeviceState{"d", {1, 2, 3}},
      PageRequest{0, 1, {1, 2, 3}},
      PresentBitmap{1, 0, 32, {0xffff}},
  };
  int accepted = 0;
  for (const Message& seed : seeds) {
    auto frame = EncodeFrame(seed, 0);
    const std::vector<uint8_t> base(frame.begin() + 16, frame.end());
    for (int i = 0; i < 5000; ++i) {
      auto payload = base;
      for (int flips = 1 + static_cast<int>(rng() % 3); flips > 0; --flips) {
        payload[rng() % payload.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
      }
      if (rng() % 8 == 0) payload.resize(rng() % (payload.size() + 1));
      auto decoded = DecodePayload(TypeOf(seed), payload, context);
      if (!decoded) continue;
      ++accepted;
      std::vector<uint8_t> again;
      EncodePayload(*decoded, again);
      EXPECT_EQ(again, payload) << MessageTypeName(TypeOf(seed));
    }
  }
  EXPECT_GT(accepted, 0);  // some mutations (e.g. of counters) stay valid
}

TEST(WireFuzzTest, ValidStreamReadsFully) { EXPECT_EQ(ReadAll(ValidStream(), TestBlocks()), 9); }

TEST(WireFuzzTest, MutatedAndTruncatedStreams) {
  std::mt19937_64 rng(kSeed + 3);
  const auto blocks = TestBlocks();
  const auto valid = ValidStream();
  for (int i = 0; i < 3000; ++i) {
    auto stream = valid;
    switch (rng() % 4) {
      case 0:  // truncate anywhere
        stream.resize(rng() % stream.size());
        break;
      case 1:  // flip bits
        for (int k = 0; k < 4; ++k) stream[rng() % stream.size()] ^= 1u << (rng() % 8);
        break;
      case 2: {  // overwrite a stretch with random bytes
        const size_t at = rng() % stream.size();
        const size_t len = std::min<size_t>(rng() % 64, stream.size() - at);
        for (size_t k = 0; k < len; ++k) stream[at + k] = static_cast<uint8_t>(rng());
        break;
      }
      case 3: {  // drop a stretch (desynchronises the framing)
        const size_t at = rng() % stream.size();
        const size_t len = std::min<size_t>(rng() % 200 + 1, stream.size() - at);
        stream.erase(stream.begin() + static_cast<long>(at),
                     stream.begin() + static_cast<long>(at + len));
        break;
      }
    }
    EXPECT_LE(ReadAll(std::move(stream), blocks), 9);
  }
}

TEST(WireFuzzTest, RandomStreams) {
  std::mt19937_64 rng(kSeed + 4);
  const auto blocks = TestBlocks();
  for (int i = 0; i < 20000; ++i) {
    auto stream = RandomBytes(rng, rng() % 512);
    if (stream.size() >= 16) {
      StoreLe<uint16_t>(stream.data(), kFrameSync);
      stream[2] = static_cast<uint8_t>(1 + rng() % kMaxMessageType);
      stream[3] = 0;
      StoreLe<uint32_t>(&stream[4], static_cast<uint32_t>(rng() % 600));
      StoreLe<uint64_t>(&stream[8], 0);
    }
    EXPECT_LE(ReadAll(std::move(stream), blocks), 1);
  }
}

}  // namespace
}  // namespace faultline::migration
