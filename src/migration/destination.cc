#include "src/migration/destination.h"

#include <cerrno>
#include <memory>
#include <vector>

#include "src/migration/precopy_receiver.h"
#include "src/migration/receiver_state.h"

namespace faultline::migration {

using Clock = std::chrono::steady_clock;

// One run: the session's state on the main channel, the page channels'
// receivers, and the vCPU and device state as it arrives.
struct MigrationDestination::Incoming {
  Attempt& a;
  SessionReceiver& receiver;
  PrecopyTarget target;
  std::vector<std::unique_ptr<PrecopyReceiver>> channels;  // channels[c]: thread c's until it ends
  std::vector<std::vector<uint8_t>> vcpus;
  std::vector<DeviceBlob> devices;
};

MigrationDestination::MigrationDestination(DestinationVm& vm, DestinationOptions options)
    : vm_(vm), options_(std::move(options)) {}

Result<DestinationStats> MigrationDestination::Run(Acceptor& acceptor) {
  Attempt attempt(Attempt::Reporting::kTellPeer);
  {
    sys::MutexLock lock(mu_);
    if (active_ != nullptr) return Error("MigrationDestination::Run is already running");
    active_ = &attempt;
    if (cancelled_) attempt.Fail(Status(ECANCELED, "migration cancelled"), ErrorCode::kCancelled);
  }
  Result<DestinationStats> result = Receive(attempt, acceptor);
  sys::MutexLock lock(mu_);
  active_ = nullptr;
  return result;
}

void MigrationDestination::Cancel() {
  sys::MutexLock lock(mu_);
  cancelled_ = true;
  if (active_ != nullptr) {
    active_->Fail(Status(ECANCELED, "migration cancelled"), ErrorCode::kCancelled);
  }
}

Result<DestinationStats> MigrationDestination::Receive(Attempt& a, Acceptor& acceptor) {
  const auto start = Clock::now();
  const std::vector<std::shared_ptr<RamBlock>> blocks = vm_.blocks();
  ReceiverConfig config;
  for (const auto& b : blocks) config.blocks.push_back(DescribeBlock(*b));
  config.key = options_.key;
  config.max_page_channels = options_.max_page_channels;
  config.vcpus = vm_.vcpu_count();
  config.accel = vm_.accelerator();
  ASSIGN_OR_RETURN(Nonce nonce, RandomNonce());
  SessionReceiver receiver(std::move(config), nonce);
  ASSIGN_OR_RETURN(Session session, AcceptSession(acceptor, receiver, options_.accept));
  RETURN_IF_ERROR(a.Adopt(std::move(session)));

  Incoming in{a, receiver, {}, {}, {}, {}};
  for (const auto& b : blocks) in.target.blocks.push_back(b->host());
  in.target.skip_first_zeros = vm_.memory_is_zero();
  for (size_t c = 0; c < a.page_channels(); ++c) {
    in.channels.push_back(std::make_unique<PrecopyReceiver>(a, c, in.target));
  }
  a.StartChannels([&in](size_t c) { return in.channels[c]->Run().status(); });
  a.EndMain(FollowMain(in), receiver.error_code());
  a.Join();
  RETURN_IF_ERROR(a.error());

  DestinationStats stats;
  stats.passes = receiver.switchover().final_pass + 1;
  for (const auto& c : in.channels) {
    stats.data_pages += c->totals().data_pages;
    stats.zero_pages += c->totals().zero_pages;
  }
  stats.bytes_received = a.stats().bytes_received;
  stats.total = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start);
  return stats;
}

Status MigrationDestination::FollowMain(Incoming& in) {
  MessageReader& reader = in.a.main().reader();
  while (true) {
    Result<Message> m = reader.Read();
    if (!m && m.error().code() == EAGAIN) continue;  // pre-copy passes can be long
    if (!m) return m.error();
    if (std::holds_alternative<Complete>(*m)) RETURN_IF_ERROR(FinishChannels(in));
    if (const auto* e = std::get_if<ErrorMessage>(&*m)) {
      return in.a.FailByPeer(*e);  // the source gave up: nothing to tell it
    }
    RETURN_IF_ERROR(in.receiver.OnMessage(*m));
    if (const auto* s = std::get_if<Switchover>(&*m)) {
      in.vcpus.resize(s->vcpu_count);  // the VM's count, unless it takes any (checked)
    } else if (auto* v = std::get_if<VcpuStateMessage>(&*m)) {
      in.vcpus[v->index] = std::move(v->state);  // index < the Switchover's count, checked
    } else if (auto* d = std::get_if<DeviceState>(&*m)) {
      in.devices.push_back(DeviceBlob{std::move(d->name), std::move(d->state)});
    } else if (const auto* complete = std::get_if<Complete>(&*m)) {
      return LoadState(in, *complete);
    }
  }
}

// Every page must be in place before the guest can run: wait until each
// page channel has ended (its thread returns after ChannelEnd) and account
// for it. A source that sends Complete early gets a bounded wait.
Status MigrationDestination::FinishChannels(Incoming& in) {
  const size_t n = in.channels.size();
  if (!in.a.AwaitFor(Milestone::kChannelEnded, n, std::chrono::seconds(30))) {
    if (in.a.failed()) return in.a.error();
    return Error("Complete arrived, but {} of {} page channels have not ended within 30 s",
                 n - in.a.reached(Milestone::kChannelEnded), n);
  }
  for (size_t c = 0; c < n; ++c) {
    RETURN_IF_ERROR(
        in.receiver.RecordChannelEnd(static_cast<uint16_t>(c), in.channels[c]->totals()));
  }
  return Status::Ok();
}

// After Complete passed the session's checks: the state goes into the VM,
// and only then does CompleteAck tell the source that the guest runs here.
Status MigrationDestination::LoadState(Incoming& in, const Complete& complete) {
  Status loaded = vm_.LoadVcpus(in.vcpus);
  if (loaded.ok()) loaded = vm_.LoadDevices(in.devices);
  if (!loaded.ok()) {
    in.receiver.Fail();
    in.a.Fail(loaded.WithContext("loading the migrated state"), ErrorCode::kInternal);
    return loaded;
  }
  return in.a.SendMain(CompleteAck{complete.passes, complete.data_pages, complete.zero_pages});
}

}  // namespace faultline::migration
