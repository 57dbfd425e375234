// Writes the wire_receiver target's seed corpus (tests/fuzz/corpus/
// wire_receiver/), made by the encoder itself so that the seeds follow the
// protocol as it is: run it again after a wire change.
//   faultline_fuzz_make_wire_seeds DIR
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "src/migration/test_util.h"
#include "src/migration/wire.h"

namespace fm = faultline::migration;

namespace {

void Write(const std::string& path, uint8_t mode, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.put(static_cast<char>(mode));
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  std::vector<uint8_t> stream;
  uint64_t seq = 0;
  auto add = [&](const fm::Message& m) {
    auto frame = fm::EncodeFrame(m, seq++);
    stream.insert(stream.end(), frame.begin(), frame.end());
  };
  fm::Hello hello;
  hello.session_id = 1;
  hello.page_channels = 1;
  hello.blocks = fm::testing::TestBlocks();
  add(hello);
  add(fm::ChannelHello{1, 0, fm::ChannelKind::kPage, {}});
  add(fm::ZeroPages{0, 0, {{0, 4}, {9, 1}}});
  const fm::PagesHeader pages{0, 0, 0, {4, 5, 8}};
  auto prefix = fm::EncodePagesPrefix(pages, seq++);
  stream.insert(stream.end(), prefix.begin(), prefix.end());
  stream.insert(stream.end(), 3 * fm::kWirePageSize, 0x77);
  add(fm::PassEnd{0, 3, 5, 0});
  add(fm::Switchover{fm::SwitchoverMode::kPostcopy, 1, 0, 1, 1});
  add(fm::DirtyPages{0, 0, 32, {0x10}});
  add(fm::VcpuStateMessage{0, {1, 2, 3}});
  add(fm::DeviceState{"serial", {4}});
  add(fm::PageRequest{0, 1, {1, 2, 3}});
  add(fm::PresentBitmap{1, 0, 32, {0xffff}});
  add(fm::ChannelEnd{0, 1, 3, 5, 0});
  add(fm::Complete{1, 3, 5});
  add(fm::ErrorMessage{fm::ErrorCode::kInternal, "x"});
  Write(dir + "/stream", 0, stream);
  // One payload seed per kind of message, for the canonical-encoding mode.
  const std::vector<fm::Message> seeds = {
      hello,
      fm::HelloAck{},
      fm::ChannelHello{5, 1, fm::ChannelKind::kPage, {}},
      fm::ZeroPages{1, 3, {{0, 2}, {5, 7}}},
      fm::ChannelEnd{1, 2, 3, 4, 5},
      fm::Switchover{fm::SwitchoverMode::kStopAndCopy, 2, 3, 4, 5},
      fm::DeviceState{"d", {1, 2, 3}},
      fm::PageRequest{0, 1, {1, 2, 3}},
      fm::PresentBitmap{1, 0, 32, {0xffff}},
      fm::DirtyPages{0, 0, 32, {0x10}},
      fm::Complete{1, 3, 5},
  };
  for (size_t i = 0; i < seeds.size(); ++i) {
    auto frame = fm::EncodeFrame(seeds[i], 0);
    std::vector<uint8_t> bytes{static_cast<uint8_t>(fm::TypeOf(seeds[i]))};
    bytes.insert(bytes.end(), frame.begin() + 16, frame.end());
    Write(dir + "/payload-" + fm::MessageTypeName(fm::TypeOf(seeds[i])), 1, bytes);
  }
  return 0;
}
