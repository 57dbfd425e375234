#include "src/migration/fault_transport.h"

#include <sys/prctl.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <deque>
#include <thread>

#include "src/sys/sched.h"

namespace faultline::migration {
namespace {

// The first `bytes` bytes of `parts`.
template <typename Buffer>
std::vector<Buffer> Prefix(std::span<const Buffer> parts, uint64_t bytes) {
  std::vector<Buffer> out;
  for (const Buffer& p : parts) {
    if (bytes == 0) break;
    const uint64_t n = std::min<uint64_t>(bytes, p.size());
    out.push_back(p.first(n));
    bytes -= n;
  }
  return out;
}

template <typename Buffer>
uint64_t TotalSize(std::span<const Buffer> parts) {
  uint64_t total = 0;
  for (const Buffer& p : parts) total += p.size();
  return total;
}

}  // namespace

class FaultController::FaultyChannel final : public Channel {
 public:
  FaultyChannel(std::unique_ptr<Channel> inner, std::shared_ptr<FaultController> link)
      : inner_(std::move(inner)), link_(std::move(link)), delay_(link_->one_way_delay()) {
    link_->Register(this);
    if (delay_.count() > 0) forwarder_ = std::thread([this] { Forward(); });
  }
  ~FaultyChannel() override {
    if (forwarder_.joinable()) {
      {
        // What was sent still arrives (unless the link is cut or shut down).
        sys::MutexLock lock(line_mu_);
        room_cv_.wait(lock.native(), [&]() REQUIRES(line_mu_) {
          return line_.empty() || stop_ || !line_error_.ok();
        });
        stop_ = true;
      }
      due_cv_.notify_all();
      forwarder_.join();
    }
    link_->Unregister(this);
  }

  Status SendGather(std::span<const ConstBuffer> parts) override {
    const uint64_t total = TotalSize(parts);
    const uint64_t allowed = link_->ReserveSend(total);
    if (allowed == total && !link_->cut()) {
      return delay_.count() > 0 ? Delay(parts, total) : Wrapped(inner_->SendGather(parts));
    }
    if (allowed > 0 && !link_->cut()) {
      const auto prefix = Prefix(parts, allowed);
      (void)inner_->SendGather(prefix);  // the link breaks after these bytes either way
    }
    link_->Cut();
    return CutError("send", allowed, total);
  }

  Status ReceiveScatter(std::span<const MutableBuffer> parts) override {
    const uint64_t total = TotalSize(parts);
    const uint64_t allowed = link_->ReserveReceive(total);
    if (allowed == total && !link_->cut()) {
      Status status = inner_->ReceiveScatter(parts);
      if (status.code() == EAGAIN) link_->RefundReceive(total);  // nothing was consumed
      return Wrapped(std::move(status));
    }
    if (allowed > 0 && !link_->cut()) {
      const auto prefix = Prefix(parts, allowed);
      (void)inner_->ReceiveScatter(prefix);
    }
    link_->Cut();
    return CutError("receive", allowed, total);
  }

  void Shutdown() override {
    if (delay_.count() > 0) {
      // What was sent before still arrives, as the data in a socket's send
      // buffer does after shutdown(2); a cut (ShutdownInner) loses it.
      sys::MutexLock lock(line_mu_);
      closing_ = true;
      room_cv_.notify_all();
      room_cv_.wait_for(
          lock.native(), delay_ + std::chrono::milliseconds(100),
          [&]() REQUIRES(line_mu_) { return in_flight_ == 0 || stop_ || !line_error_.ok(); });
    }
    StopLine();
    inner_->Shutdown();
  }
  Status SetLowLatency(bool low_latency) override {
    low_latency_.store(low_latency, std::memory_order_relaxed);
    if (low_latency) due_cv_.notify_all();
    return inner_->SetLowLatency(low_latency);
  }
  ChannelStats stats() const override { return inner_->stats(); }
  std::string name() const override { return "faulty " + inner_->name(); }

  // Called by the controller with its mutex held.
  void ShutdownInner() {
    StopLine();
    inner_->Shutdown();
  }

 private:
  using Clock = std::chrono::steady_clock;
  static constexpr uint64_t kMaxInFlight = 8ull << 20;  // bytes waiting per channel
  struct InFlight {
    Clock::time_point due;
    std::vector<uint8_t> bytes;
  };

  // Queues a copy of `parts`, due after the delay.
  Status Delay(std::span<const ConstBuffer> parts, uint64_t total) {
    InFlight f{Clock::now() + delay_, std::vector<uint8_t>(total)};
    uint64_t at = 0;
    for (const ConstBuffer& p : parts) {
      if (!p.empty()) std::memcpy(f.bytes.data() + at, p.data(), p.size());
      at += p.size();
    }
    sys::MutexLock lock(line_mu_);
    room_cv_.wait(lock.native(), [&]() REQUIRES(line_mu_) {
      return stop_ || closing_ || !line_error_.ok() || in_flight_ + total <= kMaxInFlight ||
             line_.empty();
    });
    if (!line_error_.ok()) return line_error_;
    if (stop_ || closing_) {
      lock.Unlock();  // Wrapped takes the controller's mutex, which Cut() holds before line_mu_
      return Wrapped(Status(ESHUTDOWN, fmt::format("{}: channel shut down", name())));
    }
    in_flight_ += total;
    line_.push_back(std::move(f));
    lock.Unlock();
    due_cv_.notify_one();
    return Status::Ok();
  }

  // The delay line's thread: hands each send on when it is due.
  void Forward() {
    // Wake-ups within a microsecond or so of the due time, not the default
    // 50 us slack, which is longer than the delays this emulates.
    (void)prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    bool realtime = false;
    sys::MutexLock lock(line_mu_);
    while (true) {
      due_cv_.wait(lock.native(), [&]() REQUIRES(line_mu_) { return stop_ || !line_.empty(); });
      if (!realtime && low_latency_.load(std::memory_order_relaxed)) {
        // The wire of a request channel: its small messages should arrive
        // after the emulated latency, not after the host's scheduling delay
        // too (src/sys/sched.h; without permission, as before).
        realtime = true;
        (void)sys::SetRealtime(1);
      }
      if (stop_) return;
      const Clock::time_point due = line_.front().due;
      const auto stopped = [&]() REQUIRES(line_mu_) { return stop_; };
      if (due_cv_.wait_until(lock.native(), due, stopped)) return;
      InFlight f = std::move(line_.front());
      line_.pop_front();
      lock.Unlock();
      Status sent = Wrapped(inner_->SendGather(std::span<const ConstBuffer>(
          std::array<ConstBuffer, 1>{ConstBuffer(f.bytes.data(), f.bytes.size())})));
      lock.Lock();
      in_flight_ -= f.bytes.size();
      if (!sent.ok() && line_error_.ok()) line_error_ = std::move(sent);
      room_cv_.notify_all();
      if (!line_error_.ok()) return;
    }
  }

  // Bytes still in the line are lost, as on a cut link.
  void StopLine() {
    if (delay_.count() == 0) return;
    {
      sys::MutexLock lock(line_mu_);
      stop_ = true;
    }
    due_cv_.notify_all();
    room_cv_.notify_all();
  }

  // An error of the wrapped channel that the cut caused is reported as the cut.
  Status Wrapped(Status status) const {
    if (!status.ok() && link_->cut()) {
      return Status(ECONNABORTED, fmt::format("{}: link cut by the test transport ({})", name(),
                                              status.ToString()));
    }
    return status;
  }
  Status CutError(const char* what, uint64_t done, uint64_t total) const {
    return Status(
        ECONNABORTED,
        fmt::format("{}: link cut by the test transport during {} ({} of {} bytes "
                    "passed; {} sent and {} received on the link)",
                    name(), what, done, total, link_->bytes_sent(), link_->bytes_received()));
  }

  std::unique_ptr<Channel> inner_;
  std::shared_ptr<FaultController> link_;
  const std::chrono::microseconds delay_;
  std::atomic<bool> low_latency_{false};

  sys::Mutex line_mu_ ACQUIRED_AFTER(link_->mu_);
  std::condition_variable due_cv_;   // the forwarder waits for sends and due times
  std::condition_variable room_cv_;  // senders wait for room, the destructor for an empty line
  std::deque<InFlight> line_ GUARDED_BY(line_mu_);
  uint64_t in_flight_ GUARDED_BY(line_mu_) = 0;  // bytes in line_ and being handed on
  bool stop_ GUARDED_BY(line_mu_) = false;
  bool closing_ GUARDED_BY(line_mu_) = false;  // Shutdown() under way
  Status line_error_ GUARDED_BY(line_mu_);     // the wrapped channel's send failed
  std::thread forwarder_;
};

std::shared_ptr<FaultController> FaultController::Create(FaultPlan plan) {
  return std::shared_ptr<FaultController>(new FaultController(plan));
}

std::unique_ptr<Channel> FaultController::Wrap(std::unique_ptr<Channel> inner) {
  return std::make_unique<FaultyChannel>(std::move(inner), shared_from_this());
}

void FaultController::Register(FaultyChannel* channel) {
  sys::MutexLock lock(mu_);
  channels_.push_back(channel);
  if (cut_) channel->ShutdownInner();
}

void FaultController::Unregister(FaultyChannel* channel) {
  sys::MutexLock lock(mu_);
  std::erase(channels_, channel);
}

void FaultController::Cut() {
  sys::MutexLock lock(mu_);
  cut_ = true;
  // shutdown(2) does not block, so holding mu_ here is fine; it also keeps
  // every registered channel alive until it returns.
  for (FaultyChannel* channel : channels_) channel->ShutdownInner();
  cut_cv_.notify_all();
}

bool FaultController::cut() const {
  sys::MutexLock lock(mu_);
  return cut_;
}

void FaultController::SetPlan(const FaultPlan& plan) {
  sys::MutexLock lock(mu_);
  plan_ = plan;
}

uint64_t FaultController::bytes_sent() const {
  sys::MutexLock lock(mu_);
  return sent_;
}

uint64_t FaultController::bytes_received() const {
  sys::MutexLock lock(mu_);
  return received_;
}

std::chrono::microseconds FaultController::one_way_delay() const {
  sys::MutexLock lock(mu_);
  return plan_.one_way_delay;
}

uint64_t FaultController::ReserveSend(uint64_t bytes) {
  sys::MutexLock lock(mu_);
  if (cut_) return 0;
  const auto cut = [&]() REQUIRES(mu_) { return cut_; };
  if (plan_.delay_per_send.count() > 0) {
    if (cut_cv_.wait_for(lock.native(), plan_.delay_per_send, cut)) return 0;
  }
  const uint64_t allowed =
      std::min(bytes, plan_.cut_after_bytes_sent - std::min(sent_, plan_.cut_after_bytes_sent));
  sent_ += allowed;
  if (plan_.bytes_per_second > 0 && allowed > 0) {
    // The link carries one sender's bytes after another's: this send may go
    // once the link has carried everything reserved before it, plus its own
    // transfer time.
    const auto now = std::chrono::steady_clock::now();
    const auto transfer = std::chrono::nanoseconds(static_cast<int64_t>(
        static_cast<double>(allowed) * 1e9 / static_cast<double>(plan_.bytes_per_second)));
    link_free_at_ = std::max(now, link_free_at_) + transfer;
    if (cut_cv_.wait_until(lock.native(), link_free_at_, cut)) return 0;
  }
  return allowed;
}

void FaultController::RefundReceive(uint64_t bytes) {
  sys::MutexLock lock(mu_);
  received_ -= std::min(received_, bytes);
}

uint64_t FaultController::ReserveReceive(uint64_t bytes) {
  sys::MutexLock lock(mu_);
  if (cut_) return 0;
  const uint64_t limit = plan_.cut_after_bytes_received;
  const uint64_t allowed = std::min(bytes, limit - std::min(received_, limit));
  received_ += allowed;
  return allowed;
}

Result<std::unique_ptr<Channel>> FaultyConnector::Connect() {
  ASSIGN_OR_RETURN(auto channel, inner_->Connect());
  return link_->Wrap(std::move(channel));
}

Result<std::unique_ptr<Channel>> FaultyAcceptor::Accept(std::chrono::milliseconds timeout) {
  ASSIGN_OR_RETURN(auto channel, inner_->Accept(timeout));
  return link_->Wrap(std::move(channel));
}

}  // namespace faultline::migration
