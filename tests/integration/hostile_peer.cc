// faultline_hostile_peer: a deliberately malicious migration peer, for
// the tests of refusals and bounds (Firecracker ships a malicious_handler
// for the same reason). It speaks to a destination (`faultline run
// --incoming tcp:...`, `serve-pages --from`) the way an attacker on the
// network would, and reports whether each of its connections was refused;
// or (`flood`) it sits on the path between a source and its destination and
// floods the source with page requests.
//
//   faultline_hostile_peer --to tcp:HOST:PORT CASE [--tls-dir DIR] [--count N]
//                          [--hold-ms MS] [--bytes N] [--file FILE] [--pages N]
//
// CASE:
//   hello      a well-formed Hello (a plaintext source, or with --tls-dir a
//              TLS source with DIR's certificate), then waits for the answer
//   replay     the bytes of --file (a recorded handshake), then waits
//   oversized  a Hello frame header announcing 4 GiB - 1 of payload
//   truncated  the first half of a well-formed Hello, then half-closes
//   garbage    --bytes random bytes (default 4096)
//   silent     --count connections (default 1) that send nothing, held for
//              --hold-ms (default 3000); reports how many the peer closed
//   flood      a relay: listens on 127.0.0.1 (prints "listening on
//              tcp:127.0.0.1:PORT" on stderr) for a source's channels and
//              relays each to --to; into each priority channel it injects
//              --count page requests (default 1000) towards the source:
//              nine in ten ask for --pages pages (default 64) spread over the
//              first block, one in ten for a page past its end. Plaintext
//              only (TLS leaves an on-path attacker nothing to inject
//              into); see hostile_flood.cc
//
// Prints one JSON object: {"case", "connections", "refused", "answers"}
// where `answers` says what each connection heard (an Error's text, "closed",
// "HelloAck: accepted", "no answer"). Exit status: 0 when every connection
// was refused (closed, reset, or answered with an Error, or failed its TLS
// handshake; `truncated` hangs up itself, and counts as refused: what the
// peer made of it shows on its side), 1 when one was not, 2 on a usage
// error. The flood's report and exit status: hostile_flood.h.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "src/migration/message_io.h"
#include "src/migration/tls_transport.h"
#include "src/migration/transport.h"
#include "src/migration/wire.h"
#include "tests/integration/hostile_flood.h"

namespace faultline::migration {
namespace {

struct Options {
  std::string to;
  std::string kase;
  std::string tls_dir;
  std::string file;
  int count = 0;  // 0: the case's default
  int hold_ms = 3000;
  size_t bytes = 4096;
  uint32_t pages = 64;
};

// What the peer did with one connection.
struct Outcome {
  bool refused = false;
  std::string answer;
};

std::vector<uint8_t> HelloBytes() {
  Hello hello;
  hello.session_id = std::random_device()() | 1;
  hello.blocks = {BlockInfo{"ram", 128ull << 20, 4096, Backing::kAnonymous}};
  return EncodeFrame(hello, 0);
}

std::vector<uint8_t> Payload(const Options& o) {
  if (o.kase == "hello") return HelloBytes();
  if (o.kase == "truncated") {
    std::vector<uint8_t> hello = HelloBytes();
    hello.resize(hello.size() / 2);
    return hello;
  }
  if (o.kase == "oversized") {
    std::vector<uint8_t> header(kFrameHeaderSize + 64, 0);
    EncodeFrameHeader(FrameHeader{MessageType::kHello, 0, 0xFFFFFFFFu, 0},
                      std::span<uint8_t, kFrameHeaderSize>(header.data(), kFrameHeaderSize));
    return header;
  }
  if (o.kase == "garbage") {
    std::mt19937_64 random(std::random_device{}());
    std::vector<uint8_t> bytes(o.bytes);
    for (uint8_t& b : bytes) b = static_cast<uint8_t>(random());
    return bytes;
  }
  std::ifstream in(o.file, std::ios::binary);  // replay
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

// Sends `bytes`, then reads what the peer answers (within the I/O timeout).
// `hang_up`: closes instead of listening (a truncated frame: what the peer
// makes of it shows on the peer's side only).
Outcome SendAndListen(Channel& channel, const std::vector<uint8_t>& bytes, bool hang_up) {
  if (Status sent = channel.Send(bytes); !sent.ok()) return {true, sent.ToString()};
  if (hang_up) {
    channel.Shutdown();
    return {true, fmt::format("sent {} bytes, then hung up mid-frame", bytes.size())};
  }
  MessageReader reader(channel);
  Result<Message> answer = reader.Read();
  if (!answer.has_value()) {
    const int code = answer.error().code();
    if (code == EAGAIN || code == ETIMEDOUT) return {false, "no answer"};
    return {true, answer.error().ToString()};
  }
  if (const auto* error = std::get_if<ErrorMessage>(&*answer)) return {true, error->text};
  return {false, fmt::format("{}: accepted", MessageTypeName(TypeOf(*answer)))};
}

// --count connections that say nothing; the ones the peer closed.
std::vector<Outcome> Silent(Connector& connector, const Options& o) {
  std::vector<std::unique_ptr<Channel>> held;
  std::vector<Outcome> outcomes;
  for (int i = 0; i < std::max(o.count, 1); ++i) {
    Result<std::unique_ptr<Channel>> c = connector.Connect();
    if (c.has_value()) {
      held.push_back(std::move(*c));
    } else {
      outcomes.push_back({true, c.error().ToString()});
    }
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(o.hold_ms));
  for (auto& channel : held) {
    std::array<uint8_t, 1> byte{};
    Status s = channel->Receive(byte);  // within the short I/O timeout
    const bool closed = !s.ok() && s.code() != EAGAIN;
    outcomes.push_back({closed, closed ? s.ToString() : "held open"});
  }
  return outcomes;
}

int Run(const Options& o) {
  Result<Address> address = ParseAddress(o.to);
  if (!address.has_value()) {
    fmt::print(stderr, "--to: {}\n", address.error().ToString());
    return 2;
  }
  if (o.kase == "flood") {
    return RunFlood(*address,
                    FloodOptions{o.count == 0 ? 1000u : static_cast<uint32_t>(o.count), o.pages});
  }
  TransportOptions transport;
  transport.io_timeout = std::chrono::milliseconds(o.kase == "silent" ? 200 : 10'000);
  if (!o.tls_dir.empty()) {
    Result<std::shared_ptr<TlsContext>> tls = TlsContext::Load(o.tls_dir);
    if (!tls.has_value()) {
      fmt::print(stderr, "--tls-dir: {}\n", tls.error().ToString());
      return 2;
    }
    transport.tls = *tls;
  }
  Result<std::unique_ptr<Connector>> connector = MakeConnector(*address, transport);
  if (!connector.has_value()) {
    fmt::print(stderr, "{}\n", connector.error().ToString());
    return 2;
  }
  std::vector<Outcome> outcomes;
  if (o.kase == "silent") {
    outcomes = Silent(**connector, o);
  } else {
    Result<std::unique_ptr<Channel>> channel = (*connector)->Connect();
    outcomes.push_back(channel.has_value()
                           ? SendAndListen(**channel, Payload(o), o.kase == "truncated")
                           : Outcome{true, channel.error().ToString()});
  }
  nlohmann::json answers = nlohmann::json::array();
  int refused = 0;
  for (const Outcome& out : outcomes) {
    refused += out.refused ? 1 : 0;
    answers.push_back(out.answer);
  }
  fmt::print("{}\n", nlohmann::json{{"case", o.kase},
                                    {"connections", outcomes.size()},
                                    {"refused", refused},
                                    {"answers", answers}}
                         .dump());
  return refused == static_cast<int>(outcomes.size()) ? 0 : 1;
}

int Main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--to" && has_value) {
      o.to = argv[++i];
    } else if (arg == "--tls-dir" && has_value) {
      o.tls_dir = argv[++i];
    } else if (arg == "--file" && has_value) {
      o.file = argv[++i];
    } else if (arg == "--count" && has_value) {
      o.count = std::atoi(argv[++i]);
    } else if (arg == "--hold-ms" && has_value) {
      o.hold_ms = std::atoi(argv[++i]);
    } else if (arg == "--bytes" && has_value) {
      o.bytes = static_cast<size_t>(std::atoll(argv[++i]));
    } else if (arg == "--pages" && has_value) {
      o.pages = static_cast<uint32_t>(std::atoi(argv[++i]));
    } else if (o.kase.empty() && !arg.starts_with("--")) {
      o.kase = arg;
    } else {
      o.kase.clear();
      break;
    }
  }
  const bool known = o.kase == "hello" || o.kase == "replay" || o.kase == "oversized" ||
                     o.kase == "truncated" || o.kase == "garbage" || o.kase == "silent" ||
                     o.kase == "flood";
  const int max_count = o.kase == "flood" ? 1'000'000 : 1000;
  if (o.to.empty() || !known || (o.kase == "replay" && o.file.empty()) || o.count < 0 ||
      o.count > max_count || o.hold_ms < 0 || o.pages < 1 || o.pages > kMaxRequestPages ||
      (o.kase == "flood" && !o.tls_dir.empty())) {
    fmt::print(stderr,
               "usage: {} --to tcp:HOST:PORT hello|replay|oversized|truncated|garbage|silent|flood "
               "[--tls-dir DIR (not with flood)] [--file FILE] [--count N] [--hold-ms MS] "
               "[--bytes N] [--pages 1..{}]\n",
               argv[0], kMaxRequestPages);
    return 2;
  }
  return Run(o);
}

}  // namespace
}  // namespace faultline::migration

int main(int argc, char** argv) { return faultline::migration::Main(argc, argv); }
