// Helpers shared by the migration unit tests: an in-memory channel, a
// loopback TCP pair, and a source/destination block list.
#pragma once

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "src/migration/socket_transport.h"
#include "src/migration/transport.h"
#include "src/migration/wire.h"

namespace faultline::migration::testing {

// Receives from a fixed byte string and records what is sent. Receiving
// past the end is end of stream (ECONNRESET), as on a socket.
class MemoryChannel final : public Channel {
 public:
  explicit MemoryChannel(std::vector<uint8_t> input = {}) : input_(std::move(input)) {}

  Status SendGather(std::span<const ConstBuffer> parts) override {
    for (const ConstBuffer& p : parts) output_.insert(output_.end(), p.begin(), p.end());
    return Status::Ok();
  }
  Status ReceiveScatter(std::span<const MutableBuffer> parts) override {
    for (const MutableBuffer& p : parts) {
      const size_t n = std::min(p.size(), input_.size() - pos_);
      if (n > 0) std::memcpy(p.data(), input_.data() + pos_, n);
      pos_ += n;
      if (n < p.size()) return Status(ECONNRESET, "memory channel: end of input");
    }
    return Status::Ok();
  }
  void Shutdown() override {}
  Status SetLowLatency(bool) override { return Status::Ok(); }
  ChannelStats stats() const override { return {output_.size(), pos_, 0, 0}; }
  std::string name() const override { return "memory"; }

  const std::vector<uint8_t>& output() const { return output_; }
  size_t consumed() const { return pos_; }

 private:
  std::vector<uint8_t> input_;
  size_t pos_ = 0;
  std::vector<uint8_t> output_;
};

inline std::vector<BlockInfo> TestBlocks() {
  return {BlockInfo{"ram0", 1ull << 30, 4096, Backing::kAnonymous},
          BlockInfo{"ram1", 64ull << 20, 2u << 20, Backing::kHugetlb}};
}

inline Address Loopback() { return Address{"tcp", "127.0.0.1", 0}; }

// A connected pair of TCP channels on 127.0.0.1.
struct TcpPair {
  std::unique_ptr<Channel> client;
  std::unique_ptr<Channel> server;
};

inline TcpPair MakeTcpPair(TransportOptions options = {}) {
  TcpPair pair;
  auto listener = SocketListener::Listen(Loopback(), options);
  EXPECT_TRUE(listener.has_value()) << listener.error().ToString();
  if (!listener) return pair;
  SocketConnector connector(Address{"tcp", "127.0.0.1", (*listener)->port()}, options);
  auto client = connector.Connect();
  EXPECT_TRUE(client.has_value()) << client.error().ToString();
  auto server = (*listener)->Accept(std::chrono::seconds(10));
  EXPECT_TRUE(server.has_value()) << server.error().ToString();
  if (client) pair.client = std::move(*client);
  if (server) pair.server = std::move(*server);
  return pair;
}

}  // namespace faultline::migration::testing
