// libFuzzer target: the wire decoder and the destination's state machines,
// fed what a hostile source could send.
//
// The first byte picks the mode:
//   even: the rest is a byte stream on a channel: a MessageReader reads
//         frames (page data into a scratch page) and every message goes to
//         a SessionReceiver (main-channel messages, ChannelHello bound as a
//         page channel would be) and a ChannelReceiver (page-channel
//         messages), as the destination engines drive them;
//   odd:  the second byte is a message type and the rest its payload:
//         DecodePayload, and an accepted payload must re-encode to exactly
//         the same bytes (the encoding is canonical).
// Any crash, sanitizer report or broken property is a finding.
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "src/migration/message_io.h"
#include "src/migration/receiver_state.h"
#include "src/migration/test_util.h"
#include "src/migration/wire.h"

namespace fm = faultline::migration;

namespace {

void Stream(const uint8_t* data, size_t size) {
  static const std::vector<fm::BlockInfo> blocks = fm::testing::TestBlocks();
  fm::testing::MemoryChannel channel(std::vector<uint8_t>(data, data + size));
  fm::MessageReader reader(channel);
  reader.set_blocks(&blocks);
  fm::ReceiverConfig config;
  config.blocks = blocks;
  config.features_supported = ~uint64_t{0};
  fm::Nonce nonce{};
  fm::SessionReceiver session(config, nonce);
  fm::ChannelReceiver pages(0);
  static std::vector<uint8_t> page(fm::kWirePageSize);
  for (int n = 0; n < 4096; ++n) {
    faultline::Result<fm::Message> m = reader.Read();
    if (!m) return;
    if (const auto* h = std::get_if<fm::PagesHeader>(&*m)) {
      std::vector<fm::MutableBuffer> dest(h->pages.size(), fm::MutableBuffer(page));
      if (!reader.ReceivePageData(dest).ok()) return;
    }
    if (const auto* hello = std::get_if<fm::ChannelHello>(&*m)) {
      (void)session.BindChannel(*hello);
      continue;
    }
    // The page channel's messages to its receiver, the rest to the session.
    const bool page_channel = std::holds_alternative<fm::PagesHeader>(*m) ||
                              std::holds_alternative<fm::ZeroPages>(*m) ||
                              std::holds_alternative<fm::ChannelEnd>(*m);
    if (page_channel) {
      if (!pages.OnMessage(*m).ok()) continue;
      if (const auto* end = std::get_if<fm::ChannelEnd>(&*m)) {
        (void)session.RecordChannelEnd(0, pages.totals());
        (void)end;
      }
    } else if (const auto* pass = std::get_if<fm::PassEnd>(&*m)) {
      if (pages.OnMessage(*m).ok()) (void)pages.BeginNextPass();
      (void)session.OnMessage(*pass);
    } else {
      (void)session.OnMessage(*m);
    }
  }
}

void Payload(uint8_t type_byte, const uint8_t* data, size_t size) {
  static const std::vector<fm::BlockInfo> blocks = fm::testing::TestBlocks();
  const auto type = static_cast<fm::MessageType>(type_byte % (fm::kMaxMessageType + 1));
  if (type == fm::MessageType::kPages) return;  // its data follows the frame: Stream's
  const fm::DecodeContext context{&blocks};
  const std::vector<uint8_t> payload(data, data + size);
  auto decoded = fm::DecodePayload(type, payload, context);
  if (!decoded || type == fm::MessageType::kError) return;
  std::vector<uint8_t> again;
  fm::EncodePayload(*decoded, again);
  if (again != payload) std::abort();  // two encodings of one message
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  if (data[0] % 2 == 0) {
    Stream(data + 1, size - 1);
  } else {
    Payload(data[1], data + 2, size - 2);
  }
  return 0;
}
