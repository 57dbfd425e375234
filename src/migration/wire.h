// The migration wire format: message types, their payloads, limits, and the
// encoding and validating decoding of each. docs/protocol.md is the
// normative description (byte layouts, state machine, sequence diagrams);
// this file and wire.cc implement it and must stay in step with it.
//
// Every message is a 16-byte frame header followed by `length` payload
// bytes. All fields are little-endian at fixed offsets, encoded byte by byte
// (bytes.h), never by copying host structs. Every length, count and index
// read from the wire is checked against the limits below and against the
// session's block list before it is used; a violation is an error Status
// that says what was wrong, never undefined behaviour.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "faultline/ram_block.h"
#include "faultline/status.h"

namespace faultline::migration {

// ---- Constants and limits ---------------------------------------------------

inline constexpr size_t kFrameHeaderSize = 16;
inline constexpr uint16_t kFrameSync = 0x4c46;  // bytes 'F' 'L'
// "FLMIGRAT" read as a little-endian u64: opens Hello, HelloAck, ChannelHello.
inline constexpr uint64_t kStreamMagic = 0x5441524749'4d4c46;
inline constexpr uint16_t kMinVersion = 1;
inline constexpr uint16_t kMaxVersion = 1;

inline constexpr size_t kMaxBlocks = 64;
inline constexpr size_t kMaxNameLength = 64;  // block and device names, bytes
inline constexpr uint32_t kMaxPageChannels = 16;
// Every page on the wire is 4 KiB: page indices, zero runs and bitmaps count
// 4 KiB pages of a block whatever the block's own page size. KVM logs dirty
// memory per 4 KiB page, so pre-copy never resends 2 MiB for a 4 KiB write;
// a 2 MiB huge page (a post-copy fault on hugetlbfs) is 512 wire pages,
// exactly one full Pages message.
inline constexpr uint64_t kWirePageSize = 4096;
inline constexpr uint32_t kMaxPagesPerBatch = 512;
inline constexpr uint32_t kMaxZeroRuns = 1024;
inline constexpr uint32_t kMaxRequestPages = 512;
inline constexpr uint32_t kMaxBitmapPages = 1 << 20;  // one PresentBitmap message
inline constexpr uint32_t kMaxVcpus = 64;
inline constexpr uint32_t kMaxDevices = 64;
inline constexpr uint32_t kMaxStateBytes = 4 << 20;  // one vCPU's or device's state
inline constexpr uint32_t kMaxErrorText = 1024;
inline constexpr size_t kNonceSize = 32;
inline constexpr size_t kMacSize = 32;  // HMAC-SHA256

// Feature bits (Hello.features_offered / required, HelloAck.features).
inline constexpr uint64_t kFeatureAuth = 1u << 0;      // HMAC-SHA256 handshake + channel binding
inline constexpr uint64_t kFeaturePostcopy = 1u << 1;  // post-copy (postcopy_source.h)
inline constexpr uint64_t kFeatureRecovery = 1u << 2;  // Resume of a broken post-copy
inline constexpr uint64_t kFeatureFrameMac = 1u << 3;  // planned: a MAC on every frame
inline constexpr uint64_t kFeaturesImplemented = kFeatureAuth | kFeaturePostcopy | kFeatureRecovery;

using Nonce = std::array<uint8_t, kNonceSize>;
using Mac = std::array<uint8_t, kMacSize>;

enum class MessageType : uint8_t {
  kHello = 1,
  kHelloAck = 2,
  kAuth = 3,
  kChannelHello = 4,
  kChannelAck = 5,
  kPages = 6,
  kZeroPages = 7,
  kPassEnd = 8,
  kChannelEnd = 9,
  kSwitchover = 10,
  kVcpuState = 11,
  kDeviceState = 12,
  kComplete = 13,
  kCompleteAck = 14,
  kError = 15,
  kPageRequest = 16,    // post-copy: the destination asks for pages (priority channel)
  kPresentBitmap = 17,  // recovery: pages the destination has
  kDirtyPages = 18,     // post-copy switchover: pages dirtied since they were last sent
  kResume = 19,         // recovery: resume a broken post-copy on a new session
  kLocalOffer = 20,     // unix: first frame: how the guest's memory moves (section 11)
  kLocalReady = 21,     // unix: the destination accepted the offer
};
inline constexpr uint8_t kMaxMessageType = 21;

const char* MessageTypeName(MessageType type);  // "Hello", ... or "type 42"

enum class ChannelKind : uint8_t { kPage = 1, kPriority = 2 /* post-copy page requests */ };
enum class SwitchoverMode : uint32_t { kStopAndCopy = 0, kPostcopy = 1 };

enum class ErrorCode : uint32_t {
  kProtocol = 1,       // malformed or out-of-order message
  kVersion = 2,        // no common protocol version
  kFeatures = 3,       // a required feature is missing
  kAuth = 4,           // authentication failed
  kBlockMismatch = 5,  // RAM block lists differ
  kResource = 6,       // the peer ran out of something (memory, fds)
  kCancelled = 7,      // the operator or the engine gave up
  kInternal = 8,       // a bug or a local failure (e.g. loading vCPU state)
};

// ---- Frame header -----------------------------------------------------------

struct FrameHeader {
  MessageType type{};
  uint8_t flags = 0;    // no flags are defined in version 1; must be 0
  uint32_t length = 0;  // payload bytes after the header
  uint64_t seq = 0;     // per channel and direction, from 0, +1 per frame
};

void EncodeFrameHeader(const FrameHeader& header, std::span<uint8_t, kFrameHeaderSize> out);
// Checks sync, type, flags, and the length against the type's bounds
// (exact for fixed-size messages). The sequence number is the reader's.
Result<FrameHeader> DecodeFrameHeader(std::span<const uint8_t, kFrameHeaderSize> in);
// Largest payload a message of this type may have.
uint64_t MaxPayload(MessageType type);

// ---- RAM blocks -------------------------------------------------------------

struct BlockInfo {
  std::string name;
  uint64_t size = 0;                      // bytes
  uint64_t page_size = 4096;              // the block's own: 4 KiB or 2 MiB
  Backing backing = Backing::kAnonymous;  // informational; may differ between ends

  uint64_t pages() const { return size / kWirePageSize; }  // wire (4 KiB) pages
  friend bool operator==(const BlockInfo&, const BlockInfo&) = default;
};

BlockInfo DescribeBlock(const RamBlock& block);
// Names 1..64 printable ASCII bytes, unique; page size 4 KiB or 2 MiB; size a
// non-zero multiple of it with at most 2^32 - 1 pages; 1..kMaxBlocks blocks.
Status ValidateBlocks(std::span<const BlockInfo> blocks);
// The destination's check of the source's list against its own: same
// blocks in the same order with the same sizes (backing and page size may
// differ).
Status CheckBlocksMatch(std::span<const BlockInfo> source, std::span<const BlockInfo> local);

// ---- Messages ---------------------------------------------------------------

// The accelerator in Hello.hello_flags: vCPU state from one does not load
// on the other, so a destination refuses a source of another accelerator.
enum class HelloAccel : uint8_t { kUnspecified = 0, kKvm = 1, kTcg = 2 };
inline constexpr uint32_t kHelloAccelMask = 0xff;
const char* HelloAccelName(HelloAccel accel);  // "kvm", "tcg (the software CPU)", "unspecified"

struct Hello {
  uint16_t min_version = kMinVersion;
  uint16_t max_version = kMaxVersion;
  uint16_t page_channels = 1;
  uint64_t features_offered = 0;
  uint64_t features_required = 0;
  uint64_t session_id = 0;  // non-zero, chosen at random by the source
  // Bits 0..7: the accelerator whose vCPU state the source sends
  // (HelloAccel); 0 = not said. No other bits are defined.
  uint32_t hello_flags = 0;
  Nonce nonce{};
  std::vector<BlockInfo> blocks;
  friend bool operator==(const Hello&, const Hello&) = default;
};

struct HelloAck {
  uint16_t version = kMaxVersion;
  uint16_t page_channels = 1;
  uint64_t features = 0;
  uint64_t session_id = 0;
  Nonce nonce{};
  Mac mac{};  // zero unless kFeatureAuth was accepted
  friend bool operator==(const HelloAck&, const HelloAck&) = default;
};

struct Auth {
  Mac mac{};
  friend bool operator==(const Auth&, const Auth&) = default;
};

struct ChannelHello {
  uint64_t session_id = 0;
  uint16_t index = 0;
  ChannelKind kind = ChannelKind::kPage;
  Mac mac{};
  friend bool operator==(const ChannelHello&, const ChannelHello&) = default;
};

struct ChannelAck {
  uint64_t session_id = 0;
  uint16_t index = 0;
  ChannelKind kind = ChannelKind::kPage;
  friend bool operator==(const ChannelAck&, const ChannelAck&) = default;
};

// The part of a Pages message before the page data: what a receiver reads
// to learn where each page goes before it receives the data into place.
struct PagesHeader {
  uint32_t block = 0;
  uint32_t pass = 0;
  uint32_t flags = 0;           // none defined in version 1
  std::vector<uint32_t> pages;  // strictly increasing indices into the block
  friend bool operator==(const PagesHeader&, const PagesHeader&) = default;
};

struct PageRun {
  uint32_t first = 0;
  uint32_t count = 0;
  friend bool operator==(const PageRun&, const PageRun&) = default;
};

struct ZeroPages {
  uint32_t block = 0;
  uint32_t pass = 0;
  std::vector<PageRun> runs;  // sorted, disjoint, non-empty
  uint64_t page_count() const;
  friend bool operator==(const ZeroPages&, const ZeroPages&) = default;
};

struct PassEnd {
  uint32_t pass = 0;
  uint64_t data_pages = 0;  // sent in this pass (on this channel, or all: main)
  uint64_t zero_pages = 0;
  uint64_t dirty_remaining = 0;  // main channel: dirty pages left after the pass
  friend bool operator==(const PassEnd&, const PassEnd&) = default;
};

struct ChannelEnd {
  uint32_t pass = 0;        // the final pass, which this message also ends
  uint64_t data_pages = 0;  // in the final pass on this channel
  uint64_t zero_pages = 0;
  uint64_t total_data_pages = 0;  // on this channel, all passes
  uint64_t total_zero_pages = 0;
  friend bool operator==(const ChannelEnd&, const ChannelEnd&) = default;
};

struct Switchover {
  SwitchoverMode mode = SwitchoverMode::kStopAndCopy;
  uint32_t final_pass = 0;
  uint64_t dirty_pages = 0;
  uint32_t vcpu_count = 0;
  uint32_t device_count = 0;
  friend bool operator==(const Switchover&, const Switchover&) = default;
};

struct VcpuStateMessage {
  uint32_t index = 0;
  std::vector<uint8_t> state;  // VcpuState::Serialize(); opaque here
  friend bool operator==(const VcpuStateMessage&, const VcpuStateMessage&) = default;
};

struct DeviceState {
  std::string name;
  std::vector<uint8_t> state;
  friend bool operator==(const DeviceState&, const DeviceState&) = default;
};

struct Complete {
  uint32_t passes = 0;
  uint64_t data_pages = 0;
  uint64_t zero_pages = 0;
  friend bool operator==(const Complete&, const Complete&) = default;
};

struct CompleteAck {
  uint32_t passes = 0;
  uint64_t data_pages = 0;
  uint64_t zero_pages = 0;
  friend bool operator==(const CompleteAck&, const CompleteAck&) = default;
};

struct ErrorMessage {
  ErrorCode code = ErrorCode::kProtocol;
  std::string text;
  friend bool operator==(const ErrorMessage&, const ErrorMessage&) = default;
};

struct PageRequest {
  uint32_t block = 0;
  uint64_t request_id = 0;
  std::vector<uint32_t> pages;  // strictly increasing
  friend bool operator==(const PageRequest&, const PageRequest&) = default;
};

struct PresentBitmap {
  uint32_t block = 0;
  uint64_t first_page = 0;  // a multiple of 64
  uint32_t page_count = 0;
  std::vector<uint64_t> words;  // ceil(page_count / 64); bits past page_count zero
  friend bool operator==(const PresentBitmap&, const PresentBitmap&) = default;
};

// Same layout as PresentBitmap; the set bits are the pages the source's VM
// dirtied since they were last sent (their copies at the destination, if
// any, are stale). Sent at a post-copy switchover, before the vCPU state.
struct DirtyPages {
  uint32_t block = 0;
  uint64_t first_page = 0;  // a multiple of 64
  uint32_t page_count = 0;
  std::vector<uint64_t> words;
  friend bool operator==(const DirtyPages&, const DirtyPages&) = default;
};

// Recovery. The source opens a new session after a broken post-copy and
// sends Resume{the broken session's id, 0}; the destination answers with
// PresentBitmap messages (the pages it has) and then Resume{the same id,
// the number of pages it has}; its outstanding page requests follow on the
// new priority channel.
struct Resume {
  uint64_t session_id = 0;
  uint64_t pages = 0;
  friend bool operator==(const Resume&, const Resume&) = default;
};

// Local update (a unix: address; docs/protocol.md section 11). How the
// guest's memory moves: its RAM blocks' file descriptors are passed with
// the LocalOffer (SCM_RIGHTS, one per block, in block order) and nothing is
// copied; or, for memory that has no descriptor to pass (anonymous), it is
// copied by an ordinary migration on new connections to the same socket.
enum class LocalMemory : uint8_t { kFds = 1, kCopy = 2 };
const char* LocalMemoryName(LocalMemory memory);  // "fds", "copy"

// S->D, the first frame on a unix: socket.
struct LocalOffer {
  uint16_t min_version = kMinVersion;
  uint16_t max_version = kMaxVersion;
  LocalMemory memory = LocalMemory::kFds;
  SwitchoverMode mode = SwitchoverMode::kStopAndCopy;  // kCopy: pre-copy or post-copy
  uint32_t vcpu_count = 0;
  uint32_t hello_flags = 0;  // as in Hello: the accelerator in bits 0..7
  std::vector<BlockInfo> blocks;
  friend bool operator==(const LocalOffer&, const LocalOffer&) = default;
};

// D->S: the offer is accepted (kFds: the memory is mapped here and the
// destination waits for the vCPU and device state; kCopy: the migration's
// connections may follow). A refusal is an Error message instead.
struct LocalReady {
  uint16_t version = kMaxVersion;
  friend bool operator==(const LocalReady&, const LocalReady&) = default;
};

using Message = std::variant<Hello, HelloAck, Auth, ChannelHello, ChannelAck, PagesHeader,
                             ZeroPages, PassEnd, ChannelEnd, Switchover, VcpuStateMessage,
                             DeviceState, Complete, CompleteAck, ErrorMessage, PageRequest,
                             PresentBitmap, DirtyPages, Resume, LocalOffer, LocalReady>;

MessageType TypeOf(const Message& message);

// What a decoder checks indices against: the session's block list, known
// after the Hello. Null before it; page messages are then an error.
struct DecodeContext {
  const std::vector<BlockInfo>* blocks = nullptr;
};

// Appends `message`'s payload (for PagesHeader: the sub-header and index
// list, without page data) to `out`. Checks nothing: encoding our own
// message is not where bad input comes from; the peer's decoder checks.
void EncodePayload(const Message& message, std::vector<uint8_t>& out);

// The whole frame (header + payload) of a message other than PagesHeader.
std::vector<uint8_t> EncodeFrame(const Message& message, uint64_t seq);
// The frame header, sub-header and index list of a Pages message whose
// `pages.size() * kWirePageSize` data bytes follow.
std::vector<uint8_t> EncodePagesPrefix(const PagesHeader& header, uint64_t seq);

// Decodes and validates the payload of a message of type `type` (any type
// but kPages). `payload` is exactly the frame's payload.
Result<Message> DecodePayload(MessageType type, std::span<const uint8_t> payload,
                              const DecodeContext& context);

// Pages messages are decoded in two steps so that the data can be received
// straight into guest memory: the fixed 16-byte sub-header, then the index
// list. `frame_length` is the frame header's length.
inline constexpr size_t kPagesFixedSize = 16;
struct PagesPrefix {
  uint32_t block = 0;
  uint32_t count = 0;
  uint32_t pass = 0;
  uint32_t flags = 0;
  uint64_t index_bytes() const { return uint64_t{count} * 4; }
  uint64_t data_bytes() const { return uint64_t{count} * kWirePageSize; }
};
Result<PagesPrefix> DecodePagesFixed(std::span<const uint8_t, kPagesFixedSize> fixed,
                                     uint32_t frame_length, const DecodeContext& context);
Result<PagesHeader> DecodePagesIndices(const PagesPrefix& prefix,
                                       std::span<const uint8_t> index_bytes,
                                       const DecodeContext& context);

// A peer's text, made safe to print: control bytes and non-ASCII become '?'.
std::string Printable(std::string_view text);

}  // namespace faultline::migration
