// Frame headers, block lists, and encoding of every message. Decoding of
// payloads is in wire_decode.cc.
#include "src/migration/wire.h"

#include <set>

#include "src/migration/bytes.h"
#include "src/migration/wire_layout.h"

namespace faultline::migration {

const char* HelloAccelName(HelloAccel accel) {
  switch (accel) {
    case HelloAccel::kKvm:
      return "kvm";
    case HelloAccel::kTcg:
      return "tcg (the software CPU)";
    case HelloAccel::kUnspecified:
      break;
  }
  return "unspecified";
}

const char* MessageTypeName(MessageType type) {
  switch (type) {
    case MessageType::kHello:
      return "Hello";
    case MessageType::kHelloAck:
      return "HelloAck";
    case MessageType::kAuth:
      return "Auth";
    case MessageType::kChannelHello:
      return "ChannelHello";
    case MessageType::kChannelAck:
      return "ChannelAck";
    case MessageType::kPages:
      return "Pages";
    case MessageType::kZeroPages:
      return "ZeroPages";
    case MessageType::kPassEnd:
      return "PassEnd";
    case MessageType::kChannelEnd:
      return "ChannelEnd";
    case MessageType::kSwitchover:
      return "Switchover";
    case MessageType::kVcpuState:
      return "VcpuState";
    case MessageType::kDeviceState:
      return "DeviceState";
    case MessageType::kComplete:
      return "Complete";
    case MessageType::kCompleteAck:
      return "CompleteAck";
    case MessageType::kError:
      return "Error";
    case MessageType::kPageRequest:
      return "PageRequest";
    case MessageType::kPresentBitmap:
      return "PresentBitmap";
    case MessageType::kDirtyPages:
      return "DirtyPages";
    case MessageType::kResume:
      return "Resume";
    case MessageType::kLocalOffer:
      return "LocalOffer";
    case MessageType::kLocalReady:
      return "LocalReady";
  }
  return "unknown";
}

const char* LocalMemoryName(LocalMemory memory) {
  switch (memory) {
    case LocalMemory::kFds:
      return "fds";
    case LocalMemory::kCopy:
      return "copy";
  }
  return "unknown";
}

uint64_t MaxPayload(MessageType type) { return internal::PayloadBounds(type).max; }

void EncodeFrameHeader(const FrameHeader& header, std::span<uint8_t, kFrameHeaderSize> out) {
  StoreLe<uint16_t>(&out[0], kFrameSync);
  out[2] = static_cast<uint8_t>(header.type);
  out[3] = header.flags;
  StoreLe<uint32_t>(&out[4], header.length);
  StoreLe<uint64_t>(&out[8], header.seq);
}

Result<FrameHeader> DecodeFrameHeader(std::span<const uint8_t, kFrameHeaderSize> in) {
  const uint16_t sync = LoadLe<uint16_t>(&in[0]);
  if (sync != kFrameSync) {
    return Error(
        "bad frame sync {:#06x} (expected {:#06x}): not a Faultline migration stream, "
        "or the stream lost its framing",
        sync, kFrameSync);
  }
  FrameHeader header;
  const uint8_t type = in[2];
  if (type == 0 || type > kMaxMessageType) return Error("unknown message type {}", type);
  header.type = static_cast<MessageType>(type);
  header.flags = in[3];
  header.length = LoadLe<uint32_t>(&in[4]);
  header.seq = LoadLe<uint64_t>(&in[8]);
  if (header.flags != 0) {
    return Error("{}: frame flags {:#04x} set; version 1 defines none",
                 MessageTypeName(header.type), header.flags);
  }
  const internal::Bounds bounds = internal::PayloadBounds(header.type);
  if (header.length < bounds.min || header.length > bounds.max) {
    if (bounds.min == bounds.max) {
      return Error("{}: payload is {} bytes, must be {}", MessageTypeName(header.type),
                   header.length, bounds.min);
    }
    return Error("{}: payload length {} outside [{}, {}]", MessageTypeName(header.type),
                 header.length, bounds.min, bounds.max);
  }
  return header;
}

// ---- Blocks -------------------------------------------------------------------

BlockInfo DescribeBlock(const RamBlock& block) {
  return BlockInfo{block.name(), block.size(), block.page_size(), block.backing()};
}

Status ValidateBlocks(std::span<const BlockInfo> blocks) {
  if (blocks.empty() || blocks.size() > kMaxBlocks) {
    return Error("{} RAM blocks; between 1 and {} are supported", blocks.size(), kMaxBlocks);
  }
  std::set<std::string_view> names;
  for (const BlockInfo& b : blocks) {
    if (b.name.empty() || b.name.size() > kMaxNameLength) {
      return Error("RAM block name '{}' is {} bytes; 1 to {} allowed", Printable(b.name),
                   b.name.size(), kMaxNameLength);
    }
    for (char c : b.name) {
      if (c < 0x21 || c > 0x7e) {
        return Error("RAM block name '{}': only printable ASCII without spaces is allowed",
                     Printable(b.name));
      }
    }
    if (!names.insert(b.name).second) return Error("RAM block '{}' listed twice", b.name);
    if (b.page_size != 4096 && b.page_size != (2u << 20)) {
      return Error("RAM block '{}': page size {} (4096 or 2097152 supported)", b.name, b.page_size);
    }
    if (b.size == 0 || b.size % b.page_size != 0) {
      return Error("RAM block '{}': size {} is not a non-zero multiple of its page size {}", b.name,
                   b.size, b.page_size);
    }
    if (b.pages() > UINT32_MAX) {  // 4 KiB pages: 16 TiB
      return Error("RAM block '{}': {} pages; at most {} per block", b.name, b.pages(), UINT32_MAX);
    }
  }
  return Status::Ok();
}

// Backing and page size may differ: wire pages are 4 KiB either way, and a
// destination may well put the guest on hugetlbfs where the source had
// anonymous memory.
Status CheckBlocksMatch(std::span<const BlockInfo> source, std::span<const BlockInfo> local) {
  if (source.size() != local.size()) {
    return Error("RAM block list mismatch: the source has {} blocks, this destination {}",
                 source.size(), local.size());
  }
  for (size_t i = 0; i < source.size(); ++i) {
    const BlockInfo& s = source[i];
    const BlockInfo& l = local[i];
    if (s.name != l.name) {
      return Error("RAM block list mismatch: block {} is '{}' in the source, '{}' here", i,
                   Printable(s.name), l.name);
    }
    if (s.size != l.size) {
      return Error("RAM block list mismatch: block '{}' is {} bytes in the source, {} here", l.name,
                   s.size, l.size);
    }
  }
  return Status::Ok();
}

std::string Printable(std::string_view text) {
  std::string out(text);
  for (char& c : out) {
    if (c < 0x20 || c > 0x7e) c = '?';
  }
  return out;
}

uint64_t ZeroPages::page_count() const {
  uint64_t n = 0;
  for (const PageRun& r : runs) n += r.count;
  return n;
}

// ---- Encoding ---------------------------------------------------------------

namespace {

void EncodeBlock(ByteWriter& w, const BlockInfo& b) {
  w.U64(b.size);
  w.U32(static_cast<uint32_t>(b.page_size));
  w.U8(internal::BackingCode(b.backing));
  w.U8(static_cast<uint8_t>(b.name.size()));
  w.U16(0);
  w.FixedText(b.name, kMaxNameLength);
}

struct PayloadEncoder {
  ByteWriter& w;

  void operator()(const Hello& m) {
    w.U64(kStreamMagic);
    w.U16(m.min_version);
    w.U16(m.max_version);
    w.U16(m.page_channels);
    w.U16(static_cast<uint16_t>(m.blocks.size()));
    w.U64(m.features_offered);
    w.U64(m.features_required);
    w.U64(m.session_id);
    w.U32(m.hello_flags);
    w.U32(0);
    w.Bytes(m.nonce);
    for (const BlockInfo& b : m.blocks) EncodeBlock(w, b);
  }
  void operator()(const HelloAck& m) {
    w.U64(kStreamMagic);
    w.U16(m.version);
    w.U16(m.page_channels);
    w.U32(0);
    w.U64(m.features);
    w.U64(m.session_id);
    w.Bytes(m.nonce);
    w.Bytes(m.mac);
  }
  void operator()(const Auth& m) { w.Bytes(m.mac); }
  void operator()(const ChannelHello& m) {
    w.U64(kStreamMagic);
    w.U64(m.session_id);
    w.U16(m.index);
    w.U8(static_cast<uint8_t>(m.kind));
    w.U8(0);
    w.U32(0);
    w.Bytes(m.mac);
  }
  void operator()(const ChannelAck& m) {
    w.U64(m.session_id);
    w.U16(m.index);
    w.U8(static_cast<uint8_t>(m.kind));
    w.U8(0);
    w.U32(0);
  }
  void operator()(const PagesHeader& m) {
    w.U32(m.block);
    w.U32(static_cast<uint32_t>(m.pages.size()));
    w.U32(m.pass);
    w.U32(m.flags);
    for (uint32_t p : m.pages) w.U32(p);
  }
  void operator()(const ZeroPages& m) {
    w.U32(m.block);
    w.U32(static_cast<uint32_t>(m.runs.size()));
    w.U32(m.pass);
    w.U32(0);
    for (const PageRun& r : m.runs) {
      w.U32(r.first);
      w.U32(r.count);
    }
  }
  void operator()(const PassEnd& m) {
    w.U32(m.pass);
    w.U32(0);
    w.U64(m.data_pages);
    w.U64(m.zero_pages);
    w.U64(m.dirty_remaining);
  }
  void operator()(const ChannelEnd& m) {
    w.U32(m.pass);
    w.U32(0);
    w.U64(m.data_pages);
    w.U64(m.zero_pages);
    w.U64(m.total_data_pages);
    w.U64(m.total_zero_pages);
  }
  void operator()(const Switchover& m) {
    w.U32(static_cast<uint32_t>(m.mode));
    w.U32(m.final_pass);
    w.U64(m.dirty_pages);
    w.U32(m.vcpu_count);
    w.U32(m.device_count);
  }
  void operator()(const VcpuStateMessage& m) {
    w.U32(m.index);
    w.U32(static_cast<uint32_t>(m.state.size()));
    w.Bytes(m.state);
  }
  void operator()(const DeviceState& m) {
    w.U8(static_cast<uint8_t>(m.name.size()));
    w.U8(0);
    w.U16(0);
    w.U32(static_cast<uint32_t>(m.state.size()));
    w.Text(m.name);
    w.Bytes(m.state);
  }
  void operator()(const Complete& m) { Totals(m.passes, m.data_pages, m.zero_pages); }
  void operator()(const CompleteAck& m) { Totals(m.passes, m.data_pages, m.zero_pages); }
  void operator()(const ErrorMessage& m) {
    const std::string_view text = std::string_view(m.text).substr(0, kMaxErrorText);
    w.U32(static_cast<uint32_t>(m.code));
    w.U16(static_cast<uint16_t>(text.size()));
    w.U16(0);
    w.Text(text);
  }
  void operator()(const PageRequest& m) {
    w.U32(m.block);
    w.U32(static_cast<uint32_t>(m.pages.size()));
    w.U64(m.request_id);
    for (uint32_t p : m.pages) w.U32(p);
  }
  void operator()(const PresentBitmap& m) { Bitmap(m.block, m.first_page, m.page_count, m.words); }
  void operator()(const DirtyPages& m) { Bitmap(m.block, m.first_page, m.page_count, m.words); }
  void operator()(const Resume& m) {
    w.U64(m.session_id);
    w.U64(m.pages);
    w.U64(0);
  }
  void operator()(const LocalOffer& m) {
    w.U64(kStreamMagic);
    w.U16(m.min_version);
    w.U16(m.max_version);
    w.U8(static_cast<uint8_t>(m.memory));
    w.U8(static_cast<uint8_t>(m.mode));
    w.U16(static_cast<uint16_t>(m.blocks.size()));
    w.U32(m.vcpu_count);
    w.U32(m.hello_flags);
    w.U64(0);
    for (const BlockInfo& b : m.blocks) EncodeBlock(w, b);
  }
  void operator()(const LocalReady& m) {
    w.U64(kStreamMagic);
    w.U16(m.version);
    w.U16(0);
    w.U32(0);
  }

  void Bitmap(uint32_t block, uint64_t first, uint32_t count, const std::vector<uint64_t>& words) {
    w.U32(block);
    w.U32(0);
    w.U64(first);
    w.U32(count);
    w.U32(0);
    for (uint64_t word : words) w.U64(word);
  }

  void Totals(uint32_t passes, uint64_t data, uint64_t zero) {
    w.U32(passes);
    w.U32(0);
    w.U64(data);
    w.U64(zero);
  }
};

}  // namespace

MessageType TypeOf(const Message& message) {
  static constexpr MessageType kTypes[] = {
      MessageType::kHello,        MessageType::kHelloAck,      MessageType::kAuth,
      MessageType::kChannelHello, MessageType::kChannelAck,    MessageType::kPages,
      MessageType::kZeroPages,    MessageType::kPassEnd,       MessageType::kChannelEnd,
      MessageType::kSwitchover,   MessageType::kVcpuState,     MessageType::kDeviceState,
      MessageType::kComplete,     MessageType::kCompleteAck,   MessageType::kError,
      MessageType::kPageRequest,  MessageType::kPresentBitmap, MessageType::kDirtyPages,
      MessageType::kResume,       MessageType::kLocalOffer,    MessageType::kLocalReady,
  };
  static_assert(std::size(kTypes) == std::variant_size_v<Message>);
  return kTypes[message.index()];
}

void EncodePayload(const Message& message, std::vector<uint8_t>& out) {
  ByteWriter w(out);
  std::visit(PayloadEncoder{w}, message);
}

std::vector<uint8_t> EncodeFrame(const Message& message, uint64_t seq) {
  std::vector<uint8_t> out(kFrameHeaderSize);
  EncodePayload(message, out);
  const FrameHeader header{TypeOf(message), 0, static_cast<uint32_t>(out.size() - kFrameHeaderSize),
                           seq};
  EncodeFrameHeader(header, std::span<uint8_t, kFrameHeaderSize>(out.data(), kFrameHeaderSize));
  return out;
}

std::vector<uint8_t> EncodePagesPrefix(const PagesHeader& header, uint64_t seq) {
  std::vector<uint8_t> out(kFrameHeaderSize);
  out.reserve(kFrameHeaderSize + kPagesFixedSize + 4 * header.pages.size());
  EncodePayload(header, out);
  const uint64_t length = out.size() - kFrameHeaderSize + header.pages.size() * kWirePageSize;
  const FrameHeader frame{MessageType::kPages, 0, static_cast<uint32_t>(length), seq};
  EncodeFrameHeader(frame, std::span<uint8_t, kFrameHeaderSize>(out.data(), kFrameHeaderSize));
  return out;
}

}  // namespace faultline::migration
