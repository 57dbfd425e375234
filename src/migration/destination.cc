#include "src/migration/destination.h"

#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <optional>
#include <thread>

#include "src/migration/receiver_state.h"

namespace faultline::migration {
namespace {

using Clock = std::chrono::steady_clock;

// The pass barrier (see receiver_state.h): Arrive(p) returns once every
// party arrived for pass p, or false once cancelled.
class PassBarrier {
 public:
  explicit PassBarrier(size_t parties) : parties_(parties) {}

  bool Arrive(uint32_t pass) {
    std::unique_lock lock(mu_);
    if (arrived_.size() <= pass) arrived_.resize(pass + 1, 0);
    if (++arrived_[pass] == parties_) cv_.notify_all();
    cv_.wait(lock, [&] { return cancelled_ || arrived_[pass] == parties_; });
    return !cancelled_;
  }

  void Cancel() {
    std::lock_guard lock(mu_);
    cancelled_ = true;
    cv_.notify_all();
  }

 private:
  const size_t parties_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<size_t> arrived_;  // guarded by mu_; by pass
  bool cancelled_ = false;       // guarded by mu_
};

}  // namespace

class MigrationDestination::Attempt {
 public:
  explicit Attempt(MigrationDestination& owner) : o_(owner) {}

  Result<DestinationStats> Run(Acceptor& acceptor);

  // The first failure wins: it is what Run() returns and (unless the source
  // itself reported it) what the source is told in an Error message. Then
  // every channel is shut down and the barrier released, so that every
  // thread stops. Any thread.
  void Fail(Status status, ErrorCode code, bool tell_source);

 private:
  Status ReceiveChannel(size_t c);
  Status FollowMain(SessionReceiver& receiver);
  Status FinishChannels(SessionReceiver& receiver);
  void JoinChannels();

  MigrationDestination& o_;
  std::vector<std::shared_ptr<RamBlock>> blocks_;
  bool memory_zero_ = false;
  std::vector<ChannelReceiver> channels_;  // channels_[c]: thread c's until it ends
  std::vector<Status> results_;            // results_[c]: written by thread c
  std::vector<std::thread> threads_;
  std::vector<std::vector<uint8_t>> vcpus_;
  std::vector<DeviceBlob> devices_;

  std::mutex mu_;
  std::condition_variable ended_cv_;  // a channel thread ended
  size_t ended_ = 0;                  // guarded by mu_
  bool main_ended_ = false;           // guarded by mu_: FollowMain returned
  Session session_;  // assigned and Shutdown() under mu_; its links used without it
  std::unique_ptr<PassBarrier> barrier_;  // guarded by mu_; set before the threads start
  std::optional<Status> first_error_;     // guarded by mu_
  // Serialises writes to the main channel: CompleteAck from the main thread,
  // Error from whichever thread fails first.
  std::mutex main_write_mu_;
};

namespace {

// An error that follows from another one rather than explaining it: the
// peer closing a stream between messages, or a channel shut down here.
bool IsConsequence(const Status& status) {
  return status.code() == ECONNRESET || status.code() == ESHUTDOWN;
}

}  // namespace

void MigrationDestination::Attempt::Fail(Status status, ErrorCode code, bool tell_source) {
  // Read under mu_: a Cancel() during the handshake runs while Run() may be
  // assigning session_. Once set, session_ is not assigned again.
  Link* main = nullptr;
  {
    std::lock_guard lock(mu_);
    if (first_error_) {
      // A consequence (see IsConsequence) recorded first, e.g. the source
      // closing the main channel because a page channel broke: report the
      // error that says what went wrong.
      if (IsConsequence(*first_error_) && !IsConsequence(status)) first_error_ = status;
      return;
    }
    first_error_ = status;
    if (tell_source) main = session_.main.get();
  }
  if (main != nullptr) {
    std::lock_guard lock(main_write_mu_);
    (void)main->writer().Send(ErrorMessage{code, status.ToString()});
  }
  std::lock_guard lock(mu_);
  session_.Shutdown();
  if (barrier_) barrier_->Cancel();
}

Result<DestinationStats> MigrationDestination::Attempt::Run(Acceptor& acceptor) {
  const auto start = Clock::now();
  blocks_ = o_.vm_.blocks();
  memory_zero_ = o_.vm_.memory_is_zero();
  ReceiverConfig config;
  for (const auto& b : blocks_) config.blocks.push_back(DescribeBlock(*b));
  config.key = o_.options_.key;
  config.max_page_channels = o_.options_.max_page_channels;
  config.vcpus = o_.vm_.vcpu_count();
  config.accel = o_.vm_.accelerator();
  ASSIGN_OR_RETURN(Nonce nonce, RandomNonce());
  SessionReceiver receiver(std::move(config), nonce);
  ASSIGN_OR_RETURN(Session session, AcceptSession(acceptor, receiver, o_.options_.accept));

  const size_t n = session.pages.size();
  {
    std::lock_guard lock(mu_);
    session_ = std::move(session);
    barrier_ = std::make_unique<PassBarrier>(n);
    if (first_error_) return *first_error_;  // cancelled during the handshake
  }
  for (size_t c = 0; c < n; ++c) channels_.emplace_back(static_cast<uint16_t>(c));
  results_.resize(n);
  for (size_t c = 0; c < n; ++c) {
    threads_.emplace_back([this, c] {
      results_[c] = ReceiveChannel(c);
      if (!results_[c].ok() && IsConsequence(results_[c])) {
        // The source went away: it most likely said why on the main
        // channel. Let the main channel read that before this failure
        // shuts it down (and the reason with it).
        std::unique_lock lock(mu_);
        ended_cv_.wait_for(lock, std::chrono::seconds(1), [&] { return main_ended_; });
      }
      if (!results_[c].ok()) {
        Fail(results_[c].WithContext(fmt::format("page channel {}", c)), ErrorCode::kProtocol,
             true);
      }
      std::lock_guard lock(mu_);
      ++ended_;
      ended_cv_.notify_all();
    });
  }
  Status status = FollowMain(receiver);
  {
    std::lock_guard lock(mu_);
    main_ended_ = true;
    ended_cv_.notify_all();
  }
  if (!status.ok()) {
    if (status.code() == ECONNRESET) {
      // The source closed the main channel between messages: it gave up,
      // most likely because of what a page channel saw. Give the page
      // channels a moment to end on their own and say why, before shutting
      // them down here turns their reason into "shut down".
      std::unique_lock lock(mu_);
      ended_cv_.wait_for(lock, std::chrono::seconds(1), [&] { return ended_ == threads_.size(); });
    }
    Fail(status, receiver.error_code(), true);
  }
  JoinChannels();
  {
    std::lock_guard lock(mu_);
    if (first_error_) return *first_error_;
  }
  DestinationStats stats;
  stats.passes = receiver.switchover().final_pass + 1;
  for (const ChannelReceiver& c : channels_) {
    stats.data_pages += c.totals().data_pages;
    stats.zero_pages += c.totals().zero_pages;
  }
  stats.bytes_received = session_.stats().bytes_received;
  stats.total = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start);
  return stats;
}

Status MigrationDestination::Attempt::ReceiveChannel(size_t c) {
  Link& link = *session_.pages[c];
  ChannelReceiver& state = channels_[c];
  std::vector<MutableBuffer> destinations;
  while (state.phase() != ChannelReceiver::Phase::kEnded) {
    Result<Message> m = link.reader().Read();
    if (!m && m.error().code() == EAGAIN) continue;  // quiet, not cut: a cut ends in an error
    if (!m) return m.error();
    if (const auto* e = std::get_if<ErrorMessage>(&*m)) {
      Fail(PeerError(*e).WithContext(fmt::format("page channel {}", c)), e->code, false);
    }
    RETURN_IF_ERROR(state.OnMessage(*m));
    if (const auto* pages = std::get_if<PagesHeader>(&*m)) {
      // The decoder checked block and indices against the block list: every
      // destination lies inside the block's mapping.
      uint8_t* host = blocks_[pages->block]->host();
      destinations.clear();
      for (uint32_t p : pages->pages) {
        destinations.push_back(MutableBuffer(host + uint64_t{p} * kWirePageSize, kWirePageSize));
      }
      RETURN_IF_ERROR(link.reader().ReceivePageData(destinations));
    } else if (const auto* zeros = std::get_if<ZeroPages>(&*m)) {
      if (zeros->pass == 0 && memory_zero_) continue;  // already zero, and written at most once
      uint8_t* host = blocks_[zeros->block]->host();
      for (const PageRun& run : zeros->runs) {
        std::memset(host + uint64_t{run.first} * kWirePageSize, 0,
                    uint64_t{run.count} * kWirePageSize);
      }
    } else if (state.phase() == ChannelReceiver::Phase::kPassEnded) {
      if (!barrier_->Arrive(state.pass())) return Status(ECANCELED, "migration abandoned");
      RETURN_IF_ERROR(state.BeginNextPass());
    }
  }
  return Status::Ok();
}

Status MigrationDestination::Attempt::FollowMain(SessionReceiver& receiver) {
  MessageReader& reader = session_.main->reader();
  vcpus_.resize(o_.vm_.vcpu_count());
  while (true) {
    Result<Message> m = reader.Read();
    if (!m && m.error().code() == EAGAIN) continue;  // pre-copy passes can be long
    if (!m) return m.error();
    if (std::holds_alternative<Complete>(*m)) RETURN_IF_ERROR(FinishChannels(receiver));
    if (const auto* e = std::get_if<ErrorMessage>(&*m)) {
      Fail(PeerError(*e), e->code, false);  // the source gave up: nothing to tell it
    }
    RETURN_IF_ERROR(receiver.OnMessage(*m));
    if (auto* v = std::get_if<VcpuStateMessage>(&*m)) {
      vcpus_[v->index] = std::move(v->state);  // index < vcpu_count == vcpus_.size(), checked
    } else if (auto* d = std::get_if<DeviceState>(&*m)) {
      devices_.push_back(DeviceBlob{std::move(d->name), std::move(d->state)});
    } else if (const auto* complete = std::get_if<Complete>(&*m)) {
      Status loaded = o_.vm_.LoadVcpus(vcpus_);
      if (loaded.ok()) loaded = o_.vm_.LoadDevices(devices_);
      if (!loaded.ok()) {
        receiver.Fail();
        Fail(loaded.WithContext("loading the migrated state"), ErrorCode::kInternal, true);
        return loaded;
      }
      std::lock_guard lock(main_write_mu_);
      return session_.main->writer().Send(
          CompleteAck{complete->passes, complete->data_pages, complete->zero_pages});
    }
  }
}

// Every page must be in place before the guest can run: wait until each
// page channel has ended (its thread returns after ChannelEnd) and account
// for it. A source that sends Complete early gets a bounded wait.
Status MigrationDestination::Attempt::FinishChannels(SessionReceiver& receiver) {
  {
    std::unique_lock lock(mu_);
    if (!ended_cv_.wait_for(lock, std::chrono::seconds(30),
                            [&] { return ended_ == threads_.size(); })) {
      return Error("Complete arrived, but {} of {} page channels have not ended within 30 s",
                   threads_.size() - ended_, threads_.size());
    }
  }
  JoinChannels();
  for (size_t c = 0; c < channels_.size(); ++c) {
    RETURN_IF_ERROR(results_[c].WithContext(fmt::format("page channel {}", c)));
    RETURN_IF_ERROR(receiver.RecordChannelEnd(static_cast<uint16_t>(c), channels_[c].totals()));
  }
  return Status::Ok();
}

void MigrationDestination::Attempt::JoinChannels() {
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
}

MigrationDestination::MigrationDestination(DestinationVm& vm, DestinationOptions options)
    : vm_(vm), options_(std::move(options)) {}

Result<DestinationStats> MigrationDestination::Run(Acceptor& acceptor) {
  Attempt attempt(*this);
  {
    std::lock_guard lock(mu_);
    if (active_ != nullptr) return Error("MigrationDestination::Run is already running");
    active_ = &attempt;
    if (cancelled_)
      attempt.Fail(Status(ECANCELED, "migration cancelled"), ErrorCode::kCancelled, true);
  }
  Result<DestinationStats> result = attempt.Run(acceptor);
  std::lock_guard lock(mu_);
  active_ = nullptr;
  return result;
}

void MigrationDestination::Cancel() {
  std::lock_guard lock(mu_);
  cancelled_ = true;
  if (active_ != nullptr) {
    active_->Fail(Status(ECANCELED, "migration cancelled"), ErrorCode::kCancelled, true);
  }
}

}  // namespace faultline::migration
