// Page server throughput: faults served per second by the page server
// (PageServer + ConnectUffdBackend, the code `faultline serve-pages` runs)
// against the bare userfaultfd floor measured in the same run: one trivial
// handler thread that reads each fault and answers UFFDIO_COPY from one
// static page (data) or UFFDIO_ZEROPAGE (holes), nothing else.
//
//   faultline_bench_page_server [--mib 64] [--repeat 3] [--threads 1]
//
// One thread touches every page of the blocks once (each touch is one
// fault); the figure is pages / time, best of --repeat runs. The snapshot is
// written first: all data pages ("data"), or all holes ("zero").
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "src/memory/guest_memory.h"
#include "src/memory/memslot_backend.h"
#include "src/migration/memory_vm.h"
#include "src/migration/page_server.h"
#include "src/migration/snapshot.h"
#include "src/migration/uffd_backend.h"

namespace faultline {
namespace {

using Clock = std::chrono::steady_clock;

// A VM with no vCPUs or devices: enough for the snapshot writer.
class NoVm final : public migration::VmControl {
 public:
  uint32_t vcpu_count() const override { return 0; }
  void Pause() override {}
  void Resume() override {}
  Result<std::vector<std::vector<uint8_t>>> SaveVcpus() override {
    return std::vector<std::vector<uint8_t>>{};
  }
  Status LoadVcpus(std::span<const std::vector<uint8_t>>) override { return Status::Ok(); }
  Result<std::vector<migration::DeviceBlob>> SaveDevices() override {
    return std::vector<migration::DeviceBlob>{};
  }
  Status LoadDevices(std::span<const migration::DeviceBlob>) override { return Status::Ok(); }
  bool memory_is_zero() const override { return true; }
  void AttachPager(paging::GuestPager*) override {}
  Status PrepareVcpus(paging::GuestPager&) override { return Status::Ok(); }
  Status Start() override { return Status::Ok(); }
};

void Check(const Status& s, const char* what) {
  if (s.ok()) return;
  fmt::print(stderr, "page_server_bench: {}: {}\n", what, s.ToString());
  std::exit(1);
}

// A snapshot of one block of `bytes`, every page data (or every page zero).
void WriteSnapshot(const std::string& dir, uint64_t bytes, bool data) {
  VmmOwnedMemslots memslots;
  auto memory = GuestMemory::Create(&memslots, {.dirty_mode = DirtyLogMode::kUffdWp});
  Check(memory.has_value() ? Status::Ok() : memory.error(), "guest memory");
  auto block = RamBlock::Create({.name = "ram0", .size = bytes});
  Check(block.has_value() ? Status::Ok() : block.error(), "block");
  if (data) {
    for (uint64_t at = 0; at < bytes; at += kPageSize) (*block)->host()[at] = 1 + at % 251;
  }
  Check((*memory)->Place(*block, Gpa(uint64_t{0})), "place");
  auto vm = migration::MakeMemorySource(**memory, std::make_unique<NoVm>());
  migration::SnapshotOptions options;
  options.live = false;
  options.resume = false;
  auto stats = migration::WriteSnapshot(*vm, dir, options);
  Check(stats.has_value() ? Status::Ok() : stats.error(), "write snapshot");
}

// Touches every page of `block` from a new thread; pages per second.
double Touch(const RamBlock& block) {
  double rate = 0;
  std::thread([&] {
    const auto start = Clock::now();
    uint64_t sum = 0;
    for (uint64_t at = 0; at < block.size(); at += kPageSize) {
      sum += *reinterpret_cast<const volatile uint8_t*>(block.host() + at);
    }
    const double s = std::chrono::duration<double>(Clock::now() - start).count();
    rate = static_cast<double>(block.pages()) / s + static_cast<double>(sum & 0);
  }).join();
  return rate;
}

std::shared_ptr<RamBlock> FreshBlock(uint64_t bytes) {
  auto block = RamBlock::Create({.name = "vmm", .size = bytes});
  Check(block.has_value() ? Status::Ok() : block.error(), "block");
  return *block;
}

// The floor: one handler thread, UFFDIO_COPY of a static page or
// UFFDIO_ZEROPAGE, on a userfaultfd of this process.
double Floor(uint64_t bytes, bool data) {
  auto block = FreshBlock(bytes);
  auto uffd = sys::Userfaultfd::Create(O_NONBLOCK, 0);
  Check(uffd.has_value() ? Status::Ok() : uffd.error(), "userfaultfd");
  auto reg = uffd->Register(Hva(block->host()), bytes, sys::UffdMode::kMissing);
  Check(reg.has_value() ? Status::Ok() : reg.error(), "register");
  std::atomic<bool> stop{false};
  alignas(4096) static uint8_t page[4096] = {1};
  std::thread handler([&] {
    std::array<sys::UffdMessage, 32> msgs;
    while (!stop.load(std::memory_order_relaxed)) {
      if (!uffd->WaitReadable(50).value_or(false)) continue;
      const size_t n = uffd->ReadEvents(msgs).value_or(0);
      for (size_t i = 0; i < n; ++i) {
        const Hva at(msgs[i].fault_address().value & ~(kPageSize - 1));
        (void)(data ? uffd->Copy(at, page, kPageSize) : uffd->ZeroPage(at, kPageSize));
      }
    }
  });
  const double rate = Touch(*block);
  stop = true;
  handler.join();
  return rate;
}

// The page server over `dir`, one VMM (this process) touching its block.
double Served(const std::string& dir, const std::string& socket, uint64_t bytes, uint32_t threads) {
  auto reader = migration::SnapshotReader::Open(dir);
  Check(reader.has_value() ? Status::Ok() : reader.error(), "open snapshot");
  auto memory = migration::ServedMemory::FromSnapshot(*reader);
  Check(memory.has_value() ? Status::Ok() : memory.error(), "served memory");
  migration::PageServerOptions options;
  options.socket_path = socket;
  options.client.threads = threads;
  auto server = migration::PageServer::Start(*memory, options);
  Check(server.has_value() ? Status::Ok() : server.error(), "page server");
  auto block = FreshBlock(bytes);
  std::vector<std::shared_ptr<RamBlock>> blocks = {block};
  auto backend = migration::ConnectUffdBackend(socket, blocks, nullptr);
  Check(backend.has_value() ? Status::Ok() : backend.error(), "backend");
  while ((*server)->active_clients() == 0)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the handshake is served
  const double rate = Touch(*block);
  backend->reset();
  (*server)->Stop();
  return rate;
}

}  // namespace
}  // namespace faultline

int main(int argc, char** argv) {
  using namespace faultline;
  uint64_t mib = 64;
  uint32_t repeat = 3, threads = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--mib") mib = std::strtoull(argv[i + 1], nullptr, 0);
    if (k == "--repeat") repeat = static_cast<uint32_t>(std::strtoul(argv[i + 1], nullptr, 0));
    if (k == "--threads") threads = static_cast<uint32_t>(std::strtoul(argv[i + 1], nullptr, 0));
  }
  const uint64_t bytes = mib << 20;
  char tmpl[] = "/tmp/faultline-pagebench-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) return 1;
  const std::string root = tmpl;
  fmt::print("page server vs userfaultfd floor: {} MiB, {} handler thread(s), best of {}\n", mib,
             threads, repeat);
  for (bool data : {true, false}) {
    const std::string dir = root + (data ? "/data" : "/zero");
    WriteSnapshot(dir, bytes, data);
    double floor = 0, served = 0;
    for (uint32_t r = 0; r < repeat; ++r) {
      floor = std::max(floor, Floor(bytes, data));
      served = std::max(served, Served(dir, root + "/s.sock", bytes, threads));
    }
    fmt::print(
        "{:5} pages: floor ({}) {:9.0f} faults/s, serve-pages {:9.0f} faults/s, ratio "
        "{:.2f}\n",
        data ? "data" : "zero", data ? "UFFDIO_COPY" : "UFFDIO_ZEROPAGE", floor, served,
        served / floor);
  }
  std::filesystem::remove_all(root);
  return 0;
}
