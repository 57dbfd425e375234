// Post-copy latency benchmark. In one run:
//   floor      the bare userfaultfd round trip: host threads touch pages of
//              a block paged by the zero installer (no source work at all),
//              as the touching threads see it (observed) and as the pager
//              serves it (service);
//   loopback   post-copy of the random-write test guest (default 2 GiB,
//              2 vCPUs, one pre-copy pass) over loopback TCP: the pager's
//              fault service time (fault read -> page installed, waiters
//              woken) on the destination, the switchover pause (source VM
//              stopped -> destination vCPUs running), pages demanded vs
//              pushed; the fault path's threads and the switchover run
//              SCHED_FIFO (the library's default, src/sys/sched.h);
//   network    the bare network fault: one host thread touches pages of
//              anonymous memory registered with a userfaultfd; a handler
//              thread reads each fault, sends its offset over loopback TCP
//              to a server thread that answers with the 4 KiB page, and
//              installs it with UFFDIO_COPY (no pager, no protocol);
//   no-fifo    the same without SCHED_FIFO, for comparison;
//   link30     the same as loopback over a link 30 us long each way (the
//              fault-injecting transport's delay line on both ends: every
//              send arrives 30 us later, messages in flight overlap).
// Figures only; nothing passes or fails on time.
//
//   faultline_bench_postcopy [--mem MIB] [--backing anon|memfd|hugetlb|gmem]
//                            [--accel auto|kvm|tcg] [--passes N] [--link-us N]
//                            [--json]
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#include <fmt/format.h>

#include "guest/abi.h"
#include "src/migration/fault_transport.h"
#include "src/migration/postcopy_destination.h"
#include "src/migration/postcopy_source.h"
#include "src/migration/socket_transport.h"
#include "src/paging/demand_pager.h"
#include "src/sys/userfaultfd.h"
#include "src/vmm/vm.h"
#include "src/vmm/vm_adapter.h"

namespace faultline {
namespace {

using namespace std::chrono_literals;
using migration::Address;

struct Args {
  uint64_t mem = 2ull << 30;
  Backing backing = Backing::kAnonymous;
  hv::AccelChoice accel = hv::AccelChoice::kAuto;
  uint32_t passes = 1;
  uint32_t link_us = 30;
  bool json = false;
};

// The fault path's threads run SCHED_FIFO at this priority (the library's
// default) but in the "no-fifo" run, which shows what that is worth.
constexpr int kRealtime = 1;

struct PostcopyRun {
  double pause_ms = 0;     // source stop -> destination vCPUs running
  double start_vm_ms = 0;  // Switchover received -> vCPUs running
  // Its parts: dirty set and vCPU state in, page channels at the
  // switchover, paging started (stale pages dropped, pager made) and vCPUs.
  double state_ms = 0, channels_ms = 0, paging_ms = 0;
  double source_send_ms = 0;       // the source's part: VM stopped -> state handed to TCP
  paging::LatencySummary service;  // the destination pager's per-fault time
  paging::LatencySummary network;  // request -> data in place
  uint64_t faults = 0;
  uint64_t demanded = 0;
  uint64_t pushed = 0;
  uint64_t touched_after = 0;  // pages the guest accessed after the switchover
  uint64_t bad_pages = 0;
  double total_s = 0;
};

Result<PostcopyRun> RunPostcopy(const Args& args, std::chrono::microseconds link_delay,
                                int realtime_priority) {
  vmm::VmConfig config;
  config.mem_size = args.mem;
  config.vcpus = 2;
  config.backing = args.backing;
  config.accel = args.accel;
  config.guest_args = "workload=fill,random,verify until_command=1 rate=64 quiet=1";
  ASSIGN_OR_RETURN(auto from, vmm::Vm::Create(config));
  vmm::VmConfig incoming = config;
  incoming.boot = false;
  ASSIGN_OR_RETURN(auto to, vmm::Vm::Create(incoming));
  RETURN_IF_ERROR(from->Start());
  std::this_thread::sleep_for(std::chrono::milliseconds(300 + args.mem / (1 << 20) * 3));

  ASSIGN_OR_RETURN(auto listener,
                   migration::SocketListener::Listen(Address{"tcp", "127.0.0.1", 0}, {}));
  const Address address{"tcp", "127.0.0.1", listener->port()};
  migration::FaultPlan plan;
  plan.one_way_delay = link_delay;
  auto source_link = migration::FaultController::Create(plan);
  auto destination_link = migration::FaultController::Create(plan);
  migration::FaultyConnector connector(
      std::make_unique<migration::SocketConnector>(address, migration::TransportOptions{}),
      source_link);
  migration::FaultyAcceptor acceptor(std::move(listener), destination_link);

  auto source_vm = vmm::MakeSourceVm(*from);
  migration::PostcopyVmOptions vm_options;
  vm_options.realtime_priority = realtime_priority;
  auto destination_vm = vmm::MakePostcopyDestinationVm(*to, vm_options);
  migration::PostcopySourceOptions options;
  options.base.page_channels = 2;
  options.precopy_passes = args.passes;
  options.realtime_priority = realtime_priority;
  migration::PostcopySource source(*source_vm, options);
  migration::DestinationOptions destination_options;
  destination_options.realtime_priority = realtime_priority;
  migration::PostcopyDestination destination(*destination_vm, destination_options);
  Result<migration::PostcopyDestinationStats> d = Error("not run");
  std::thread receiver([&] { d = destination.Run(acceptor); });
  Result<migration::PostcopySourceStats> s = source.Run(connector);
  receiver.join();
  from->Stop();
  if (!s) return s.error().WithContext("source");
  if (!d) return d.error().WithContext("destination");
  std::this_thread::sleep_for(200ms);
  to->SetGuestCommand(FL_CMD_STOP);
  ASSIGN_OR_RETURN(GuestReport report, to->Wait(300s));
  to->Stop();

  PostcopyRun r;
  r.pause_ms = std::chrono::duration<double, std::milli>(d->vm_started_at - s->paused_at).count();
  r.start_vm_ms = d->start_vm.count() / 1e3;
  r.state_ms = d->state_wait.count() / 1e3;
  r.source_send_ms = s->switchover_send.count() / 1e3;
  r.channels_ms = d->channels_wait.count() / 1e3;
  r.paging_ms = d->start_paging.count() / 1e3;
  r.service = d->paging.latency;
  r.network = d->network.fault_latency;
  r.faults = d->paging.faults;
  r.demanded = d->network.pages_demanded;
  r.pushed = d->network.pages_pushed;
  // Faults are accesses to pages not yet here; every other page the guest
  // touched in post-copy was present (pre-copied) or pushed before it was
  // touched. The faulting pages are a lower bound on the pages touched.
  r.touched_after = d->paging.faults + d->paging.faults_joined;
  r.bad_pages = report.bad_page_count();
  r.total_s = s->total.count() / 1e6;
  return r;
}

// A source for the zero installer, which never asks one.
class NoSource final : public paging::PageSource {
 public:
  void Fetch(const paging::FetchRequest&, paging::FetchCallback done) override {
    done(paging::FetchResult::Failed(Error("the floor has no source")));
  }
  void CancelAll() override {}
};

struct Floor {
  paging::LatencySummary observed;  // an access as the touching thread sees it
  paging::LatencySummary service;   // fault read -> resolved, in the pager
};

// The bare userfaultfd round trip: two host threads touch every page of
// 256 MiB of anonymous memory once, each fault resolved by UFFDIO_ZEROPAGE.
Result<Floor> MeasureFloor() {
  constexpr uint64_t kMem = 256ull << 20, kPage = 4096;
  ASSIGN_OR_RETURN(
      std::shared_ptr<RamBlock> block,
      RamBlock::Create({.name = "floor", .size = kMem, .backing = Backing::kAnonymous}));
  ASSIGN_OR_RETURN(auto pager, paging::DemandPager::Create(std::make_shared<NoSource>(), {}));
  RETURN_IF_ERROR(pager->AddBlock(block, paging::InstallerKind::kZero, 0));
  RETURN_IF_ERROR(pager->Start());
  paging::LatencyHistogram observed;
  std::vector<std::thread> threads;
  for (uint64_t t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t p = t * kMem / kPage / 2; p < (t + 1) * kMem / kPage / 2; ++p) {
        const auto begin = std::chrono::steady_clock::now();
        (void)*reinterpret_cast<const volatile uint64_t*>(block->host() + p * kPage);
        observed.Record(static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                                  std::chrono::steady_clock::now() - begin)
                                                  .count()));
      }
    });
  }
  for (std::thread& t : threads) t.join();
  Floor f{observed.Summarize(), pager->stats().latency};
  pager->Stop();
  return f;
}

// Reads or writes exactly `length` bytes; false on EOF or error.
bool FullIo(int fd, void* data, size_t length, bool write_side) {
  auto* p = static_cast<char*>(data);
  while (length > 0) {
    ssize_t n = write_side ? ::send(fd, p, length, MSG_NOSIGNAL) : ::recv(fd, p, length, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    length -= static_cast<size_t>(n);
  }
  return true;
}

// The bare network fault: a userfaultfd fault, its offset sent over
// loopback TCP, a 4 KiB reply, UFFDIO_COPY. One touching thread (each
// fault alone, no queueing), one handler, one server; 64 MiB.
Result<Floor> MeasureNetworkFloor() {
  constexpr uint64_t kMem = 64ull << 20, kPage = 4096;
  void* area = mmap(nullptr, kMem, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (area == MAP_FAILED) return ErrnoError(errno, "mmap 64 MiB");
  auto* base = static_cast<uint8_t*>(area);
  struct Unmap {
    void* p;
    ~Unmap() { munmap(p, kMem); }
  } unmap{area};
  ASSIGN_OR_RETURN(sys::Userfaultfd uffd, sys::Userfaultfd::Create(0, 0));
  ASSIGN_OR_RETURN(sys::UffdRegistration registration,
                   uffd.Register(Hva(base), kMem, sys::UffdMode::kMissing));

  int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listener < 0) return ErrnoError(errno, "socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t addr_len = sizeof(addr);
  if (::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(listener, 1) != 0 ||
      ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &addr_len) != 0) {
    int e = errno;
    ::close(listener);
    return ErrnoError(e, "loopback listener");
  }
  int client = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (client < 0 || ::connect(client, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    int e = errno;
    ::close(listener);
    if (client >= 0) ::close(client);
    return ErrnoError(e, "connect to the loopback listener");
  }
  int server = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
  ::close(listener);
  if (server < 0) {
    int e = errno;
    ::close(client);
    return ErrnoError(e, "accept");
  }
  const int one = 1;
  ::setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  ::setsockopt(server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

  // The "source": answers each offset with its page (a pattern).
  std::thread server_thread([server] {
    std::vector<uint8_t> page(kPage);
    uint64_t offset = 0;
    while (FullIo(server, &offset, sizeof(offset), false)) {
      std::memset(page.data(), static_cast<int>(offset / kPage) | 1, kPage);
      if (!FullIo(server, page.data(), kPage, true)) break;
    }
  });
  paging::LatencyHistogram service;
  std::atomic<bool> failed{false};
  std::thread handler([&] {
    std::vector<uint8_t> page(kPage);
    sys::UffdMessage messages[1];
    for (uint64_t served = 0; served < kMem / kPage;) {
      Result<size_t> n = uffd.ReadEvents(messages);
      if (!n) {
        failed = true;
        return;
      }
      if (*n == 0) continue;
      const auto begin = std::chrono::steady_clock::now();
      const uint64_t at = messages[0].fault_address().value & ~(kPage - 1);
      uint64_t offset = at - reinterpret_cast<uint64_t>(base);
      if (!FullIo(client, &offset, sizeof(offset), true) ||
          !FullIo(client, page.data(), kPage, false) ||
          !uffd.Copy(Hva(at), page.data(), kPage).has_value()) {
        failed = true;
        return;
      }
      service.Record(static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                               std::chrono::steady_clock::now() - begin)
                                               .count()));
      ++served;
    }
  });
  paging::LatencyHistogram observed;
  uint64_t wrong = 0;
  for (uint64_t p = 0; p < kMem / kPage && !failed; ++p) {
    const auto begin = std::chrono::steady_clock::now();
    uint8_t v = *reinterpret_cast<const volatile uint8_t*>(base + p * kPage);
    observed.Record(static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                              std::chrono::steady_clock::now() - begin)
                                              .count()));
    if (v != (static_cast<uint8_t>(p) | 1)) ++wrong;
  }
  handler.join();
  ::shutdown(client, SHUT_RDWR);
  server_thread.join();
  ::close(client);
  ::close(server);
  if (failed) return Error("the bare network fault's handler failed");
  if (wrong != 0) return Error("the bare network fault read {} wrong pages", wrong);
  return Floor{observed.Summarize(), service.Summarize()};
}

int Main(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--mem") {
      args.mem = std::stoull(next()) << 20;
    } else if (a == "--backing") {
      Result<Backing> b = ParseBacking(next());
      if (!b) {
        fmt::print(stderr, "{}\n", b.error().ToString());
        return 2;
      }
      args.backing = *b;
    } else if (a == "--accel") {
      Result<hv::AccelChoice> c = hv::ParseAccel(next());
      if (!c) {
        fmt::print(stderr, "{}\n", c.error().ToString());
        return 2;
      }
      args.accel = *c;
    } else if (a == "--passes") {
      args.passes = static_cast<uint32_t>(std::stoul(next()));
    } else if (a == "--link-us") {
      args.link_us = static_cast<uint32_t>(std::stoul(next()));
    } else if (a == "--json") {
      args.json = true;
    } else {
      fmt::print(
          stderr,
          "usage: faultline_bench_postcopy [--mem MIB] [--backing B] [--accel A] [--passes N] "
          "[--link-us N] [--json]\n");
      return 2;
    }
  }

  Result<Floor> floor = MeasureFloor();
  if (!floor) {
    fmt::print(stderr, "floor: {}\n", floor.error().ToString());
    return 1;
  }
  Result<Floor> network = MeasureNetworkFloor();
  if (!network) {
    fmt::print(stderr, "bare network fault: {}\n", network.error().ToString());
    return 1;
  }
  Result<PostcopyRun> loop = RunPostcopy(args, {}, kRealtime);
  if (!loop) {
    fmt::print(stderr, "loopback: {}\n", loop.error().ToString());
    return 1;
  }
  Result<PostcopyRun> plain = RunPostcopy(args, {}, 0);
  if (!plain) {
    fmt::print(stderr, "loopback without SCHED_FIFO: {}\n", plain.error().ToString());
    return 1;
  }
  Result<PostcopyRun> link = RunPostcopy(args, std::chrono::microseconds(args.link_us), kRealtime);
  if (!link) {
    fmt::print(stderr, "link: {}\n", link.error().ToString());
    return 1;
  }

  const double f50 = floor->observed.p50_us, f99 = floor->observed.p99_us;
  const double n50 = network->observed.p50_us, n99 = network->observed.p99_us;
  // What a faulting thread sees of a post-copy fault, estimated as the
  // floor's observed round trip with the floor's service time replaced by
  // post-copy's (request, network, install): the fault entry and wake-up
  // around the service are the same kernel paths.
  const double entry50 = std::max(0.0, f50 - floor->service.p50_us);
  const double entry99 = std::max(0.0, f99 - floor->service.p99_us);
  auto row = [&](const char* name, PostcopyRun r) {
    r.service.p50_us += entry50;  // from here on: the estimated observed latency
    r.service.p99_us += entry99;
    const double share = r.demanded + r.pushed ? 100.0 * static_cast<double>(r.demanded) /
                                                     static_cast<double>(r.demanded + r.pushed)
                                               : 0;
    if (args.json) {
      fmt::print(
          "{{\"run\":\"{}\",\"fault_p50_us\":{:.1f},\"fault_p99_us\":{:.1f},\"p50_vs_floor\":{:.2f}"
          ",\"p99_vs_floor\":{:.2f},\"p50_vs_network\":{:.2f},\"p99_vs_network\":{:.2f},"
          "\"request_p50_us\":{:.1f},\"request_p99_us\":{:.1f},"
          "\"faults\":{},\"switchover_pause_ms\":{:.2f},\"start_vm_ms\":{:.2f},"
          "\"pages_demanded\":{},\"pages_pushed\":{},\"demanded_share_pct\":{:.2f},"
          "\"bad_pages\":{},\"total_s\":{:.2f},\"state_ms\":{:.2f},\"channels_ms\":{:.2f},"
          "\"paging_ms\":{:.2f},\"source_send_ms\":{:.2f}}}\n",
          name, r.service.p50_us, r.service.p99_us, r.service.p50_us / f50, r.service.p99_us / f99,
          r.service.p50_us / n50, r.service.p99_us / n99, r.network.p50_us, r.network.p99_us,
          r.faults, r.pause_ms, r.start_vm_ms, r.demanded, r.pushed, share, r.bad_pages, r.total_s,
          r.state_ms, r.channels_ms, r.paging_ms, r.source_send_ms);
    } else {
      fmt::print(
          "{:9} fault (observed, est.) p50 {:6.1f} us ({:.2f}x floor, {:.2f}x network)  p99 "
          "{:7.1f} us ({:.2f}x floor, {:.2f}x network)  [request "
          "p50 {:.1f} p99 {:.1f}]  {} faults\n"
          "          switchover pause {:.2f} ms (source sent state after {:.2f}; destination part "
          "{:.2f} ms: state {:.2f}, channels {:.2f}, paging {:.2f}); demanded {} vs pushed {} "
          "({:.2f}% demanded); bad pages {}; total {:.2f} s\n",
          name, r.service.p50_us, r.service.p50_us / f50, r.service.p50_us / n50, r.service.p99_us,
          r.service.p99_us / f99, r.service.p99_us / n99, r.network.p50_us, r.network.p99_us,
          r.faults, r.pause_ms, r.source_send_ms, r.start_vm_ms, r.state_ms, r.channels_ms,
          r.paging_ms, r.demanded, r.pushed, share, r.bad_pages, r.total_s);
    }
  };
  if (args.json) {
    fmt::print(
        "{{\"run\":\"floor\",\"observed_p50_us\":{:.1f},\"observed_p99_us\":{:.1f},"
        "\"service_p50_us\":{:.1f},\"service_p99_us\":{:.1f}}}\n",
        f50, f99, floor->service.p50_us, floor->service.p99_us);
    fmt::print(
        "{{\"run\":\"network\",\"observed_p50_us\":{:.1f},\"observed_p99_us\":{:.1f},"
        "\"service_p50_us\":{:.1f},\"service_p99_us\":{:.1f}}}\n",
        n50, n99, network->service.p50_us, network->service.p99_us);
  } else {
    fmt::print(
        "post-copy, {} MiB {} guest, 2 vCPUs, {} pre-copy pass(es); floor = bare userfaultfd "
        "round trip (zero installer, host threads)\n"
        "floor     observed p50 {:6.1f} us  p99 {:7.1f} us  (pager service p50 {:.1f} p99 "
        "{:.1f})\n",
        args.mem >> 20, BackingName(args.backing), args.passes, f50, f99, floor->service.p50_us,
        floor->service.p99_us);
    fmt::print(
        "network   observed p50 {:6.1f} us  p99 {:7.1f} us  (handler service p50 {:.1f} p99 "
        "{:.1f}): bare network fault = fault, request over loopback TCP, 4 KiB reply, "
        "UFFDIO_COPY\n",
        n50, n99, network->service.p50_us, network->service.p99_us);
  }
  row("loopback", *loop);
  row("no-fifo", *plain);
  row(fmt::format("link{}us", args.link_us).c_str(), *link);
  return 0;
}

}  // namespace
}  // namespace faultline

int main(int argc, char** argv) { return faultline::Main(argc, argv); }
