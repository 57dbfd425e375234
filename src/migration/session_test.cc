// Handshake and multi-channel transfers over loopback TCP: a source and a
// destination in two threads of this process, with the real framing, state
// machines and pass barrier, but plain buffers instead of guest memory.
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "src/migration/fault_transport.h"
#include "src/migration/handshake.h"
#include "src/migration/test_util.h"
#include "src/sys/mutex.h"

namespace faultline::migration {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kPage = 4096;

struct Endpoints {
  std::unique_ptr<SocketListener> listener;
  std::unique_ptr<Connector> connector;
};

Endpoints MakeEndpoints() {
  Endpoints e;
  auto listener = SocketListener::Listen(testing::Loopback(), {});
  EXPECT_TRUE(listener.has_value());
  e.connector = std::make_unique<SocketConnector>(Address{"tcp", "127.0.0.1", (*listener)->port()},
                                                  TransportOptions{});
  e.listener = std::move(*listener);
  return e;
}

std::vector<BlockInfo> Blocks(uint64_t bytes) { return {BlockInfo{"ram0", bytes, kPage}}; }

struct HandshakeResult {
  Result<Session> source = Error("not run");
  Result<Session> destination = Error("not run");
};

HandshakeResult Handshake(const SourceSessionOptions& source, ReceiverConfig destination) {
  Endpoints e = MakeEndpoints();
  HandshakeResult r;
  auto nonce = RandomNonce();
  SessionReceiver receiver(std::move(destination), *nonce);
  std::thread accept([&] {
    r.destination = AcceptSession(*e.listener, receiver, {std::chrono::seconds(5), 2});
  });
  r.source = ConnectSession(*e.connector, source);
  accept.join();
  return r;
}

TEST(SessionTest, HandshakeBindsChannels) {
  auto r = Handshake({Blocks(1 << 20), 3, {}, 0}, {Blocks(1 << 20), {}});
  ASSERT_TRUE(r.source.has_value()) << r.source.error().ToString();
  ASSERT_TRUE(r.destination.has_value()) << r.destination.error().ToString();
  EXPECT_EQ(r.source->pages.size(), 3u);
  EXPECT_EQ(r.destination->pages.size(), 3u);
  EXPECT_EQ(r.source->hello.session_id, r.destination->hello.session_id);
  EXPECT_EQ(r.source->ack, r.destination->ack);
}

TEST(SessionTest, AuthenticatedHandshake) {
  const AuthKey key(32, 7);
  auto r = Handshake({Blocks(1 << 20), 2, key, 0}, {Blocks(1 << 20), key});
  ASSERT_TRUE(r.source.has_value()) << r.source.error().ToString();
  ASSERT_TRUE(r.destination.has_value()) << r.destination.error().ToString();
  EXPECT_EQ(r.source->ack.features, kFeatureAuth);
}

TEST(SessionTest, WrongKeyFailsBothSides) {
  auto r = Handshake({Blocks(1 << 20), 2, AuthKey(32, 7), 0}, {Blocks(1 << 20), AuthKey(32, 8)});
  ASSERT_FALSE(r.source.has_value());
  EXPECT_THAT(r.source.error().message(),
              HasSubstr("authentication failed: the destination's proof does not match"));
  ASSERT_FALSE(r.destination.has_value());
  EXPECT_THAT(r.destination.error().message(),
              HasSubstr("peer reported error (code 4): authentication failed"));
}

TEST(SessionTest, RefusalsReachTheSource) {
  auto r = Handshake({Blocks(1 << 20), 2, {}, 0}, {Blocks(1 << 20), AuthKey(32, 8)});
  ASSERT_FALSE(r.source.has_value());
  EXPECT_THAT(r.source.error().message(),
              HasSubstr("peer reported error (code 4): handshake: this destination requires "
                        "authentication"));
  r = Handshake({Blocks(1 << 20), 2, {}, 0}, {Blocks(2 << 20), {}});
  ASSERT_FALSE(r.source.has_value());
  EXPECT_THAT(r.source.error().message(),
              HasSubstr("peer reported error (code 5): handshake: RAM block list mismatch: block "
                        "'ram0' is 1048576 bytes in the source, 2097152 here"));
  EXPECT_THAT(r.destination.error().message(), HasSubstr("RAM block list mismatch"));
}

TEST(SessionTest, StrayConnectionsAreSkipped) {
  Endpoints e = MakeEndpoints();
  SessionReceiver receiver({Blocks(1 << 20), {}}, *RandomNonce());
  Result<Session> destination = Error("not run");
  std::thread accept([&] { destination = AcceptSession(*e.listener, receiver); });
  // Not a Faultline peer: sends an HTTP request and hangs up.
  auto stray = e.connector->Connect();
  ASSERT_TRUE(stray.has_value());
  const std::string http = "GET / HTTP/1.1\r\n\r\n";
  ASSERT_TRUE((*stray)->Send({reinterpret_cast<const uint8_t*>(http.data()), http.size()}).ok());
  (*stray)->Shutdown();
  auto source = ConnectSession(*e.connector, {Blocks(1 << 20), 1, {}, 0});
  accept.join();
  ASSERT_TRUE(source.has_value()) << source.error().ToString();
  ASSERT_TRUE(destination.has_value()) << destination.error().ToString();
}

// Moves `src` into `dst` over `session` in two pre-copy passes and a final
// one, the way the engines do: pass 0 sends every page (zero pages as
// markers), pass 1 re-sends every 7th page with new contents on a different
// channel than pass 0 used (so only the pass barrier keeps the newer copy),
// the final pass re-sends every 61st page.
class Transfer {
 public:
  Transfer(std::vector<uint8_t>& src, std::vector<uint8_t>& dst) : src_(src), dst_(dst) {}

  Status RunSource(Session& s) {
    const uint32_t n = static_cast<uint32_t>(s.pages.size());
    const uint64_t pages = src_.size() / kPage;
    std::vector<Status> results(n);
    uint64_t data_total = 0, zero_total = 0;
    std::mutex mu;
    for (uint32_t pass = 0; pass < 3; ++pass) {
      if (pass == 1) Touch(7, 1);
      if (pass == 2) Touch(61, 2);
      uint64_t pass_data = 0, pass_zero = 0;
      std::vector<std::thread> threads;
      for (uint32_t c = 0; c < n; ++c) {
        threads.emplace_back([&, c] {
          Status st = SendPass(*s.pages[c], c, n, pass, pages, mu, pass_data, pass_zero);
          results[c] = st;
        });
      }
      for (auto& t : threads) t.join();
      for (const Status& st : results) RETURN_IF_ERROR(st);
      data_total += pass_data;
      zero_total += pass_zero;
      if (pass < 2) {
        RETURN_IF_ERROR(s.main->writer().Send(PassEnd{pass, pass_data, pass_zero, 0}));
      } else {
        RETURN_IF_ERROR(
            s.main->writer().Send(Switchover{SwitchoverMode::kStopAndCopy, 2, pass_data, 1, 0}));
      }
    }
    RETURN_IF_ERROR(s.main->writer().Send(VcpuStateMessage{0, {1, 2, 3}}));
    RETURN_IF_ERROR(s.main->writer().Send(Complete{3, data_total, zero_total}));
    return Expect<CompleteAck>(s.main->reader(), "completion").status();
  }

  Status RunDestination(Session& s, SessionReceiver& receiver) {
    const size_t n = s.pages.size();
    std::vector<ChannelReceiver> channels;
    for (size_t c = 0; c < n; ++c) channels.emplace_back(static_cast<uint16_t>(c));
    std::vector<Status> results(n);
    std::vector<std::thread> threads;
    for (size_t c = 0; c < n; ++c) {
      threads.emplace_back([&, c] {
        results[c] = ReceiveChannel(*s.pages[c], channels[c], n);
        if (!results[c].ok()) s.Shutdown();  // wake everyone else
      });
    }
    Status main = ReceiveMain(s, receiver, threads, channels, results);
    if (!main.ok()) s.Shutdown();  // before joining: channel threads may be blocked reading
    for (auto& t : threads) {
      if (t.joinable()) t.join();
    }
    return main;
  }

 private:
  void Touch(uint64_t every, uint8_t generation) {
    for (uint64_t p = 0; p < src_.size() / kPage; p += every) {
      std::memset(&src_[p * kPage], 0, kPage);
      src_[p * kPage + 1] = generation;
      src_[p * kPage + 2] = static_cast<uint8_t>(p);
    }
  }
  bool IsZero(uint64_t page) const {
    const uint8_t* p = &src_[page * kPage];
    return p[0] == 0 && std::memcmp(p, p + 1, kPage - 1) == 0;
  }
  bool InPass(uint64_t page, uint32_t pass) const {
    return pass == 0 || (pass == 1 && page % 7 == 0) || (pass == 2 && page % 61 == 0);
  }

  Status SendPass(Link& link, uint32_t c, uint32_t n, uint32_t pass, uint64_t pages, std::mutex& mu,
                  uint64_t& pass_data, uint64_t& pass_zero) {
    uint64_t data = 0, zero = 0;
    PagesHeader header{0, pass, 0, {}};
    std::vector<ConstBuffer> buffers;
    ZeroPages zeros{0, pass, {}};
    auto flush = [&]() -> Status {
      if (!header.pages.empty()) {
        RETURN_IF_ERROR(link.writer().SendPages(header, buffers));
        header.pages.clear();
        buffers.clear();
      }
      if (!zeros.runs.empty()) {
        RETURN_IF_ERROR(link.writer().Send(zeros));
        zeros.runs.clear();
      }
      return Status::Ok();
    };
    // Chunks of 64 pages go round-robin; later passes shift by `pass`.
    for (uint64_t p = 0; p < pages; ++p) {
      if ((p / 64 + pass) % n != c || !InPass(p, pass)) continue;
      if (IsZero(p)) {
        ++zero;
        if (!zeros.runs.empty() && zeros.runs.back().first + zeros.runs.back().count == p) {
          ++zeros.runs.back().count;
        } else {
          zeros.runs.push_back({static_cast<uint32_t>(p), 1});
        }
      } else {
        ++data;
        header.pages.push_back(static_cast<uint32_t>(p));
        buffers.push_back(ConstBuffer(&src_[p * kPage], kPage));
      }
      if (header.pages.size() == 256 || zeros.runs.size() == kMaxZeroRuns) RETURN_IF_ERROR(flush());
    }
    RETURN_IF_ERROR(flush());
    if (pass < 2) {
      RETURN_IF_ERROR(link.writer().Send(PassEnd{pass, data, zero, 0}));
    } else {
      total_data_[c] += data;
      total_zero_[c] += zero;
      RETURN_IF_ERROR(
          link.writer().Send(ChannelEnd{pass, data, zero, total_data_[c], total_zero_[c]}));
    }
    if (pass < 2) {
      total_data_[c] += data;
      total_zero_[c] += zero;
    }
    std::lock_guard lock(mu);
    pass_data += data;
    pass_zero += zero;
    return Status::Ok();
  }

  Status ReceiveChannel(Link& link, ChannelReceiver& state, size_t n) {
    std::vector<MutableBuffer> dest;
    while (state.phase() != ChannelReceiver::Phase::kEnded) {
      ASSIGN_OR_RETURN(Message m, link.reader().Read());
      RETURN_IF_ERROR(state.OnMessage(m));
      if (auto* h = std::get_if<PagesHeader>(&m)) {
        dest.clear();
        for (uint32_t p : h->pages) dest.push_back(MutableBuffer(&dst_[p * kPage], kPage));
        RETURN_IF_ERROR(link.reader().ReceivePageData(dest));
      } else if (auto* z = std::get_if<ZeroPages>(&m)) {
        for (const PageRun& r : z->runs) std::memset(&dst_[r.first * kPage], 0, r.count * kPage);
      } else if (state.phase() == ChannelReceiver::Phase::kPassEnded) {
        RETURN_IF_ERROR(Barrier(state.pass(), n));
        RETURN_IF_ERROR(state.BeginNextPass());
      }
    }
    return Status::Ok();
  }

  // Waits until all `n` channels ended pass `pass`.
  Status Barrier(uint32_t pass, size_t n) {
    sys::MutexLock lock(barrier_mu_);
    if (++arrived_[pass] == n) barrier_cv_.notify_all();
    if (!barrier_cv_.wait_for(lock.native(), std::chrono::seconds(60),
                              [&]() REQUIRES(barrier_mu_) { return arrived_[pass] == n; })) {
      return Error("pass {} barrier timed out", pass);
    }
    return Status::Ok();
  }

  Status ReceiveMain(Session& s, SessionReceiver& receiver, std::vector<std::thread>& threads,
                     std::vector<ChannelReceiver>& channels, std::vector<Status>& results) {
    while (true) {
      ASSIGN_OR_RETURN(Message m, s.main->reader().Read());
      if (std::holds_alternative<Complete>(m)) {
        // Every page must be in place before the guest could run.
        for (size_t c = 0; c < threads.size(); ++c) {
          threads[c].join();
          RETURN_IF_ERROR(results[c]);
          RETURN_IF_ERROR(
              receiver.RecordChannelEnd(static_cast<uint16_t>(c), channels[c].totals()));
        }
      }
      RETURN_IF_ERROR(receiver.OnMessage(m));
      if (receiver.phase() == ReceiverPhase::kComplete) {
        const auto& c = std::get<Complete>(m);
        return s.main->writer().Send(CompleteAck{c.passes, c.data_pages, c.zero_pages});
      }
    }
  }

  std::vector<uint8_t>& src_;
  std::vector<uint8_t>& dst_;
  uint64_t total_data_[kMaxPageChannels] = {};
  uint64_t total_zero_[kMaxPageChannels] = {};
  sys::Mutex barrier_mu_;
  std::condition_variable barrier_cv_;
  size_t arrived_[3] GUARDED_BY(barrier_mu_) = {};
};

struct TransferResult {
  Status source;
  Status destination;
};

TransferResult RunTransfer(std::vector<uint8_t>& src, std::vector<uint8_t>& dst, uint16_t channels,
                           std::shared_ptr<FaultController> link = nullptr) {
  Endpoints e = MakeEndpoints();
  std::unique_ptr<Connector> connector = std::move(e.connector);
  if (link) connector = std::make_unique<FaultyConnector>(std::move(connector), link);
  SessionReceiver receiver({Blocks(dst.size()), {}}, *RandomNonce());
  Transfer transfer(src, dst);
  TransferResult result;
  std::thread destination([&] {
    auto session = AcceptSession(*e.listener, receiver);
    result.destination = session ? transfer.RunDestination(*session, receiver) : session.error();
  });
  auto session = ConnectSession(*connector, {Blocks(src.size()), channels, {}, 0});
  result.source = session ? transfer.RunSource(*session) : session.error();
  if (!result.source.ok() && session) session->Shutdown();
  destination.join();
  return result;
}

std::vector<uint8_t> Pattern(uint64_t bytes) {
  std::vector<uint8_t> v(bytes);
  for (uint64_t p = 0; p < bytes / kPage; ++p) {
    if (p % 5 == 0) continue;  // every 5th page stays zero
    for (uint64_t i = 0; i < kPage; i += 8) {
      const uint64_t word = (p << 20) ^ i ^ 0x9e3779b97f4a7c15ull;
      std::memcpy(&v[p * kPage + i], &word, 8);
    }
  }
  return v;
}

TEST(SessionTest, MovesHundredsOfMiBOverFourChannels) {
  auto src = Pattern(256 << 20);
  std::vector<uint8_t> dst(src.size(), 0xcc);
  const auto start = std::chrono::steady_clock::now();
  TransferResult r = RunTransfer(src, dst, 4);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(r.source.ok()) << r.source.ToString();
  ASSERT_TRUE(r.destination.ok()) << r.destination.ToString();
  EXPECT_TRUE(src == dst);  // pass 1 and 2 contents won over older copies
  RecordProperty("MiB_per_s", static_cast<int>(256 / seconds));
}

TEST(SessionTest, OneChannel) {
  auto src = Pattern(16 << 20);
  std::vector<uint8_t> dst(src.size(), 0xcc);
  TransferResult r = RunTransfer(src, dst, 1);
  ASSERT_TRUE(r.source.ok()) << r.source.ToString();
  ASSERT_TRUE(r.destination.ok()) << r.destination.ToString();
  EXPECT_TRUE(src == dst);
}

TEST(SessionTest, CutLinkFailsBothSidesPromptly) {
  auto src = Pattern(64 << 20);
  std::vector<uint8_t> dst(src.size());
  FaultPlan plan;
  plan.cut_after_bytes_sent = 20 << 20;
  const auto start = std::chrono::steady_clock::now();
  TransferResult r = RunTransfer(src, dst, 3, FaultController::Create(plan));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
  EXPECT_FALSE(r.source.ok());
  EXPECT_FALSE(r.destination.ok());
  EXPECT_THAT(r.source.ToString(), HasSubstr("link cut by the test transport"));
}

}  // namespace
}  // namespace faultline::migration
