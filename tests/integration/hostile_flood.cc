// The flood relay (hostile_flood.h). Every connection a source opens is
// relayed frame by frame to the destination. The first frame says what the
// channel is: the main channel's Hello gives the first block's size, and a
// ChannelHello of kind 2 marks a priority channel. Towards the source, a
// priority channel's frames are renumbered (`seq`) so that the injected
// PageRequests fit in: the source's reader sees one well-formed stream. The
// source's answers are counted and passed on to the destination, which must
// take pages it did not ask for in its stride (it already has most).
#include "tests/integration/hostile_flood.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <list>
#include <span>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "src/migration/wire.h"
#include "tests/integration/socket_io.h"

namespace faultline::migration {
namespace {

using Clock = std::chrono::steady_clock;
using itest::ReadAll;
using itest::WriteAll;

uint32_t GetU32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);  // little-endian host (x86-64), as the wire
  return v;
}

// One frame, header and payload, read whole. The relay checks nothing the
// endpoints check; it only needs the length to keep frames apart.
struct Frame {
  std::vector<uint8_t> bytes;
  uint8_t type() const { return bytes[2]; }
  std::span<const uint8_t> payload() const {
    return std::span<const uint8_t>(bytes).subspan(kFrameHeaderSize);
  }
  void Renumber(uint64_t seq) { std::memcpy(bytes.data() + 8, &seq, sizeof seq); }
};

bool ReadFrame(int fd, Frame& f) {
  f.bytes.resize(kFrameHeaderSize);
  if (!ReadAll(fd, f.bytes.data(), kFrameHeaderSize)) return false;
  const uint32_t length = GetU32(f.bytes.data() + 4);
  if (length > (4u << 20)) return false;  // no message is this long
  f.bytes.resize(kFrameHeaderSize + length);
  return ReadAll(fd, f.bytes.data() + kFrameHeaderSize, length);
}

struct Counters {
  std::atomic<uint64_t> connections{0}, priority_channels{0}, injected{0}, invalid{0};
  std::atomic<uint64_t> answers{0}, answered_pages{0}, open{0}, numbered{0};
  std::atomic<uint64_t> block_pages{0};  // the first block's, from the Hello
};

class Relay {
 public:
  Relay(int source, int destination, const FloodOptions& options, Counters& counters)
      : source_(source), destination_(destination), options_(options), counters_(counters) {}
  ~Relay() {
    close(source_);
    close(destination_);
  }

  void Run() {
    Frame first;
    if (ReadFrame(source_, first) && WriteAll(destination_, first.bytes)) {
      Classify(first);
      std::thread to_destination([this] {
        ToDestination();
        Hangup();
      });
      if (priority_) {
        FloodSource();
      } else {
        Copy(destination_, source_);
      }
      Hangup();
      to_destination.join();
    }
    counters_.open.fetch_sub(1);
  }

 private:
  void Classify(const Frame& first) {
    const auto type = static_cast<MessageType>(first.type());
    if (type == MessageType::kHello) {
      Result<Message> hello = DecodePayload(type, first.payload(), DecodeContext{});
      if (hello.has_value() && !std::get<Hello>(*hello).blocks.empty()) {
        counters_.block_pages.store(std::get<Hello>(*hello).blocks[0].pages());
      }
    } else if (type == MessageType::kChannelHello && first.payload().size() > 18) {
      priority_ = first.payload()[18] == static_cast<uint8_t>(ChannelKind::kPriority);
      if (priority_) counters_.priority_channels.fetch_add(1);
    }
  }

  void Hangup() {
    shutdown(source_, SHUT_RDWR);
    shutdown(destination_, SHUT_RDWR);
  }

  void Copy(int from, int to) {
    Frame f;
    while (ReadFrame(from, f) && WriteAll(to, f.bytes)) {
    }
  }

  // Source to destination; on a priority channel, counts the answers.
  void ToDestination() {
    Frame f;
    while (ReadFrame(source_, f)) {
      if (priority_ && static_cast<MessageType>(f.type()) == MessageType::kPages &&
          f.payload().size() >= 8) {
        counters_.answers.fetch_add(1);
        counters_.answered_pages.fetch_add(GetU32(f.payload().data() + 4));
      }
      if (!WriteAll(destination_, f.bytes)) return;
    }
  }

  // Destination to source on a priority channel: its ChannelAck, then the
  // destination's frames, renumbered, with the flood in between them (a
  // batch whenever the destination has nothing to send).
  void FloodSource() {
    uint64_t seq = 0;
    uint32_t left = options_.count;
    Frame f;
    bool acked = false;
    while (true) {
      pollfd p{destination_, POLLIN, 0};
      if (poll(&p, 1, acked && left > 0 ? 0 : -1) < 0) return;
      if (p.revents != 0) {
        if (!ReadFrame(destination_, f)) return;
        f.Renumber(seq++);
        if (!WriteAll(source_, f.bytes)) return;
        acked = true;
        continue;
      }
      std::vector<uint8_t> batch;
      const uint32_t n = std::min(left, 64u);
      uint32_t invalid = 0;
      for (uint32_t i = 0; i < n; ++i) {
        std::vector<uint8_t> frame = EncodeFrame(NextRequest(invalid), seq++);
        batch.insert(batch.end(), frame.begin(), frame.end());
      }
      if (!WriteAll(source_, batch)) return;
      counters_.injected.fetch_add(n);
      counters_.invalid.fetch_add(invalid);
      left -= n;
    }
  }

  // Nine in ten: --pages pages at a stride through the first block; the
  // tenth: one page past its end (counted in `invalid`).
  PageRequest NextRequest(uint32_t& invalid) {
    const uint64_t number = counters_.numbered.fetch_add(1);
    const uint64_t block_pages = std::max<uint64_t>(counters_.block_pages.load(), 1);
    PageRequest r;
    r.request_id = (uint64_t{1} << 63) | number;
    if (number % 10 == 9) {
      ++invalid;
      r.pages = {static_cast<uint32_t>(block_pages + number % 1000)};
      return r;
    }
    const uint64_t span = block_pages > options_.pages ? block_pages - options_.pages : 1;
    const uint64_t first = (number * 7919 * options_.pages) % span;
    for (uint32_t i = 0; i < options_.pages && first + i < block_pages; ++i) {
      r.pages.push_back(static_cast<uint32_t>(first + i));
    }
    return r;
  }

  const int source_, destination_;
  const FloodOptions options_;
  Counters& counters_;
  bool priority_ = false;
};

int Dial(const Address& to) {
  sockaddr_storage storage{};
  socklen_t length = 0;
  if (auto* v4 = reinterpret_cast<sockaddr_in*>(&storage);
      inet_pton(AF_INET, to.host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(to.port);
    length = sizeof *v4;
  } else if (auto* v6 = reinterpret_cast<sockaddr_in6*>(&storage);
             inet_pton(AF_INET6, to.host.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(to.port);
    length = sizeof *v6;
  } else {
    return -1;
  }
  int fd = socket(storage.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd >= 0 && connect(fd, reinterpret_cast<sockaddr*>(&storage), length) != 0) {
    close(fd);
    fd = -1;
  }
  return fd;
}

int Listen(uint16_t& port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof a;
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || listen(fd, 64) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &length) != 0) {
    if (fd >= 0) close(fd);
    return -1;
  }
  port = ntohs(a.sin_port);
  return fd;
}

}  // namespace

int RunFlood(const Address& to, const FloodOptions& options) {
  if (to.is_unix()) {
    fmt::print(stderr, "flood: --to must be a tcp: address\n");
    return 2;
  }
  uint16_t port = 0;
  const int listener = Listen(port);
  if (listener < 0) {
    fmt::print(stderr, "flood: cannot listen on 127.0.0.1: {}\n", std::strerror(errno));
    return 2;
  }
  fmt::print(stderr, "listening on tcp:127.0.0.1:{}\n", port);
  std::fflush(stderr);
  Counters counters;
  std::list<std::thread> relays;
  std::vector<int> fds;  // every relayed socket, to hang up at the deadline
  const auto deadline = Clock::now() + std::chrono::minutes(10);
  while (Clock::now() < deadline) {
    // Until the last relayed connection closes (the main channel lasts
    // the whole session).
    if (counters.connections.load() > 0 && counters.open.load() == 0) break;
    pollfd p{listener, POLLIN, 0};
    if (poll(&p, 1, 200) <= 0) continue;
    const int source = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (source < 0) continue;
    const int destination = Dial(to);
    if (destination < 0) {
      fmt::print(stderr, "flood: cannot reach {}: {}\n", to.ToString(), std::strerror(errno));
      close(source);
      continue;
    }
    counters.connections.fetch_add(1);
    counters.open.fetch_add(1);
    fds.insert(fds.end(), {source, destination});
    relays.emplace_back([source, destination, &options, &counters] {
      Relay(source, destination, options, counters).Run();
    });
  }
  close(listener);
  if (counters.open.load() > 0) {
    fmt::print(stderr, "flood: gave up after 10 minutes\n");
    for (int fd : fds) shutdown(fd, SHUT_RDWR);  // closed by their relays
  }
  for (std::thread& t : relays) t.join();
  const uint64_t channels = counters.priority_channels.load();
  fmt::print("{}\n", nlohmann::json{{"case", "flood"},
                                    {"connections", counters.connections.load()},
                                    {"priority_channels", channels},
                                    {"injected", counters.injected.load()},
                                    {"invalid", counters.invalid.load()},
                                    {"answers", counters.answers.load()},
                                    {"answered_pages", counters.answered_pages.load()}}
                         .dump());
  return channels > 0 && counters.injected.load() >= options.count ? 0 : 1;
}

}  // namespace faultline::migration
