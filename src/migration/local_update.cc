#include "src/migration/local_update.h"

#include <cerrno>
#include <utility>

namespace faultline::migration {
namespace {

using Clock = std::chrono::steady_clock;

std::chrono::microseconds Micros(Clock::duration d) {
  return std::chrono::duration_cast<std::chrono::microseconds>(d);
}

uint32_t AccelFlags(HelloAccel accel) { return static_cast<uint32_t>(accel); }

}  // namespace

Result<LocalMemory> LocalMemoryFor(SourceVm& vm) {
  LocalMemory memory = LocalMemory::kFds;
  for (const auto& block : vm.blocks()) {
    switch (block->backing()) {
      case Backing::kMemfd:
      case Backing::kHugetlb:
        break;
      case Backing::kAnonymous:
        memory = LocalMemory::kCopy;
        break;
      case Backing::kGuestMemfd:
        return Error(
            "RAM block '{}' is guest_memfd, which cannot move to another process: KVM binds a "
            "guest_memfd to the VM that created it, and this kernel cannot link it to a new "
            "VM; back the guest with --backing memfd or hugetlb to update it in place, or "
            "migrate it (faultline migrate without --local)",
            block->name());
    }
  }
  return memory;
}

LocalUpdateSource::LocalUpdateSource(SourceVm& vm, LocalUpdateOptions options)
    : vm_(vm), options_(options) {}

void LocalUpdateSource::Cancel() {
  cancelled_.store(true, std::memory_order_release);
  sys::MutexLock lock(mu_);
  if (channel_ != nullptr && phase() == Phase::kSetup) channel_->Shutdown();
}

Result<std::unique_ptr<Link>> LocalUpdateSource::Offer(Connector& connector, LocalMemory memory,
                                                       SwitchoverMode mode, uint32_t& fds_passed) {
  phase_.store(Phase::kSetup, std::memory_order_release);
  outcome_.store(SourceOutcome::kFailedRunning, std::memory_order_release);
  ASSIGN_OR_RETURN(std::unique_ptr<Channel> channel, connector.Connect());
  auto link = std::make_unique<Link>(std::move(channel));
  {
    sys::MutexLock lock(mu_);
    if (cancelled_.load(std::memory_order_acquire)) return Error("cancelled");
    channel_ = &link->channel();
  }
  Status offered = SendOffer(*link, memory, mode, fds_passed);
  if (!offered.ok()) {
    sys::MutexLock lock(mu_);
    channel_ = nullptr;  // before `link` goes: Cancel must not reach it
    return offered;
  }
  return link;
}

Status LocalUpdateSource::SendOffer(Link& link, LocalMemory memory, SwitchoverMode mode,
                                    uint32_t& fds_passed) {
  RETURN_IF_ERROR(link.channel().SetLowLatency(true));
  LocalOffer offer;
  offer.memory = memory;
  offer.mode = mode;
  offer.vcpu_count = vm_.vcpu_count();
  offer.hello_flags = AccelFlags(vm_.accelerator());
  std::vector<int> fds;
  for (const auto& block : vm_.blocks()) {
    offer.blocks.push_back(DescribeBlock(*block));
    if (memory == LocalMemory::kFds) fds.push_back(block->fd());
  }
  if (options_.withhold_fds) fds.clear();
  Status sent = link.writer().SendWithFds(offer, fds);
  if (!sent.ok()) {
    if (sent.code() == EPIPE || sent.code() == ECONNRESET) {
      return sent.WithContext(
          "sending the offer: the peer closed the connection at once; is it a Faultline "
          "destination (`faultline run --incoming unix:PATH`)?");
    }
    return sent.WithContext("sending the offer");
  }
  fds_passed = static_cast<uint32_t>(fds.size());
  // The destination creates its VM meanwhile; the guest runs on here. A
  // silent peer ends the wait after the I/O timeout (EAGAIN).
  Result<LocalReady> ready = Expect<LocalReady>(link.reader(), "the answer to the offer");
  return ready.has_value() ? Status::Ok() : ready.error();
}

Status LocalUpdateSource::OfferCopy(Connector& connector, SwitchoverMode mode) {
  uint32_t fds = 0;
  Result<std::unique_ptr<Link>> link = Offer(connector, LocalMemory::kCopy, mode, fds);
  {
    sys::MutexLock lock(mu_);
    channel_ = nullptr;
  }
  if (!link.has_value()) {
    phase_.store(Phase::kFailed, std::memory_order_release);
    return link.error().WithContext(connector.name());
  }
  return Status::Ok();
}

Result<LocalUpdateStats> LocalUpdateSource::Run(Connector& connector) {
  uint32_t fds_passed = 0;
  Result<std::unique_ptr<Link>> link =
      Offer(connector, LocalMemory::kFds, SwitchoverMode::kStopAndCopy, fds_passed);
  Result<LocalUpdateStats> result = Error("no link");
  if (!link.has_value()) {
    result = link.error();
  } else {
    result = Handover(**link);
    if (result.has_value()) {
      result->fds_passed = fds_passed;
      result->bytes_sent = (*link)->channel().stats().bytes_sent;
    }
  }
  {
    sys::MutexLock lock(mu_);
    channel_ = nullptr;
  }
  phase_.store(result.has_value() ? Phase::kCompleted : Phase::kFailed, std::memory_order_release);
  if (!result.has_value()) return result.error().WithContext(connector.name());
  return result;
}

Result<LocalUpdateStats> LocalUpdateSource::Handover(Link& link) {
  LocalUpdateStats stats;
  const Clock::time_point paused = Clock::now();
  {
    // Cancel shuts the channel only in setup; from here the exchange runs to
    // its end, which takes milliseconds or the I/O timeout.
    sys::MutexLock lock(mu_);
    if (cancelled_.load(std::memory_order_acquire)) return Error("cancelled");
    phase_.store(Phase::kPaused, std::memory_order_release);
  }
  vm_.Pause();
  const Clock::time_point stopped = Clock::now();
  // From here every failure before CompleteAck resumes the guest here.
  auto resume = [&](Status why) {
    link.channel().Shutdown();
    vm_.Resume();
    outcome_.store(SourceOutcome::kFailedResumed, std::memory_order_release);
    return why;
  };
  Result<std::vector<std::vector<uint8_t>>> vcpus = vm_.SaveVcpus();
  if (!vcpus.has_value()) return resume(vcpus.error().WithContext("saving the vCPU state"));
  Result<std::vector<DeviceBlob>> devices = vm_.SaveDevices();
  if (!devices.has_value()) return resume(devices.error().WithContext("saving the device state"));
  MessageWriter& writer = link.writer();
  for (uint32_t i = 0; i < vcpus->size(); ++i) {
    Status sent = writer.Send(VcpuStateMessage{i, std::move((*vcpus)[i])});
    if (!sent.ok()) return resume(sent);
  }
  for (DeviceBlob& d : *devices) {
    Status sent = writer.Send(DeviceState{d.name, std::move(d.state)});
    if (!sent.ok()) return resume(sent);
  }
  if (Status sent = writer.Send(Complete{0, 0, 0}); !sent.ok()) return resume(sent);
  const Clock::time_point state_sent = Clock::now();
  Result<CompleteAck> ack = Expect<CompleteAck>(link.reader(), "the confirmation");
  if (!ack.has_value() && (ack.error().code() == EAGAIN || ack.error().code() == ETIMEDOUT)) {
    // Alive but silent for the I/O timeout: it may or may not have started
    // the guest.
    link.channel().Shutdown();
    outcome_.store(SourceOutcome::kUnknownPaused, std::memory_order_release);
    return ack.error().WithContext(
        "the destination did not confirm after the state was sent; it may be running the "
        "guest, so the guest stays paused here");
  }
  if (!ack.has_value()) {
    return resume(ack.error().WithContext(
        "the destination did not confirm that it runs the guest; the guest was resumed here"));
  }
  // The destination runs the guest; the memory is its alone from now on.
  outcome_.store(SourceOutcome::kCompleted, std::memory_order_release);
  const Clock::time_point confirmed = Clock::now();
  stats.pause = Micros(confirmed - paused);
  stats.pause_stop = Micros(stopped - paused);
  stats.pause_state = Micros(state_sent - stopped);
  stats.pause_confirm = Micros(confirmed - state_sent);
  return stats;
}

Result<std::unique_ptr<LocalUpdateDestination>> LocalUpdateDestination::Accept(
    Acceptor& acceptor, std::chrono::milliseconds timeout) {
  ASSIGN_OR_RETURN(std::unique_ptr<Channel> channel, acceptor.Accept(timeout));
  std::unique_ptr<LocalUpdateDestination> d(new LocalUpdateDestination(std::move(channel)));
  RETURN_IF_ERROR(d->link_->channel().SetLowLatency(true));
  const std::string peer = d->peer();
  Result<Message> m = d->link_->reader().ReadWithFds(d->fds_, kMaxBlocks);
  if (!m.has_value()) {
    return m.error().WithContext(
        fmt::format("{}: reading the first message (is the peer a Faultline source?)", peer));
  }
  auto* offer = std::get_if<LocalOffer>(&*m);
  if (offer == nullptr) {
    Status why = Error(
        "{}: the first message is {}, not LocalOffer: a migration to a unix: address starts "
        "with an offer (docs/protocol.md section 11)",
        peer, MessageTypeName(TypeOf(*m)));
    return d->Refuse(why, ErrorCode::kProtocol);
  }
  d->offer_ = std::move(*offer);
  if (d->offer_.min_version > kMaxVersion || d->offer_.max_version < kMinVersion) {
    return d->Refuse(Error("{}: offer of protocol versions {}..{}, this end speaks {}..{}", peer,
                           d->offer_.min_version, d->offer_.max_version, kMinVersion, kMaxVersion),
                     ErrorCode::kVersion);
  }
  return d;
}

Status LocalUpdateDestination::Refuse(const Status& why, ErrorCode code) {
  ErrorMessage message{code, std::string(why.message().substr(0, kMaxErrorText))};
  (void)link_->writer().Send(message);  // best effort: it may be gone already
  link_->channel().Shutdown();
  return why;
}

Status LocalUpdateDestination::Ready() { return link_->writer().Send(LocalReady{}); }

Status LocalUpdateDestination::ReceiveState(DestinationVm& vm) {
  std::vector<std::vector<uint8_t>> vcpus(vm.vcpu_count());
  std::vector<bool> seen(vm.vcpu_count(), false);
  std::vector<DeviceBlob> devices;
  MessageReader& reader = link_->reader();
  while (true) {
    Result<Message> m = reader.Read();
    if (!m.has_value() && m.error().code() == EAGAIN) continue;
    if (!m.has_value()) return m.error().WithContext("receiving the guest's state");
    if (auto* e = std::get_if<ErrorMessage>(&*m)) return PeerError(*e);
    if (auto* v = std::get_if<VcpuStateMessage>(&*m)) {
      if (v->index >= vcpus.size() || seen[v->index]) {
        return Refuse(
            Error("state for vCPU {} (of {}) twice or out of range", v->index, vcpus.size()),
            ErrorCode::kProtocol);
      }
      seen[v->index] = true;
      vcpus[v->index] = std::move(v->state);
    } else if (auto* d = std::get_if<DeviceState>(&*m)) {
      if (devices.size() >= kMaxDevices) {
        return Refuse(Error("more than {} devices", kMaxDevices), ErrorCode::kProtocol);
      }
      devices.push_back(DeviceBlob{std::move(d->name), std::move(d->state)});
    } else if (std::holds_alternative<Complete>(*m)) {
      for (size_t i = 0; i < seen.size(); ++i) {
        if (!seen[i]) {
          return Refuse(Error("Complete without the state of vCPU {}", i), ErrorCode::kProtocol);
        }
      }
      Status loaded = vm.LoadVcpus(vcpus);
      if (loaded.ok()) loaded = vm.LoadDevices(devices);
      if (!loaded.ok()) {
        return Refuse(loaded.WithContext("loading the guest's state"), ErrorCode::kInternal);
      }
      // Queued on the socket before the guest starts here: the source then
      // learns of it even if this process dies at once (see the top).
      return link_->writer().Send(CompleteAck{0, 0, 0}).WithContext("confirming");
    } else {
      return Refuse(Error("unexpected {} in a local update's state", MessageTypeName(TypeOf(*m))),
                    ErrorCode::kProtocol);
    }
  }
}

Status CheckLocalOffer(const LocalOffer& offer, size_t fds, std::span<const BlockInfo> local,
                       uint32_t vcpus, HelloAccel accel) {
  RETURN_IF_ERROR(CheckBlocksMatch(offer.blocks, local)
                      .WithContext("start the destination with the source's --mem and --backing"));
  if (offer.memory == LocalMemory::kFds) {
    for (size_t i = 0; i < local.size(); ++i) {
      const BlockInfo& s = offer.blocks[i];
      if (s.backing != local[i].backing || s.page_size != local[i].page_size) {
        return Error(
            "RAM block '{}' is {} memory at the source and {} here: the passed memory is used "
            "as it is, so start the destination with --backing {}",
            local[i].name, BackingName(s.backing), BackingName(local[i].backing),
            BackingName(s.backing));
      }
    }
    if (fds != offer.blocks.size()) {
      return Error(
          "the offer passes RAM by descriptor but carried {} descriptor(s) for {} block(s): "
          "the memory cannot be mapped",
          fds, offer.blocks.size());
    }
  } else if (fds != 0) {
    return Error("a copying offer carried {} descriptor(s); it must carry none", fds);
  }
  if (offer.vcpu_count != vcpus) {
    return Error("the source's guest has {} vCPUs, this destination {}: start it with --vcpus {}",
                 offer.vcpu_count, vcpus, offer.vcpu_count);
  }
  return CheckLocalAccel(offer, accel);
}

Status CheckLocalAccel(const LocalOffer& offer, HelloAccel accel) {
  const auto source_accel = static_cast<HelloAccel>(offer.hello_flags & kHelloAccelMask);
  if (source_accel != HelloAccel::kUnspecified && accel != HelloAccel::kUnspecified &&
      source_accel != accel) {
    return Error(
        "the source runs the guest on {}, this destination on {}: vCPU state does not move "
        "between them; start it with --accel {}",
        HelloAccelName(source_accel), HelloAccelName(accel),
        source_accel == HelloAccel::kKvm ? "kvm" : "tcg");
  }
  return Status::Ok();
}

}  // namespace faultline::migration
