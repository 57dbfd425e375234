// The destination's protocol state machines. They decide whether a decoded
// message is acceptable here and now, and keep the counts that prove nothing
// was lost; they do no I/O and touch no guest memory, so every transition can
// be tested alone.
//
// SessionReceiver follows the main channel:
//
//   AwaitHello --Hello--> AwaitAuth --Auth--> Precopy      (auth negotiated)
//   AwaitHello --Hello--> Precopy                          (no auth)
//   Precopy --PassEnd(n = passes so far)--> Precopy
//   Precopy --Switchover(final_pass = passes so far)--> StopAndCopy
//   StopAndCopy --VcpuState / DeviceState--> StopAndCopy   (each one once)
//   StopAndCopy --Complete--> Complete   (all state received, every page
//                                         channel ended, page totals match)
//   any --Error--> Failed; any message not listed --> Failed
//
// ChannelReceiver follows one page channel, bound by
// SessionReceiver::BindChannel during the handshake:
//
//   Streaming(p) --Pages/ZeroPages(pass p)--> Streaming(p)
//   Streaming(p) --PassEnd(p, counts match)--> PassEnded(p)
//   PassEnded(p) --BeginNextPass()--> Streaming(p + 1)
//   Streaming(p) --ChannelEnd(p, counts match)--> Ended
//   any --Error--> Failed; anything else --> Failed
//
// PassEnded is the pass barrier: the destination engine calls BeginNextPass
// only once every page channel has ended pass p, so that no page of pass
// p + 1 is written before every page of pass p (a page re-sent in a later
// pass may travel on a different channel than its earlier copy).
//
// Threads: a SessionReceiver belongs to the main channel's thread; each
// ChannelReceiver to its page channel's thread. They share nothing mutable.
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "faultline/status.h"
#include "src/migration/auth.h"
#include "src/migration/wire.h"

namespace faultline::migration {

enum class ReceiverPhase { kAwaitHello, kAwaitAuth, kPrecopy, kStopAndCopy, kComplete, kFailed };
const char* PhaseName(ReceiverPhase phase);

struct ReceiverConfig {
  std::vector<BlockInfo> blocks;  // this destination's RAM blocks
  AuthKey key;                    // non-empty: authentication is required
  // Pre-copy alone by default; the post-copy destination adds its features.
  uint64_t features_supported = kFeatureAuth;
  uint16_t max_page_channels = kMaxPageChannels;
  uint32_t vcpus = 0;  // vCPUs the destination VM has; 0 accepts any count
  // The destination VM's accelerator: a source of another one is refused at
  // its Hello (kUnspecified on either side accepts).
  HelloAccel accel = HelloAccel::kUnspecified;
  // Not OK: this destination cannot take a migration as it is set up (say,
  // an installer its memory backing does not support). A source that is
  // otherwise accepted is refused at its Hello with this error (kFeatures),
  // before any page moves, so its guest keeps running there.
  Status refusal = Status::Ok();
};

// Page counts of one channel at its ChannelEnd.
struct ChannelTotals {
  uint32_t final_pass = 0;
  uint64_t data_pages = 0;
  uint64_t zero_pages = 0;
};

class SessionReceiver {
 public:
  // `nonce`: this destination's fresh nonce (RandomNonce()).
  SessionReceiver(ReceiverConfig config, const Nonce& nonce);

  // Checks `message` against the current phase and advances. On error the
  // receiver is Failed and the Status says what was wrong; an Error message
  // from the source comes back as an error Status quoting it.
  Status OnMessage(const Message& message);

  // Page channels, during the handshake (phase Precopy, before any page
  // channel streams): checks the session id, index, kind and proof.
  Result<ChannelAck> BindChannel(const ChannelHello& hello);
  bool all_channels_bound() const { return bound_.size() == hello_.page_channels; }
  // After channel `index` reached ChannelReceiver::Phase::kEnded.
  Status RecordChannelEnd(uint16_t index, const ChannelTotals& totals);

  // A local failure (e.g. guest memory could not be written).
  void Fail() { phase_ = ReceiverPhase::kFailed; }

  ReceiverPhase phase() const { return phase_; }
  const Hello& hello() const { return hello_; }  // valid after Hello
  const HelloAck& ack() const { return ack_; }   // the answer to send after Hello
  const Switchover& switchover() const { return switchover_; }
  const std::vector<BlockInfo>& blocks() const { return config_.blocks; }
  uint32_t passes() const { return passes_; }  // PassEnds seen on the main channel
  bool authenticated() const { return (ack_.features & kFeatureAuth) != 0; }
  // What kind of error the last failed OnMessage was, for the Error message
  // the destination sends back.
  ErrorCode error_code() const { return error_code_; }

 private:
  Status OnHello(const Hello& hello);
  Status OnAuth(const Auth& auth);
  Status OnPassEnd(const PassEnd& end);
  Status OnSwitchover(const Switchover& switchover);
  Status OnVcpuState(const VcpuStateMessage& state);
  Status OnDeviceState(const DeviceState& state);
  Status OnComplete(const Complete& complete);
  Status Reject(MessageType type) const;

  const ReceiverConfig config_;
  ReceiverPhase phase_ = ReceiverPhase::kAwaitHello;
  ErrorCode error_code_ = ErrorCode::kProtocol;
  Hello hello_;
  HelloAck ack_;
  uint32_t passes_ = 0;
  Switchover switchover_;
  std::set<uint32_t> vcpus_received_;
  std::set<std::string> devices_received_;
  std::set<uint16_t> bound_;
  std::vector<bool> ended_;  // by channel index
  ChannelTotals channel_sum_;
};

class ChannelReceiver {
 public:
  enum class Phase { kStreaming, kPassEnded, kEnded, kFailed };

  explicit ChannelReceiver(uint16_t index) : index_(index) {}

  // PagesHeader, ZeroPages, PassEnd, ChannelEnd or Error; anything else, or
  // any of them at the wrong time or with the wrong pass, fails the channel.
  Status OnMessage(const Message& message);
  // The barrier released: kPassEnded(p) -> kStreaming(p + 1).
  Status BeginNextPass();

  Phase phase() const { return phase_; }
  uint32_t pass() const { return pass_; }
  uint16_t index() const { return index_; }
  // Streaming, and nothing of the current pass arrived yet: a pass boundary
  // (where a post-copy Switchover may come).
  bool at_pass_start() const {
    return phase_ == Phase::kStreaming && pass_data_ == 0 && pass_zero_ == 0;
  }
  ChannelTotals totals() const { return {pass_, total_data_, total_zero_}; }

 private:
  Status Fail(Status status);

  const uint16_t index_;
  Phase phase_ = Phase::kStreaming;
  uint32_t pass_ = 0;
  uint64_t pass_data_ = 0;  // pages received in the current pass
  uint64_t pass_zero_ = 0;
  uint64_t total_data_ = 0;  // all passes
  uint64_t total_zero_ = 0;
};

}  // namespace faultline::migration
