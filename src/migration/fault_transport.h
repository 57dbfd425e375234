// A transport wrapper for tests: delays, throttles and cuts the channels of
// any other transport, on either side of a migration.
//
// A FaultController is one simulated link: every channel it wraps (through
// Wrap, a FaultyConnector or a FaultyAcceptor) shares its byte budget, its
// bandwidth and its fate. Cut() (or crossing cut_after_bytes) shuts down
// every channel of the link at once, the way a broken network path breaks
// all connections of a session, and leaves later Wrap()ed channels cut too.
//
// Delays and throttling happen in the sending thread before the bytes are
// handed to the wrapped channel; a Cut() wakes such a sleeping thread. The
// one-way latency is a delay line instead: the sender goes on at once and a
// thread of the channel hands each send's bytes on when they are due, so
// messages in flight overlap the way they do on a real link.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "src/migration/transport.h"
#include "src/sys/mutex.h"

namespace faultline::migration {

struct FaultPlan {
  // Each SendGather/Send call waits this long first (per message, since the
  // protocol sends one message per call), holding up every other sender on
  // the link meanwhile: a slow link, not a long one.
  std::chrono::microseconds delay_per_send{0};
  // Link latency: the bytes of each send reach the wrapped channel this long
  // after the send, which returns at once (order kept; at most a few MiB
  // wait per channel, beyond that the sender waits for room). Taken when a
  // channel is wrapped; SetPlan does not change channels already wrapped.
  std::chrono::microseconds one_way_delay{0};
  // Aggregate send bandwidth of the link, 0 for unlimited.
  uint64_t bytes_per_second = 0;
  // The link breaks once this many bytes were sent over all its channels:
  // the send that crosses the limit delivers the bytes up to it and fails.
  uint64_t cut_after_bytes_sent = std::numeric_limits<uint64_t>::max();
  // Likewise for bytes received through wrapped channels.
  uint64_t cut_after_bytes_received = std::numeric_limits<uint64_t>::max();
};

class FaultController : public std::enable_shared_from_this<FaultController> {
 public:
  static std::shared_ptr<FaultController> Create(FaultPlan plan = {});

  // Wraps `inner` so that it obeys this link's plan and cuts.
  std::unique_ptr<Channel> Wrap(std::unique_ptr<Channel> inner);

  // Breaks the link now: shuts every live wrapped channel down.
  void Cut();
  bool cut() const;
  // Replaces the plan; byte counts so far are kept.
  void SetPlan(const FaultPlan& plan);

  uint64_t bytes_sent() const;
  uint64_t bytes_received() const;
  std::chrono::microseconds one_way_delay() const;

  // Used by the wrapped channels (fault_transport.cc).
  class FaultyChannel;

 private:
  explicit FaultController(FaultPlan plan) : plan_(plan) {}
  friend class FaultyChannel;

  // Waits for delay and bandwidth, then reserves up to `bytes` of the send
  // budget. Returns how many bytes may go, or 0 and cut() when the link is
  // cut (then or while waiting).
  uint64_t ReserveSend(uint64_t bytes);
  uint64_t ReserveReceive(uint64_t bytes);
  void RefundReceive(uint64_t bytes);  // a receive that consumed nothing (EAGAIN)
  void Register(FaultyChannel* channel);
  void Unregister(FaultyChannel* channel);

  // Taken before each channel's line_mu_ (Cut shuts the channels down
  // under it).
  mutable sys::Mutex mu_;
  std::condition_variable cut_cv_;  // signalled by Cut(); wakes sleeping senders
  FaultPlan plan_ GUARDED_BY(mu_);
  bool cut_ GUARDED_BY(mu_) = false;
  uint64_t sent_ GUARDED_BY(mu_) = 0;
  uint64_t received_ GUARDED_BY(mu_) = 0;
  // When the simulated link is next free to carry bytes (throttling).
  std::chrono::steady_clock::time_point link_free_at_ GUARDED_BY(mu_){};
  std::vector<FaultyChannel*> channels_ GUARDED_BY(mu_);
};

class FaultyConnector final : public Connector {
 public:
  FaultyConnector(std::unique_ptr<Connector> inner, std::shared_ptr<FaultController> link)
      : inner_(std::move(inner)), link_(std::move(link)) {}
  Result<std::unique_ptr<Channel>> Connect() override;
  std::string name() const override { return "faulty " + inner_->name(); }

 private:
  std::unique_ptr<Connector> inner_;
  std::shared_ptr<FaultController> link_;
};

class FaultyAcceptor final : public Acceptor {
 public:
  FaultyAcceptor(std::unique_ptr<Acceptor> inner, std::shared_ptr<FaultController> link)
      : inner_(std::move(inner)), link_(std::move(link)) {}
  Result<std::unique_ptr<Channel>> Accept(std::chrono::milliseconds timeout) override;
  std::string address() const override { return inner_->address(); }

 private:
  std::unique_ptr<Acceptor> inner_;
  std::shared_ptr<FaultController> link_;
};

}  // namespace faultline::migration
