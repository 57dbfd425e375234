// Decoding and validation of message payloads. Each decoder reads a fixed
// layout with a bounds-checked ByteReader, then checks every field against
// the limits in wire.h and the session's block list. The payload's length
// was already bounded by DecodeFrameHeader; here it must match the counts
// inside the payload exactly.
#include <algorithm>

#include "src/migration/bytes.h"
#include "src/migration/wire.h"
#include "src/migration/wire_layout.h"

namespace faultline::migration {
namespace {

using internal::kBlockEntry;
using internal::kHelloFixed;

Status CheckMagic(const char* what, uint64_t magic) {
  if (magic == kStreamMagic) return Status::Ok();
  return Error("{}: bad magic {:#018x} (expected {:#018x}): not a Faultline migration stream", what,
               magic, kStreamMagic);
}

Status CheckZero(const char* what, uint64_t reserved) {
  if (reserved == 0) return Status::Ok();
  return Error("{}: reserved field is {:#x}, must be 0", what, reserved);
}

Status CheckLength(const char* what, uint64_t expected, size_t actual, std::string_view why) {
  if (expected == actual) return Status::Ok();
  return Error("{}: {} need {} payload bytes, got {}", what, why, expected, actual);
}

// The block a page message names, or an error.
Result<const BlockInfo*> FindBlock(const char* what, uint32_t block, const DecodeContext& context) {
  if (context.blocks == nullptr) return Error("{} before the handshake named any RAM block", what);
  if (block >= context.blocks->size()) {
    return Error("{}: block index {} out of range ({} blocks)", what, block,
                 context.blocks->size());
  }
  return &(*context.blocks)[block];
}

// Reads `count` u32 page indices; they must increase strictly and lie
// inside `block`.
Result<std::vector<uint32_t>> ReadIndices(const char* what, ByteReader& r, uint32_t count,
                                          const BlockInfo& block) {
  std::vector<uint32_t> pages(count);
  const uint64_t limit = block.pages();
  for (uint32_t i = 0; i < count; ++i) {
    const uint32_t page = r.U32();
    if (page >= limit) {
      return Error("{}: page index {} out of range for block '{}' ({} pages)", what, page,
                   block.name, limit);
    }
    if (i > 0 && page <= pages[i - 1]) {
      return Error("{}: page indices not strictly increasing ({} after {}) in block '{}'", what,
                   page, pages[i - 1], block.name);
    }
    pages[i] = page;
  }
  if (r.truncated()) return Error("{}: truncated index list", what);
  return pages;
}

// A block entry of a Hello or LocalOffer (`what`).
Result<BlockInfo> ReadBlock(const char* what, ByteReader& r, size_t i) {
  BlockInfo b;
  b.size = r.U64();
  b.page_size = r.U32();
  const uint8_t backing = r.U8();
  const uint8_t name_len = r.U8();
  RETURN_IF_ERROR(CheckZero(what, r.U16()));
  std::span<const uint8_t> name = r.Bytes(kMaxNameLength);
  if (r.truncated()) return Error("{}: truncated block entry {}", what, i);
  if (backing > internal::BackingCode(Backing::kGuestMemfd)) {
    return Error("{}: block {} has unknown backing code {}", what, i, backing);
  }
  b.backing = static_cast<Backing>(backing);
  if (name_len == 0 || name_len > kMaxNameLength) {
    return Error("{}: block {} name length {} (1 to {} allowed)", what, i, name_len,
                 kMaxNameLength);
  }
  b.name.assign(name.begin(), name.begin() + name_len);
  for (size_t j = name_len; j < name.size(); ++j) {
    if (name[j] != 0) return Error("{}: block {} name is not zero-padded", what, i);
  }
  return b;
}

Status CheckAccelFlags(const char* what, uint32_t flags) {
  if ((flags & ~kHelloAccelMask) != 0 ||
      (flags & kHelloAccelMask) > static_cast<uint32_t>(HelloAccel::kTcg)) {
    return Error(
        "{}: flags {:#x}; version 1 defines only an accelerator (1 kvm, 2 tcg) in bits "
        "0..7",
        what, flags);
  }
  return Status::Ok();
}

Result<std::vector<BlockInfo>> ReadBlocks(const char* what, ByteReader& r, size_t count,
                                          uint32_t fixed, size_t length) {
  if (count == 0 || count > kMaxBlocks) {
    return Error("{}: {} RAM blocks (1 to {} allowed)", what, count, kMaxBlocks);
  }
  RETURN_IF_ERROR(CheckLength(what, fixed + uint64_t{internal::kBlockEntry} * count, length,
                              fmt::format("{} RAM blocks", count)));
  std::vector<BlockInfo> blocks;
  for (size_t i = 0; i < count; ++i) {
    ASSIGN_OR_RETURN(BlockInfo b, ReadBlock(what, r, i));
    blocks.push_back(std::move(b));
  }
  RETURN_IF_ERROR(ValidateBlocks(blocks).WithContext(what));
  return blocks;
}

Result<Message> DecodeLocalOffer(ByteReader& r, size_t length) {
  LocalOffer m;
  RETURN_IF_ERROR(CheckMagic("LocalOffer", r.U64()));
  m.min_version = r.U16();
  m.max_version = r.U16();
  const uint8_t memory = r.U8();
  const uint8_t mode = r.U8();
  const uint16_t block_count = r.U16();
  m.vcpu_count = r.U32();
  m.hello_flags = r.U32();
  RETURN_IF_ERROR(CheckZero("LocalOffer", r.U64()));
  if (r.truncated()) return Error("LocalOffer: truncated ({} bytes)", length);
  if (m.min_version == 0 || m.min_version > m.max_version) {
    return Error("LocalOffer: bad version range {}..{}", m.min_version, m.max_version);
  }
  if (memory != static_cast<uint8_t>(LocalMemory::kFds) &&
      memory != static_cast<uint8_t>(LocalMemory::kCopy)) {
    return Error("LocalOffer: unknown memory kind {} (1 fds, 2 copy)", memory);
  }
  m.memory = static_cast<LocalMemory>(memory);
  if (mode > static_cast<uint8_t>(SwitchoverMode::kPostcopy) ||
      (m.memory == LocalMemory::kFds && mode != 0)) {
    return Error("LocalOffer: mode {} with memory {}", mode, LocalMemoryName(m.memory));
  }
  m.mode = static_cast<SwitchoverMode>(mode);
  if (m.vcpu_count == 0 || m.vcpu_count > kMaxVcpus) {
    return Error("LocalOffer: {} vCPUs (1 to {} allowed)", m.vcpu_count, kMaxVcpus);
  }
  RETURN_IF_ERROR(CheckAccelFlags("LocalOffer", m.hello_flags));
  ASSIGN_OR_RETURN(m.blocks,
                   ReadBlocks("LocalOffer", r, block_count, internal::kLocalOfferFixed, length));
  return m;
}

Result<Message> DecodeLocalReady(ByteReader& r) {
  LocalReady m;
  RETURN_IF_ERROR(CheckMagic("LocalReady", r.U64()));
  m.version = r.U16();
  RETURN_IF_ERROR(CheckZero("LocalReady", r.U16()));
  RETURN_IF_ERROR(CheckZero("LocalReady", r.U32()));
  if (m.version < kMinVersion || m.version > kMaxVersion) {
    return Error("LocalReady: version {} (this end speaks {}..{})", m.version, kMinVersion,
                 kMaxVersion);
  }
  return m;
}

Result<Message> DecodeHello(ByteReader& r, size_t length) {
  Hello m;
  RETURN_IF_ERROR(CheckMagic("Hello", r.U64()));
  m.min_version = r.U16();
  m.max_version = r.U16();
  m.page_channels = r.U16();
  const uint16_t block_count = r.U16();
  m.features_offered = r.U64();
  m.features_required = r.U64();
  m.session_id = r.U64();
  m.hello_flags = r.U32();
  RETURN_IF_ERROR(CheckZero("Hello", r.U32()));
  std::span<const uint8_t> nonce = r.Bytes(kNonceSize);
  if (r.truncated()) return Error("Hello: truncated ({} bytes)", length);
  std::copy(nonce.begin(), nonce.end(), m.nonce.begin());
  if (m.min_version == 0 || m.min_version > m.max_version) {
    return Error("Hello: bad version range {}..{}", m.min_version, m.max_version);
  }
  if (m.page_channels == 0 || m.page_channels > kMaxPageChannels) {
    return Error("Hello: {} page channels (1 to {} allowed)", m.page_channels, kMaxPageChannels);
  }
  if (m.session_id == 0) return Error("Hello: session id 0 is not allowed");
  RETURN_IF_ERROR(CheckAccelFlags("Hello", m.hello_flags));
  ASSIGN_OR_RETURN(m.blocks, ReadBlocks("Hello", r, block_count, kHelloFixed, length));
  return m;
}

Result<Message> DecodeHelloAck(ByteReader& r) {
  HelloAck m;
  RETURN_IF_ERROR(CheckMagic("HelloAck", r.U64()));
  m.version = r.U16();
  m.page_channels = r.U16();
  RETURN_IF_ERROR(CheckZero("HelloAck", r.U32()));
  m.features = r.U64();
  m.session_id = r.U64();
  auto nonce = r.Bytes(kNonceSize);
  auto mac = r.Bytes(kMacSize);
  if (r.truncated()) return Error("HelloAck: truncated");
  std::copy(nonce.begin(), nonce.end(), m.nonce.begin());
  std::copy(mac.begin(), mac.end(), m.mac.begin());
  return m;
}

Result<ChannelKind> ReadKind(const char* what, ByteReader& r) {
  const uint8_t kind = r.U8();
  if (kind != static_cast<uint8_t>(ChannelKind::kPage) &&
      kind != static_cast<uint8_t>(ChannelKind::kPriority)) {
    return Error("{}: unknown channel kind {}", what, kind);
  }
  return static_cast<ChannelKind>(kind);
}

Result<Message> DecodeChannelHello(ByteReader& r) {
  ChannelHello m;
  RETURN_IF_ERROR(CheckMagic("ChannelHello", r.U64()));
  m.session_id = r.U64();
  m.index = r.U16();
  ASSIGN_OR_RETURN(m.kind, ReadKind("ChannelHello", r));
  RETURN_IF_ERROR(CheckZero("ChannelHello", r.U8()));
  RETURN_IF_ERROR(CheckZero("ChannelHello", r.U32()));
  auto mac = r.Bytes(kMacSize);
  if (r.truncated()) return Error("ChannelHello: truncated");
  std::copy(mac.begin(), mac.end(), m.mac.begin());
  if (m.index >= kMaxPageChannels) {
    return Error("ChannelHello: channel index {} (at most {} channels)", m.index, kMaxPageChannels);
  }
  return m;
}

Result<Message> DecodeChannelAck(ByteReader& r) {
  ChannelAck m;
  m.session_id = r.U64();
  m.index = r.U16();
  ASSIGN_OR_RETURN(m.kind, ReadKind("ChannelAck", r));
  RETURN_IF_ERROR(CheckZero("ChannelAck", r.U8()));
  RETURN_IF_ERROR(CheckZero("ChannelAck", r.U32()));
  return m;
}

Result<Message> DecodeZeroPages(ByteReader& r, size_t length, const DecodeContext& context) {
  ZeroPages m;
  m.block = r.U32();
  const uint32_t run_count = r.U32();
  m.pass = r.U32();
  RETURN_IF_ERROR(CheckZero("ZeroPages", r.U32()));
  ASSIGN_OR_RETURN(const BlockInfo* block, FindBlock("ZeroPages", m.block, context));
  if (run_count == 0 || run_count > kMaxZeroRuns) {
    return Error("ZeroPages: {} runs (1 to {} allowed)", run_count, kMaxZeroRuns);
  }
  RETURN_IF_ERROR(CheckLength("ZeroPages", internal::kZeroPagesFixed + 8ull * run_count, length,
                              fmt::format("{} runs", run_count)));
  m.runs.resize(run_count);
  uint64_t next_free = 0;  // runs must start at or after the previous one's end
  for (PageRun& run : m.runs) {
    run.first = r.U32();
    run.count = r.U32();
    const uint64_t end = uint64_t{run.first} + run.count;
    if (run.count == 0) return Error("ZeroPages: empty run at page {}", run.first);
    if (end > block->pages()) {
      return Error("ZeroPages: run [{}, {}) out of range for block '{}' ({} pages)", run.first, end,
                   block->name, block->pages());
    }
    if (run.first < next_free) {
      return Error("ZeroPages: run at page {} overlaps or precedes the previous run (ends at {})",
                   run.first, next_free);
    }
    next_free = end;
  }
  return m;
}

Result<Message> DecodeSwitchover(ByteReader& r) {
  Switchover m;
  const uint32_t mode = r.U32();
  if (mode > static_cast<uint32_t>(SwitchoverMode::kPostcopy)) {
    return Error("Switchover: unknown mode {}", mode);
  }
  m.mode = static_cast<SwitchoverMode>(mode);
  m.final_pass = r.U32();
  m.dirty_pages = r.U64();
  m.vcpu_count = r.U32();
  m.device_count = r.U32();
  if (m.vcpu_count == 0 || m.vcpu_count > kMaxVcpus) {
    return Error("Switchover: {} vCPUs (1 to {} allowed)", m.vcpu_count, kMaxVcpus);
  }
  if (m.device_count > kMaxDevices) {
    return Error("Switchover: {} devices (at most {})", m.device_count, kMaxDevices);
  }
  return m;
}

Result<Message> DecodeVcpuState(ByteReader& r, size_t length) {
  VcpuStateMessage m;
  m.index = r.U32();
  const uint32_t size = r.U32();
  if (m.index >= kMaxVcpus)
    return Error("VcpuState: vCPU index {} (at most {})", m.index, kMaxVcpus);
  RETURN_IF_ERROR(CheckLength("VcpuState", internal::kStateFixed + uint64_t{size}, length,
                              fmt::format("{} state bytes", size)));
  auto bytes = r.Bytes(size);
  m.state.assign(bytes.begin(), bytes.end());
  return m;
}

Result<Message> DecodeDeviceState(ByteReader& r, size_t length) {
  DeviceState m;
  const uint8_t name_len = r.U8();
  RETURN_IF_ERROR(CheckZero("DeviceState", r.U8()));
  RETURN_IF_ERROR(CheckZero("DeviceState", r.U16()));
  const uint32_t size = r.U32();
  if (name_len == 0 || name_len > kMaxNameLength) {
    return Error("DeviceState: name length {} (1 to {} allowed)", name_len, kMaxNameLength);
  }
  RETURN_IF_ERROR(CheckLength("DeviceState",
                              internal::kStateFixed + uint64_t{name_len} + uint64_t{size}, length,
                              fmt::format("a {}-byte name and {} state bytes", name_len, size)));
  auto name = r.Bytes(name_len);
  m.name.assign(name.begin(), name.end());
  if (Printable(m.name) != m.name) return Error("DeviceState: name is not printable ASCII");
  auto bytes = r.Bytes(size);
  m.state.assign(bytes.begin(), bytes.end());
  return m;
}

Result<Message> DecodeError(ByteReader& r, size_t length) {
  ErrorMessage m;
  m.code = static_cast<ErrorCode>(r.U32());  // unknown codes from newer peers are kept
  const uint16_t text_len = r.U16();
  RETURN_IF_ERROR(CheckZero("Error", r.U16()));
  if (text_len > kMaxErrorText)
    return Error("Error: text of {} bytes (at most {})", text_len, kMaxErrorText);
  RETURN_IF_ERROR(CheckLength("Error", internal::kErrorFixed + uint64_t{text_len}, length,
                              fmt::format("{} text bytes", text_len)));
  auto text = r.Bytes(text_len);
  m.text = Printable(std::string_view(reinterpret_cast<const char*>(text.data()), text.size()));
  return m;
}

Result<Message> DecodePageRequest(ByteReader& r, size_t length, const DecodeContext& context) {
  PageRequest m;
  m.block = r.U32();
  const uint32_t count = r.U32();
  m.request_id = r.U64();
  ASSIGN_OR_RETURN(const BlockInfo* block, FindBlock("PageRequest", m.block, context));
  if (count == 0 || count > kMaxRequestPages) {
    return Error("PageRequest: {} pages (1 to {} allowed)", count, kMaxRequestPages);
  }
  RETURN_IF_ERROR(CheckLength("PageRequest", internal::kPageRequestFixed + 4ull * count, length,
                              fmt::format("{} pages", count)));
  ASSIGN_OR_RETURN(m.pages, ReadIndices("PageRequest", r, count, *block));
  return m;
}

// PresentBitmap and DirtyPages share a layout and its checks.
template <typename T>
Result<Message> DecodeBitmap(const char* name, ByteReader& r, size_t length,
                             const DecodeContext& context) {
  T m;
  m.block = r.U32();
  RETURN_IF_ERROR(CheckZero(name, r.U32()));
  m.first_page = r.U64();
  m.page_count = r.U32();
  RETURN_IF_ERROR(CheckZero(name, r.U32()));
  ASSIGN_OR_RETURN(const BlockInfo* block, FindBlock(name, m.block, context));
  if (m.first_page % 64 != 0) {
    return Error("{}: first page {} is not a multiple of 64", name, m.first_page);
  }
  if (m.page_count == 0 || m.page_count > kMaxBitmapPages) {
    return Error("{}: {} pages (1 to {} allowed)", name, m.page_count, kMaxBitmapPages);
  }
  if (m.first_page > block->pages() || block->pages() - m.first_page < m.page_count) {
    return Error("{}: pages [{}, {}) out of range for block '{}' ({} pages)", name, m.first_page,
                 m.first_page + m.page_count, block->name, block->pages());
  }
  const uint64_t words = (uint64_t{m.page_count} + 63) / 64;
  RETURN_IF_ERROR(CheckLength(name, internal::kPresentBitmapFixed + 8 * words, length,
                              fmt::format("{} pages", m.page_count)));
  m.words.resize(words);
  for (uint64_t& w : m.words) w = r.U64();
  const uint32_t tail = m.page_count % 64;
  if (tail != 0 && (m.words.back() >> tail) != 0) {
    return Error("{}: bits set past page count {}", name, m.page_count);
  }
  return m;
}

Result<Message> DecodeResume(ByteReader& r) {
  Resume m;
  m.session_id = r.U64();
  m.pages = r.U64();
  RETURN_IF_ERROR(CheckZero("Resume", r.U64()));
  if (m.session_id == 0) return Error("Resume: session id 0");
  return m;
}

Result<Message> DecodeAuth(ByteReader& r) {
  Auth m;
  auto mac = r.Bytes(kMacSize);
  std::copy(mac.begin(), mac.end(), m.mac.begin());
  return m;
}

Result<Message> DecodePassEnd(ByteReader& r) {
  PassEnd m;
  m.pass = r.U32();
  RETURN_IF_ERROR(CheckZero("PassEnd", r.U32()));
  m.data_pages = r.U64();
  m.zero_pages = r.U64();
  m.dirty_remaining = r.U64();
  return m;
}

Result<Message> DecodeChannelEnd(ByteReader& r) {
  ChannelEnd m;
  m.pass = r.U32();
  RETURN_IF_ERROR(CheckZero("ChannelEnd", r.U32()));
  m.data_pages = r.U64();
  m.zero_pages = r.U64();
  m.total_data_pages = r.U64();
  m.total_zero_pages = r.U64();
  return m;
}

// Complete and CompleteAck share their layout.
Result<Message> DecodeCompletion(MessageType type, ByteReader& r) {
  const uint32_t passes = r.U32();
  RETURN_IF_ERROR(CheckZero(MessageTypeName(type), r.U32()));
  const uint64_t data = r.U64();
  const uint64_t zero = r.U64();
  if (type == MessageType::kComplete) return Complete{passes, data, zero};
  return CompleteAck{passes, data, zero};
}

// The message of `type` from `r`, whose `n` bytes passed the type's length
// bounds.
Result<Message> DecodeBody(MessageType type, ByteReader& r, size_t n,
                           const DecodeContext& context) {
  switch (type) {
    case MessageType::kHello:
      return DecodeHello(r, n);
    case MessageType::kHelloAck:
      return DecodeHelloAck(r);
    case MessageType::kAuth:
      return DecodeAuth(r);
    case MessageType::kChannelHello:
      return DecodeChannelHello(r);
    case MessageType::kChannelAck:
      return DecodeChannelAck(r);
    case MessageType::kPages:
      return Error("Pages messages are decoded with DecodePagesFixed and DecodePagesIndices");
    case MessageType::kZeroPages:
      return DecodeZeroPages(r, n, context);
    case MessageType::kPassEnd:
      return DecodePassEnd(r);
    case MessageType::kChannelEnd:
      return DecodeChannelEnd(r);
    case MessageType::kSwitchover:
      return DecodeSwitchover(r);
    case MessageType::kVcpuState:
      return DecodeVcpuState(r, n);
    case MessageType::kDeviceState:
      return DecodeDeviceState(r, n);
    case MessageType::kComplete:
    case MessageType::kCompleteAck:
      return DecodeCompletion(type, r);
    case MessageType::kError:
      return DecodeError(r, n);
    case MessageType::kPageRequest:
      return DecodePageRequest(r, n, context);
    case MessageType::kPresentBitmap:
      return DecodeBitmap<PresentBitmap>("PresentBitmap", r, n, context);
    case MessageType::kDirtyPages:
      return DecodeBitmap<DirtyPages>("DirtyPages", r, n, context);
    case MessageType::kResume:
      return DecodeResume(r);
    case MessageType::kLocalOffer:
      return DecodeLocalOffer(r, n);
    case MessageType::kLocalReady:
      return DecodeLocalReady(r);
  }
  return Error("unknown message type {}", static_cast<unsigned>(type));
}

}  // namespace

Result<Message> DecodePayload(MessageType type, std::span<const uint8_t> payload,
                              const DecodeContext& context) {
  const internal::Bounds bounds = internal::PayloadBounds(type);
  if (payload.size() < bounds.min || payload.size() > bounds.max) {
    return Error("{}: payload length {} outside [{}, {}]", MessageTypeName(type), payload.size(),
                 bounds.min, bounds.max);
  }
  ByteReader r(payload);
  Result<Message> result = DecodeBody(type, r, payload.size(), context);
  if (!result.has_value()) return result;
  // Exact lengths were checked above, so a decoder that reads its layout
  // consumes the payload exactly; anything else is a bug in this file.
  if (r.truncated() || r.remaining() != 0) {
    return Error("{}: payload of {} bytes does not match its layout ({} bytes left over)",
                 MessageTypeName(type), payload.size(), r.remaining());
  }
  return result;
}

Result<PagesPrefix> DecodePagesFixed(std::span<const uint8_t, kPagesFixedSize> fixed,
                                     uint32_t frame_length, const DecodeContext& context) {
  ByteReader r(fixed);
  PagesPrefix p;
  p.block = r.U32();
  p.count = r.U32();
  p.pass = r.U32();
  p.flags = r.U32();
  ASSIGN_OR_RETURN(const BlockInfo* block, FindBlock("Pages", p.block, context));
  if (p.flags != 0) return Error("Pages: flags {:#x}; version 1 defines none", p.flags);
  if (p.count == 0 || p.count > kMaxPagesPerBatch) {
    return Error("Pages: {} pages in one batch (1 to {} allowed)", p.count, kMaxPagesPerBatch);
  }
  RETURN_IF_ERROR(CheckLength("Pages", kPagesFixedSize + p.index_bytes() + p.data_bytes(),
                              frame_length,
                              fmt::format("{} pages in block '{}'", p.count, block->name)));
  return p;
}

Result<PagesHeader> DecodePagesIndices(const PagesPrefix& prefix,
                                       std::span<const uint8_t> index_bytes,
                                       const DecodeContext& context) {
  ASSIGN_OR_RETURN(const BlockInfo* block, FindBlock("Pages", prefix.block, context));
  if (index_bytes.size() != prefix.index_bytes()) {
    return Error("Pages: index list of {} bytes for {} pages", index_bytes.size(), prefix.count);
  }
  ByteReader r(index_bytes);
  PagesHeader h;
  h.block = prefix.block;
  h.pass = prefix.pass;
  h.flags = prefix.flags;
  ASSIGN_OR_RETURN(h.pages, ReadIndices("Pages", r, prefix.count, *block));
  return h;
}

}  // namespace faultline::migration
