#include "src/migration/fault_transport.h"

#include <algorithm>
#include <cerrno>

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
      : inner_(std::move(inner)), link_(std::move(link)) {
    link_->Register(this);
  }
  ~FaultyChannel() override { link_->Unregister(this); }

  Status SendGather(std::span<const ConstBuffer> parts) override {
    const uint64_t total = TotalSize(parts);
    const uint64_t allowed = link_->ReserveSend(total);
    if (allowed == total && !link_->cut()) return Wrapped(inner_->SendGather(parts));
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

  void Shutdown() override { inner_->Shutdown(); }
  Status SetLowLatency(bool low_latency) override { return inner_->SetLowLatency(low_latency); }
  ChannelStats stats() const override { return inner_->stats(); }
  std::string name() const override { return "faulty " + inner_->name(); }

  // Called by the controller with its mutex held.
  void ShutdownInner() { inner_->Shutdown(); }

 private:
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
};

std::shared_ptr<FaultController> FaultController::Create(FaultPlan plan) {
  return std::shared_ptr<FaultController>(new FaultController(plan));
}

std::unique_ptr<Channel> FaultController::Wrap(std::unique_ptr<Channel> inner) {
  return std::make_unique<FaultyChannel>(std::move(inner), shared_from_this());
}

void FaultController::Register(FaultyChannel* channel) {
  std::lock_guard lock(mu_);
  channels_.push_back(channel);
  if (cut_) channel->ShutdownInner();
}

void FaultController::Unregister(FaultyChannel* channel) {
  std::lock_guard lock(mu_);
  std::erase(channels_, channel);
}

void FaultController::Cut() {
  std::lock_guard lock(mu_);
  cut_ = true;
  // shutdown(2) does not block, so holding mu_ here is fine; it also keeps
  // every registered channel alive until it returns.
  for (FaultyChannel* channel : channels_) channel->ShutdownInner();
  cut_cv_.notify_all();
}

bool FaultController::cut() const {
  std::lock_guard lock(mu_);
  return cut_;
}

void FaultController::SetPlan(const FaultPlan& plan) {
  std::lock_guard lock(mu_);
  plan_ = plan;
}

uint64_t FaultController::bytes_sent() const {
  std::lock_guard lock(mu_);
  return sent_;
}

uint64_t FaultController::bytes_received() const {
  std::lock_guard lock(mu_);
  return received_;
}

uint64_t FaultController::ReserveSend(uint64_t bytes) {
  std::unique_lock lock(mu_);
  if (cut_) return 0;
  if (plan_.delay_per_send.count() > 0) {
    if (cut_cv_.wait_for(lock, plan_.delay_per_send, [&] { return cut_; })) return 0;
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
    if (cut_cv_.wait_until(lock, link_free_at_, [&] { return cut_; })) return 0;
  }
  return allowed;
}

void FaultController::RefundReceive(uint64_t bytes) {
  std::lock_guard lock(mu_);
  received_ -= std::min(received_, bytes);
}

uint64_t FaultController::ReserveReceive(uint64_t bytes) {
  std::lock_guard lock(mu_);
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
