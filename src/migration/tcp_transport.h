// TCP transport: one TCP connection per channel. Every socket call of the
// migration module lives in tcp_transport.cc.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "src/migration/transport.h"
#include "src/sys/unique_fd.h"

namespace faultline::migration {

class TcpChannel final : public Channel {
 public:
  // Takes a connected socket; applies the I/O timeouts and buffer sizes.
  static Result<std::unique_ptr<TcpChannel>> Adopt(sys::UniqueFd fd,
                                                   const TransportOptions& options);
  ~TcpChannel() override;

  Status SendGather(std::span<const ConstBuffer> parts) override;
  Status ReceiveScatter(std::span<const MutableBuffer> parts) override;
  void Shutdown() override;
  Status SetLowLatency(bool low_latency) override;
  ChannelStats stats() const override;
  std::string name() const override { return name_; }

 private:
  TcpChannel(sys::UniqueFd fd, std::string name) : fd_(std::move(fd)), name_(std::move(name)) {}
  Status IoError(int error, const char* what, uint64_t done, uint64_t total) const;

  // Closed only by the destructor: Shutdown() from another thread must never
  // act on a descriptor number that was closed and reused meanwhile.
  const sys::UniqueFd fd_;
  const std::string name_;
  std::atomic<bool> shut_down_{false};
  // Relaxed counters: statistics, not synchronisation.
  std::atomic<uint64_t> bytes_sent_{0};
  std::atomic<uint64_t> bytes_received_{0};
  std::atomic<uint64_t> send_calls_{0};
  std::atomic<uint64_t> receive_calls_{0};
};

// Listens on a TCP address; each accepted connection is a channel.
class TcpListener final : public Acceptor {
 public:
  static Result<std::unique_ptr<TcpListener>> Listen(const Address& address,
                                                     const TransportOptions& options);

  Result<std::unique_ptr<Channel>> Accept(std::chrono::milliseconds timeout) override;
  // With the port actually bound (port 0 asks for any free one).
  std::string address() const override { return bound_.ToString(); }
  uint16_t port() const { return bound_.port; }

 private:
  TcpListener(sys::UniqueFd fd, Address bound, TransportOptions options)
      : fd_(std::move(fd)), bound_(std::move(bound)), options_(options) {}

  sys::UniqueFd fd_;
  Address bound_;
  TransportOptions options_;
};

// Connects a new TCP connection to the same address for each channel.
class TcpConnector final : public Connector {
 public:
  TcpConnector(Address address, TransportOptions options)
      : address_(std::move(address)), options_(options) {}
  Result<std::unique_ptr<Channel>> Connect() override;
  std::string name() const override { return address_.ToString(); }

 private:
  Address address_;
  TransportOptions options_;
};

}  // namespace faultline::migration
