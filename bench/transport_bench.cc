// Loopback throughput of the migration transport: 4 KiB pages in Pages
// batches (frame header + index list + page spans, one gather send; one
// scatter receive straight into the destination pages) over 1, 2 and 4 TCP
// page channels, plaintext and TLS 1.3 (tls_transport.h; kernel TLS where
// the kernel has it, and the line says whether it took), against a plain
// single TCP socket moving the same bytes in 1 MiB sends and MSG_WAITALL
// receives (no framing, no copies), measured in the same run.
//
//   build/mig-release/bench/faultline_bench_transport [--mib N] [--reps R] [--batch PAGES]
//
// Each configuration moves N MiB (default 512) R times (default 3); the best
// and median rates are printed, with the ratio of the best to the
// baseline's best. Figures only; nothing here passes or fails on time.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "src/migration/message_io.h"
#include "src/migration/socket_transport.h"
#include "src/migration/tls_test_certs.h"
#include "src/migration/tls_transport.h"

namespace faultline::migration {
namespace {

constexpr uint64_t kPage = 4096;

struct Options {
  uint64_t mib = 512;
  int reps = 3;
  uint32_t batch = 256;
};

[[noreturn]] void Die(const Status& status) {
  fmt::print(stderr, "transport bench: {}\n", status.ToString());
  std::exit(1);
}

template <typename T>
T Check(Result<T> result) {
  if (!result) Die(result.error());
  return std::move(*result);
}

uint8_t* Allocate(uint64_t bytes, uint8_t fill) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) Die(ErrnoError(errno, "mmap {} bytes", bytes));
  std::memset(p, fill, bytes);  // resident before timing
  return static_cast<uint8_t*>(p);
}

// `n` connected TCP pairs on 127.0.0.1 (TLS with options.tls).
std::vector<std::pair<std::unique_ptr<Channel>, std::unique_ptr<Channel>>> Connect(
    int n, const TransportOptions& options = {}) {
  auto acceptor = Check(MakeAcceptor(Address{"tcp", "127.0.0.1", 0}, options));
  auto connector = Check(MakeConnector(*ParseAddress(acceptor->address()), options));
  std::vector<std::pair<std::unique_ptr<Channel>, std::unique_ptr<Channel>>> pairs;
  for (int i = 0; i < n; ++i) {
    // A TLS handshake needs both ends at once.
    Result<std::unique_ptr<Channel>> server = Error("not accepted");
    std::thread accept([&] { server = acceptor->Accept(std::chrono::seconds(10)); });
    auto client = Check(connector->Connect());
    accept.join();
    pairs.emplace_back(std::move(client), Check(std::move(server)));
  }
  return pairs;
}

double Seconds(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The baseline: one socket, 1 MiB sends, one receive per 1 MiB.
double Baseline(const uint8_t* src, uint8_t* dst, uint64_t bytes) {
  auto pairs = Connect(1);
  Channel& out = *pairs[0].first;
  Channel& in = *pairs[0].second;
  constexpr uint64_t kChunk = 1 << 20;
  const auto start = std::chrono::steady_clock::now();
  std::thread receiver([&] {
    for (uint64_t off = 0; off < bytes; off += kChunk) {
      if (Status s = in.Receive({dst + off, std::min(kChunk, bytes - off)}); !s.ok()) Die(s);
    }
  });
  for (uint64_t off = 0; off < bytes; off += kChunk) {
    if (Status s = out.Send({src + off, std::min(kChunk, bytes - off)}); !s.ok()) Die(s);
  }
  receiver.join();
  return static_cast<double>(bytes) / Seconds(start);
}

// The protocol path: `channels` page channels, each moving its share of
// the pages (chunks of `batch` pages dealt round-robin) in Pages messages.
double Pages(const uint8_t* src, uint8_t* dst, uint64_t bytes, int channels, uint32_t batch,
             const TransportOptions& options) {
  auto pairs = Connect(channels, options);
  const std::vector<BlockInfo> blocks = {BlockInfo{"ram0", bytes, kPage}};
  const uint64_t pages = bytes / kPage;
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int c = 0; c < channels; ++c) {
    threads.emplace_back([&, c] {
      MessageWriter writer(*pairs[c].first);
      PagesHeader header{0, 0, 0, {}};
      std::vector<ConstBuffer> data;
      for (uint64_t first = uint64_t(c) * batch; first < pages;
           first += uint64_t(channels) * batch) {
        header.pages.clear();
        data.clear();
        for (uint64_t p = first; p < std::min(pages, first + batch); ++p) {
          header.pages.push_back(static_cast<uint32_t>(p));
          data.push_back({src + p * kPage, kPage});
        }
        if (Status s = writer.SendPages(header, data); !s.ok()) Die(s);
      }
      if (Status s = writer.Send(ChannelEnd{}); !s.ok()) Die(s);
    });
    threads.emplace_back([&, c] {
      MessageReader reader(*pairs[c].second);
      reader.set_blocks(&blocks);
      std::vector<MutableBuffer> dest;
      while (true) {
        Message m = Check(reader.Read());
        auto* h = std::get_if<PagesHeader>(&m);
        if (h == nullptr) break;  // ChannelEnd
        dest.clear();
        for (uint32_t p : h->pages) dest.push_back({dst + uint64_t(p) * kPage, kPage});
        if (Status s = reader.ReceivePageData(dest); !s.ok()) Die(s);
      }
    });
  }
  for (auto& t : threads) t.join();
  return static_cast<double>(bytes) / Seconds(start);
}

struct Figures {
  double best = 0;
  double median = 0;
};

template <typename Fn>
Figures Measure(int reps, Fn&& run) {
  std::vector<double> rates;
  for (int i = 0; i < reps; ++i) rates.push_back(run());
  std::sort(rates.begin(), rates.end());
  return {rates.back(), rates[rates.size() / 2]};
}

Options ParseOptions(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string_view flag = argv[i];
    const uint64_t value = std::strtoull(argv[i + 1], nullptr, 10);
    if (flag == "--mib" && value > 0) {
      o.mib = value;
    } else if (flag == "--reps" && value > 0 && value < 100) {
      o.reps = static_cast<int>(value);
    } else if (flag == "--batch" && value > 0 && value <= kMaxPagesPerBatch) {
      o.batch = static_cast<uint32_t>(value);
    } else {
      fmt::print(stderr, "usage: {} [--mib N] [--reps R] [--batch 1..{}]\n", argv[0],
                 kMaxPagesPerBatch);
      std::exit(2);
    }
  }
  return o;
}

int Main(int argc, char** argv) {
  const Options o = ParseOptions(argc, argv);
  const uint64_t bytes = o.mib << 20;
  uint8_t* src = Allocate(bytes, 0x5a);
  // Each page names itself, so that a page landing in the wrong place shows.
  for (uint64_t p = 0; p < bytes / kPage; ++p) std::memcpy(src + p * kPage, &p, sizeof(p));
  uint8_t* dst = Allocate(bytes, 0);
  fmt::print(
      "loopback TCP, {} MiB per run, best and median of {}, {} x 4 KiB pages per batch, "
      "{} CPUs\n",
      o.mib, o.reps, o.batch, std::thread::hardware_concurrency());
  const Figures base = Measure(o.reps, [&] { return Baseline(src, dst, bytes); });
  auto line = [&](const char* what, const Figures& f) {
    fmt::print("  {:<36} best {:6.2f} GB/s  median {:6.2f} GB/s  ({:.2f}x baseline)\n", what,
               f.best / 1e9, f.median / 1e9, f.best / base.best);
  };
  line("baseline: 1 socket, 1 MiB send/recv", base);
  // One CA and one directory for both ends (the certificates' names are
  // not checked here).
  const std::string dir = fmt::format("/tmp/faultline_bench_tls_{}", getpid());
  testing::TestCa().WriteDir(dir, "bench", "IP:127.0.0.1");
  TransportOptions tls;
  tls.tls = Check(TlsContext::Load(dir));
  const TransportOptions* const kinds[] = {nullptr, &tls};
  for (const TransportOptions* options : kinds) {
    for (int channels : {1, 2, 4}) {
      std::memset(dst, 0, bytes);
      const Figures f = Measure(o.reps, [&] {
        return Pages(src, dst, bytes, channels, o.batch, options ? *options : TransportOptions{});
      });
      if (std::memcmp(src, dst, bytes) != 0) {
        Die(Error("{} channels: pages arrived wrong", channels));
      }
      line(fmt::format("Pages{}, {} channel{}", options ? " over TLS" : "", channels,
                       channels > 1 ? "s" : "")
               .c_str(),
           f);
    }
  }
  fmt::print("TLS: {}\n", tls.tls->Describe());
  for (const char* file : {"ca.pem", "cert.pem", "key.pem"})
    std::remove((dir + "/" + file).c_str());
  rmdir(dir.c_str());
  munmap(src, bytes);
  munmap(dst, bytes);
  return 0;
}

}  // namespace
}  // namespace faultline::migration

int main(int argc, char** argv) { return faultline::migration::Main(argc, argv); }
