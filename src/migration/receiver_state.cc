#include "src/migration/receiver_state.h"

#include <algorithm>

#include "src/migration/message_io.h"

namespace faultline::migration {

const char* PhaseName(ReceiverPhase phase) {
  switch (phase) {
    case ReceiverPhase::kAwaitHello:
      return "AwaitHello";
    case ReceiverPhase::kAwaitAuth:
      return "AwaitAuth";
    case ReceiverPhase::kPrecopy:
      return "Precopy";
    case ReceiverPhase::kStopAndCopy:
      return "StopAndCopy";
    case ReceiverPhase::kComplete:
      return "Complete";
    case ReceiverPhase::kFailed:
      return "Failed";
  }
  return "?";
}

namespace {

const char* Expected(ReceiverPhase phase) {
  switch (phase) {
    case ReceiverPhase::kAwaitHello:
      return "Hello";
    case ReceiverPhase::kAwaitAuth:
      return "Auth";
    case ReceiverPhase::kPrecopy:
      return "PassEnd or Switchover";
    case ReceiverPhase::kStopAndCopy:
      return "VcpuState, DeviceState or Complete";
    case ReceiverPhase::kComplete:
    case ReceiverPhase::kFailed:
      return "nothing more";
  }
  return "?";
}

}  // namespace

SessionReceiver::SessionReceiver(ReceiverConfig config, const Nonce& nonce)
    : config_(std::move(config)) {
  ack_.nonce = nonce;
}

Status SessionReceiver::Reject(MessageType type) const {
  return Error("{} not expected on the main channel in phase {} (expected {})",
               MessageTypeName(type), PhaseName(phase_), Expected(phase_));
}

Status SessionReceiver::OnMessage(const Message& message) {
  const MessageType type = TypeOf(message);
  if (phase_ == ReceiverPhase::kFailed) {
    return Error("{} after the session failed", MessageTypeName(type));
  }
  Status status;
  error_code_ = ErrorCode::kProtocol;  // unless a handler says otherwise
  if (const auto* e = std::get_if<ErrorMessage>(&message);
      e && phase_ != ReceiverPhase::kComplete) {
    status = PeerError(*e);
  } else if (const auto* m = std::get_if<Hello>(&message);
             m && phase_ == ReceiverPhase::kAwaitHello) {
    status = OnHello(*m);
  } else if (const auto* m = std::get_if<Auth>(&message);
             m && phase_ == ReceiverPhase::kAwaitAuth) {
    status = OnAuth(*m);
  } else if (const auto* m = std::get_if<PassEnd>(&message);
             m && phase_ == ReceiverPhase::kPrecopy) {
    status = OnPassEnd(*m);
  } else if (const auto* m = std::get_if<Switchover>(&message);
             m && phase_ == ReceiverPhase::kPrecopy) {
    status = OnSwitchover(*m);
  } else if (const auto* m = std::get_if<VcpuStateMessage>(&message);
             m && phase_ == ReceiverPhase::kStopAndCopy) {
    status = OnVcpuState(*m);
  } else if (const auto* m = std::get_if<DeviceState>(&message);
             m && phase_ == ReceiverPhase::kStopAndCopy) {
    status = OnDeviceState(*m);
  } else if (const auto* m = std::get_if<Complete>(&message);
             m && phase_ == ReceiverPhase::kStopAndCopy) {
    status = OnComplete(*m);
  } else {
    status = Reject(type);
  }
  if (!status.ok()) phase_ = ReceiverPhase::kFailed;
  return status;
}

Status SessionReceiver::OnHello(const Hello& hello) {
  const uint16_t low = std::max(hello.min_version, kMinVersion);
  const uint16_t high = std::min(hello.max_version, kMaxVersion);
  if (low > high) {
    error_code_ = ErrorCode::kVersion;
    return Error("no common protocol version: the source speaks {}..{}, this destination {}..{}",
                 hello.min_version, hello.max_version, kMinVersion, kMaxVersion);
  }
  uint64_t supported = config_.features_supported & kFeaturesImplemented;
  if (config_.key.empty()) supported &= ~kFeatureAuth;
  const uint64_t missing = hello.features_required & ~supported;
  if (missing != 0) {
    error_code_ = (missing & kFeatureAuth) ? ErrorCode::kAuth : ErrorCode::kFeatures;
    return Error("the source requires features {:#x} that this destination does not support{}",
                 missing,
                 (missing & kFeatureAuth) ? " (authentication: give the destination the key)" : "");
  }
  if (!config_.key.empty() && !(hello.features_offered & kFeatureAuth)) {
    error_code_ = ErrorCode::kAuth;
    return Error(
        "this destination requires authentication, and the source did not offer it "
        "(give the source the same key)");
  }
  if (hello.page_channels > config_.max_page_channels) {
    return Error("the source wants {} page channels; this destination allows {}",
                 hello.page_channels, config_.max_page_channels);
  }
  const auto source_accel = static_cast<HelloAccel>(hello.hello_flags & kHelloAccelMask);
  if (source_accel != HelloAccel::kUnspecified && config_.accel != HelloAccel::kUnspecified &&
      source_accel != config_.accel) {
    error_code_ = ErrorCode::kFeatures;
    return Error(
        "the source VM runs on {} and this destination on {}: vCPU state does not move between "
        "accelerators — start both ends with the same --accel",
        HelloAccelName(source_accel), HelloAccelName(config_.accel));
  }
  if (Status match = CheckBlocksMatch(hello.blocks, config_.blocks); !match.ok()) {
    error_code_ = ErrorCode::kBlockMismatch;
    return match;
  }
  if (!config_.refusal.ok()) {
    error_code_ = ErrorCode::kFeatures;
    return config_.refusal;
  }
  hello_ = hello;
  ack_.version = high;
  ack_.page_channels = hello.page_channels;
  ack_.features = hello.features_offered & supported;
  ack_.session_id = hello.session_id;
  ack_.mac.fill(0);
  if (authenticated()) ack_.mac = DestinationProof(config_.key, hello_, ack_);
  ended_.assign(hello.page_channels, false);
  phase_ = authenticated() ? ReceiverPhase::kAwaitAuth : ReceiverPhase::kPrecopy;
  return Status::Ok();
}

Status SessionReceiver::OnAuth(const Auth& auth) {
  if (!MacEqual(auth.mac, SourceProof(config_.key, hello_, ack_))) {
    error_code_ = ErrorCode::kAuth;
    return Error("authentication failed: the source's proof does not match (different keys?)");
  }
  phase_ = ReceiverPhase::kPrecopy;
  return Status::Ok();
}

Result<ChannelAck> SessionReceiver::BindChannel(const ChannelHello& hello) {
  if (phase_ != ReceiverPhase::kPrecopy) {
    return Error("ChannelHello in phase {}: channels are bound after the handshake",
                 PhaseName(phase_));
  }
  if (hello.session_id != hello_.session_id) {
    return Error("ChannelHello for session {:#x}, but this session is {:#x}", hello.session_id,
                 hello_.session_id);
  }
  if (hello.kind != ChannelKind::kPage) {
    return Error("ChannelHello: channel kind {} was not negotiated", static_cast<int>(hello.kind));
  }
  if (hello.index >= hello_.page_channels) {
    return Error("ChannelHello: page channel {} of {}", hello.index, hello_.page_channels);
  }
  if (authenticated() &&
      !MacEqual(hello.mac, ChannelProof(config_.key, hello.session_id, hello.index, hello.kind,
                                        hello_.nonce, ack_.nonce))) {
    return Error("ChannelHello: page channel {} failed authentication", hello.index);
  }
  if (!bound_.insert(hello.index).second) {
    return Error("ChannelHello: page channel {} is already bound", hello.index);
  }
  return ChannelAck{hello.session_id, hello.index, hello.kind};
}

Status SessionReceiver::OnPassEnd(const PassEnd& end) {
  if (end.pass != passes_) {
    return Error("PassEnd for pass {}, expected pass {}", end.pass, passes_);
  }
  ++passes_;
  return Status::Ok();
}

Status SessionReceiver::OnSwitchover(const Switchover& switchover) {
  if (switchover.mode != SwitchoverMode::kStopAndCopy) {
    return Error("Switchover: post-copy was not negotiated");
  }
  if (switchover.final_pass != passes_) {
    return Error("Switchover: final pass {}, but {} pre-copy passes ended", switchover.final_pass,
                 passes_);
  }
  if (config_.vcpus != 0 && switchover.vcpu_count != config_.vcpus) {
    return Error("Switchover: the source has {} vCPUs, this destination VM {}",
                 switchover.vcpu_count, config_.vcpus);
  }
  switchover_ = switchover;
  phase_ = ReceiverPhase::kStopAndCopy;
  return Status::Ok();
}

Status SessionReceiver::OnVcpuState(const VcpuStateMessage& state) {
  if (state.index >= switchover_.vcpu_count) {
    return Error("VcpuState for vCPU {}, but the source announced {} vCPUs", state.index,
                 switchover_.vcpu_count);
  }
  if (!vcpus_received_.insert(state.index).second) {
    return Error("VcpuState for vCPU {} received twice", state.index);
  }
  return Status::Ok();
}

Status SessionReceiver::OnDeviceState(const DeviceState& state) {
  if (devices_received_.size() >= switchover_.device_count) {
    return Error("DeviceState '{}': more than the {} devices announced", state.name,
                 switchover_.device_count);
  }
  if (!devices_received_.insert(state.name).second) {
    return Error("DeviceState '{}' received twice", state.name);
  }
  return Status::Ok();
}

Status SessionReceiver::RecordChannelEnd(uint16_t index, const ChannelTotals& totals) {
  if (index >= ended_.size() || !bound_.contains(index)) {
    return Error("page channel {} ended but was never bound", index);
  }
  if (ended_[index]) return Error("page channel {} ended twice", index);
  const bool first = std::none_of(ended_.begin(), ended_.end(), [](bool e) { return e; });
  if (!first && totals.final_pass != channel_sum_.final_pass) {
    return Error("page channel {} ended in pass {}, others in pass {}", index, totals.final_pass,
                 channel_sum_.final_pass);
  }
  ended_[index] = true;
  channel_sum_.final_pass = totals.final_pass;
  channel_sum_.data_pages += totals.data_pages;
  channel_sum_.zero_pages += totals.zero_pages;
  if (phase_ == ReceiverPhase::kStopAndCopy && totals.final_pass != switchover_.final_pass) {
    return Error("page channel {} ended in pass {}, but the final pass is {}", index,
                 totals.final_pass, switchover_.final_pass);
  }
  return Status::Ok();
}

Status SessionReceiver::OnComplete(const Complete& complete) {
  if (vcpus_received_.size() != switchover_.vcpu_count) {
    return Error("Complete after the state of {} of {} vCPUs", vcpus_received_.size(),
                 switchover_.vcpu_count);
  }
  if (devices_received_.size() != switchover_.device_count) {
    return Error("Complete after the state of {} of {} devices", devices_received_.size(),
                 switchover_.device_count);
  }
  const auto ended = std::count(ended_.begin(), ended_.end(), true);
  if (ended != static_cast<long>(ended_.size())) {
    return Error("Complete while {} of {} page channels have not ended",
                 static_cast<long>(ended_.size()) - ended, ended_.size());
  }
  if (channel_sum_.final_pass != switchover_.final_pass) {
    return Error("page channels ended in pass {}, but the final pass is {}",
                 channel_sum_.final_pass, switchover_.final_pass);
  }
  if (complete.passes != switchover_.final_pass + 1) {
    return Error("Complete: {} passes, but the final pass was {}", complete.passes,
                 switchover_.final_pass);
  }
  if (complete.data_pages != channel_sum_.data_pages ||
      complete.zero_pages != channel_sum_.zero_pages) {
    return Error("Complete: the source sent {} data and {} zero pages; {} and {} arrived",
                 complete.data_pages, complete.zero_pages, channel_sum_.data_pages,
                 channel_sum_.zero_pages);
  }
  phase_ = ReceiverPhase::kComplete;
  return Status::Ok();
}

Status ChannelReceiver::Fail(Status status) {
  phase_ = Phase::kFailed;
  return std::move(status).WithContext(fmt::format("page channel {}", index_));
}

Status ChannelReceiver::OnMessage(const Message& message) {
  const MessageType type = TypeOf(message);
  if (phase_ == Phase::kFailed)
    return Fail(Error("{} after the channel failed", MessageTypeName(type)));
  if (const auto* e = std::get_if<ErrorMessage>(&message)) return Fail(PeerError(*e));
  if (phase_ != Phase::kStreaming) {
    return Fail(Error("{} after {}", MessageTypeName(type),
                      phase_ == Phase::kEnded
                          ? "ChannelEnd"
                          : fmt::format("PassEnd({}) before the next pass began", pass_)));
  }
  auto check_pass = [&](uint32_t pass) -> Status {
    if (pass == pass_) return Status::Ok();
    return Error("{} for pass {} while in pass {}", MessageTypeName(type), pass, pass_);
  };
  auto check_counts = [&](uint64_t data, uint64_t zero) -> Status {
    if (data == pass_data_ && zero == pass_zero_) return Status::Ok();
    return Error("{} of pass {} counts {} data and {} zero pages; {} and {} arrived",
                 MessageTypeName(type), pass_, data, zero, pass_data_, pass_zero_);
  };
  Status status;
  if (const auto* m = std::get_if<PagesHeader>(&message)) {
    status = check_pass(m->pass);
    pass_data_ += m->pages.size();
    total_data_ += m->pages.size();
  } else if (const auto* m = std::get_if<ZeroPages>(&message)) {
    status = check_pass(m->pass);
    pass_zero_ += m->page_count();
    total_zero_ += m->page_count();
  } else if (const auto* m = std::get_if<PassEnd>(&message)) {
    status = check_pass(m->pass);
    if (status.ok()) status = check_counts(m->data_pages, m->zero_pages);
    if (status.ok()) phase_ = Phase::kPassEnded;
  } else if (const auto* m = std::get_if<ChannelEnd>(&message)) {
    status = check_pass(m->pass);
    if (status.ok()) status = check_counts(m->data_pages, m->zero_pages);
    if (status.ok() && (m->total_data_pages != total_data_ || m->total_zero_pages != total_zero_)) {
      status = Error("ChannelEnd counts {} data and {} zero pages in all; {} and {} arrived",
                     m->total_data_pages, m->total_zero_pages, total_data_, total_zero_);
    }
    if (status.ok()) phase_ = Phase::kEnded;
  } else {
    status = Error("{} not expected on a page channel", MessageTypeName(type));
  }
  if (!status.ok()) return Fail(std::move(status));
  return Status::Ok();
}

Status ChannelReceiver::BeginNextPass() {
  if (phase_ != Phase::kPassEnded) {
    return Fail(Error("BeginNextPass in pass {} before its PassEnd", pass_));
  }
  ++pass_;
  pass_data_ = 0;
  pass_zero_ = 0;
  phase_ = Phase::kStreaming;
  return Status::Ok();
}

}  // namespace faultline::migration
