// Sizes of the fixed parts of each message's payload and the bounds on each
// payload's length, shared by the encoder (wire.cc) and the decoder
// (wire_decode.cc). docs/protocol.md gives the same numbers as byte layouts.
#pragma once

#include <cstdint>

#include "faultline/ram_block.h"
#include "src/migration/wire.h"

namespace faultline::migration::internal {

inline constexpr uint32_t kHelloFixed = 80;
inline constexpr uint32_t kBlockEntry = 80;
inline constexpr uint32_t kHelloAckSize = 96;
inline constexpr uint32_t kAuthSize = kMacSize;
inline constexpr uint32_t kChannelHelloSize = 56;
inline constexpr uint32_t kChannelAckSize = 16;
inline constexpr uint32_t kZeroPagesFixed = 16;
inline constexpr uint32_t kPassEndSize = 32;
inline constexpr uint32_t kChannelEndSize = 40;
inline constexpr uint32_t kSwitchoverSize = 24;
inline constexpr uint32_t kStateFixed = 8;   // VcpuState and DeviceState
inline constexpr uint32_t kTotalsSize = 24;  // Complete and CompleteAck
inline constexpr uint32_t kErrorFixed = 8;
inline constexpr uint32_t kPageRequestFixed = 16;
inline constexpr uint32_t kPresentBitmapFixed = 24;  // and DirtyPages
inline constexpr uint32_t kResumeSize = 24;
inline constexpr uint32_t kLocalOfferFixed = 32;
inline constexpr uint32_t kLocalReadySize = 16;

struct Bounds {
  uint64_t min = 0;
  uint64_t max = 0;
};

// Inclusive bounds on a payload's length; min == max for fixed-size
// messages. Every max fits comfortably in the frame's u32 length.
constexpr Bounds PayloadBounds(MessageType type) {
  switch (type) {
    case MessageType::kHello:
      return {kHelloFixed + kBlockEntry, kHelloFixed + kBlockEntry * kMaxBlocks};
    case MessageType::kHelloAck:
      return {kHelloAckSize, kHelloAckSize};
    case MessageType::kAuth:
      return {kAuthSize, kAuthSize};
    case MessageType::kChannelHello:
      return {kChannelHelloSize, kChannelHelloSize};
    case MessageType::kChannelAck:
      return {kChannelAckSize, kChannelAckSize};
    case MessageType::kPages:
      // At least one 4 KiB page; at most the largest index list plus data.
      return {kPagesFixedSize + 4 + 4096,
              (4 + kWirePageSize) * kMaxPagesPerBatch + kPagesFixedSize};
    case MessageType::kZeroPages:
      return {kZeroPagesFixed + 8, kZeroPagesFixed + 8 * kMaxZeroRuns};
    case MessageType::kPassEnd:
      return {kPassEndSize, kPassEndSize};
    case MessageType::kChannelEnd:
      return {kChannelEndSize, kChannelEndSize};
    case MessageType::kSwitchover:
      return {kSwitchoverSize, kSwitchoverSize};
    case MessageType::kVcpuState:
      return {kStateFixed + 1, kStateFixed + kMaxStateBytes};
    case MessageType::kDeviceState:
      return {kStateFixed + 1, kStateFixed + kMaxNameLength + kMaxStateBytes};
    case MessageType::kComplete:
    case MessageType::kCompleteAck:
      return {kTotalsSize, kTotalsSize};
    case MessageType::kError:
      return {kErrorFixed, kErrorFixed + kMaxErrorText};
    case MessageType::kPageRequest:
      return {kPageRequestFixed + 4, kPageRequestFixed + 4 * kMaxRequestPages};
    case MessageType::kPresentBitmap:
    case MessageType::kDirtyPages:
      return {kPresentBitmapFixed + 8, kPresentBitmapFixed + kMaxBitmapPages / 8};
    case MessageType::kResume:
      return {kResumeSize, kResumeSize};
    case MessageType::kLocalOffer:
      return {kLocalOfferFixed + kBlockEntry, kLocalOfferFixed + kBlockEntry * kMaxBlocks};
    case MessageType::kLocalReady:
      return {kLocalReadySize, kLocalReadySize};
  }
  return {1, 0};  // unknown types: no length is valid
}

static_assert(PayloadBounds(MessageType::kPages).max < (uint64_t{1} << 31));

constexpr uint8_t BackingCode(Backing backing) {
  switch (backing) {
    case Backing::kAnonymous:
      return 0;
    case Backing::kMemfd:
      return 1;
    case Backing::kHugetlb:
      return 2;
    case Backing::kGuestMemfd:
      return 3;
  }
  return 0xff;
}

}  // namespace faultline::migration::internal
