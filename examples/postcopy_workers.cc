// A VMM that is not Faultline's, live-migrating with post-copy.
//
// The "guest" is a memfd region that worker threads (its "vCPUs") keep
// writing. This program forks: the child is the destination VMM, the
// parent the source. The source migrates while the workers write; after a
// pre-copy pass it switches over, and the destination's workers resume
// from the state they were given while their memory still arrives on
// demand. Both ends then hash the whole region: the source's (paused since
// the switchover) and the destination's as it was when its workers took
// over must be equal, and every page must hold what its worker last wrote.
//
// Built against the installed package only (find_package(faultline)).
//   postcopy_workers [MiB]       exit 0: verified
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <faultline/embed.h>

namespace {

constexpr uint32_t kWorkers = 3;
constexpr uint64_t kPage = 4096;
constexpr uint64_t kMagic = 0x6b726f77'6c6e7466;  // "ftnlwork"

// Each page a worker writes starts with this.
struct Stamp {
  uint64_t magic;
  uint64_t page;
  uint64_t worker;
  uint64_t sweep;  // how many times the worker has gone over its share
};

// What a worker is doing: its vCPU state, carried by the migration.
struct WorkerState {
  uint64_t sweep = 1;
  uint64_t next = 0;  // the next page of its share to write
};

class Vmm : public faultline::VmHandle {
 public:
  Vmm(uint8_t* memory, uint64_t size) : memory_(memory), size_(size) {}
  ~Vmm() override { Stop(); }

  void RunWorkers() {
    for (uint32_t w = 0; w < kWorkers; ++w) threads_.emplace_back([this, w] { Work(w); });
  }
  void Stop() {
    if (runner_.joinable()) runner_.join();
    stop_ = true;
    for (auto& t : threads_) t.join();
    threads_.clear();
  }

  uint32_t vcpu_count() const override { return kWorkers; }
  void Pause() override {
    paused_ = true;
    while (parked_ < static_cast<int>(threads_.size())) std::this_thread::yield();
  }
  void Resume() override { paused_ = false; }
  faultline::Result<std::vector<uint8_t>> SaveVcpu(uint32_t index) override {
    std::vector<uint8_t> blob(sizeof(WorkerState));
    std::memcpy(blob.data(), &state_[index], sizeof(WorkerState));
    return blob;
  }
  faultline::Status LoadVcpu(uint32_t index, std::span<const uint8_t> blob) override {
    if (blob.size() != sizeof(WorkerState)) {
      return faultline::Error("worker {}: a state of {} bytes", index, blob.size());
    }
    std::memcpy(&state_[index], blob.data(), sizeof(WorkerState));
    return faultline::Status::Ok();
  }
  // The guest runs here from now on, on its own thread: what it reads or
  // writes may not have arrived yet; its accesses fault and Faultline
  // serves them. First it checks every page (the state the source left),
  // then the workers go on from their loaded state.
  faultline::Status Start() override {
    runner_ = std::thread([this] {
      snapshot_ = Hash();
      verified_ = Verify();
      RunWorkers();
    });
    return faultline::Status::Ok();
  }

  // FNV-1a over the whole region.
  uint64_t Hash() const {
    uint64_t h = 1469598103934665603ull;
    for (uint64_t i = 0; i < size_; ++i) h = (h ^ memory_[i]) * 1099511628211ull;
    return h;
  }
  // Every page a worker has written holds its stamp, of the sweep its
  // state says (the pages before `next` this sweep, the rest the last).
  bool Verify() const {
    const uint64_t pages = size_ / kPage / kWorkers;
    for (uint32_t w = 0; w < kWorkers; ++w) {
      for (uint64_t i = 0; i < pages; ++i) {
        const uint64_t page = w * pages + i;
        Stamp s;
        std::memcpy(&s, memory_ + page * kPage, sizeof(s));
        const uint64_t want = i < state_[w].next ? state_[w].sweep : state_[w].sweep - 1;
        if (want == 0 ? s.magic != 0
                      : (s.magic != kMagic || s.page != page || s.worker != w || s.sweep != want)) {
          std::fprintf(stderr, "page %llu: sweep %llu, expected %llu\n",
                       static_cast<unsigned long long>(page),
                       static_cast<unsigned long long>(s.sweep),
                       static_cast<unsigned long long>(want));
          return false;
        }
      }
    }
    return true;
  }
  uint64_t snapshot() const { return snapshot_; }
  bool verified() const { return verified_; }

 private:
  void Work(uint32_t w) {
    const uint64_t pages = size_ / kPage / kWorkers;
    WorkerState& st = state_[w];
    while (!stop_) {
      if (paused_) {
        ++parked_;
        while (paused_ && !stop_) std::this_thread::yield();
        --parked_;
        continue;
      }
      const uint64_t page = w * pages + st.next;
      const Stamp s{kMagic, page, w, st.sweep};
      std::memcpy(memory_ + page * kPage, &s, sizeof(s));
      if (++st.next == pages) {
        st.next = 0;
        ++st.sweep;
      }
    }
  }

  uint8_t* const memory_;
  const uint64_t size_;
  WorkerState state_[kWorkers];
  std::vector<std::thread> threads_;
  std::thread runner_;
  std::atomic<bool> stop_{false}, paused_{false};
  std::atomic<int> parked_{0};
  uint64_t snapshot_ = 0;
  bool verified_ = false;
};

struct Region {
  int fd;
  uint8_t* host;
};

Region MapRegion(uint64_t size) {
  const int fd = memfd_create("guest-ram", MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, static_cast<off_t>(size)) != 0) std::exit(2);
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) std::exit(2);
  return {fd, static_cast<uint8_t*>(p)};
}

std::vector<faultline::GuestRegion> Describe(const Region& r, uint64_t size) {
  faultline::RamBlockOptions o;
  o.name = "ram";
  o.size = size;
  o.backing = faultline::Backing::kMemfd;
  o.adopt_fd = r.fd;  // the block maps it again as its alias
  o.host = r.host;    // what the workers use
  auto block = faultline::RamBlock::Create(o);
  if (!block.has_value()) {
    std::fprintf(stderr, "%s\n", block.error().ToString().c_str());
    std::exit(2);
  }
  return {{*block, 0}};
}

int Fail(const char* who, const faultline::Status& status) {
  std::fprintf(stderr, "%s: %s\n", who, status.ToString().c_str());
  return 1;
}

faultline::MigrationOptions Options() {
  faultline::MigrationOptions o;
  o.postcopy = true;
  o.precopy_passes = 1;
  o.key = "an example secret, 32 bytes long";
  return o;
}

int Destination(uint64_t size, int to_parent) {
  Region r = MapRegion(size);
  Vmm vmm(r.host, size);
  auto incoming = faultline::IncomingMigration::Create(vmm, Describe(r, size), Options());
  if (!incoming.has_value()) return Fail("destination", incoming.error());
  auto bound = (*incoming)->Listen("tcp:127.0.0.1:0");
  if (!bound.has_value()) return Fail("destination", bound.error());
  (void)!write(to_parent, bound->c_str(), bound->size() + 1);
  auto stats = (*incoming)->Run();
  if (!stats.has_value()) return Fail("destination", stats.error());
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the workers go on here
  vmm.Stop();
  std::printf(
      "destination: %u pre-copy pass(es), %llu faults (p50 %.0f us, p99 %.0f us), "
      "%llu pages pushed, post-copy %.1f ms; pages %s\n",
      stats->passes, static_cast<unsigned long long>(stats->faults), stats->fault_p50_us,
      stats->fault_p99_us, static_cast<unsigned long long>(stats->pages_pushed),
      stats->postcopy_us / 1000.0, vmm.verified() ? "verified" : "WRONG");
  const uint64_t h = vmm.snapshot();
  (void)!write(to_parent, &h, sizeof(h));
  return vmm.verified() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t size = (argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 64) << 20;
  int pipe_fds[2];
  if (pipe(pipe_fds) != 0) return 2;
  const pid_t child = fork();
  if (child == 0) {
    close(pipe_fds[0]);
    const int status = Destination(size, pipe_fds[1]);
    std::fflush(stdout);
    _exit(status);
  }
  close(pipe_fds[1]);
  char address[128] = {};
  for (size_t n = 0; n < sizeof(address) - 1;) {
    if (read(pipe_fds[0], address + n, 1) != 1) return 2;
    if (address[n++] == '\0') break;
  }

  Region r = MapRegion(size);
  Vmm vmm(r.host, size);
  auto outgoing = faultline::OutgoingMigration::Create(vmm, Describe(r, size), Options());
  if (!outgoing.has_value()) return Fail("source", outgoing.error());
  vmm.RunWorkers();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  auto stats = (*outgoing)->Run(address);
  if (!stats.has_value()) return Fail("source", stats.error());
  vmm.Stop();  // paused since the switchover: the memory is what was sent
  const uint64_t here = vmm.Hash();
  uint64_t there = 0;
  const bool got = read(pipe_fds[0], &there, sizeof(there)) == sizeof(there);
  int status = 0;
  waitpid(child, &status, 0);
  std::printf(
      "source: %llu MiB, %llu pages pushed, %llu requested, paused %.2f ms, total "
      "%.1f ms; memory %s\n",
      static_cast<unsigned long long>(size >> 20),
      static_cast<unsigned long long>(stats->pages_pushed),
      static_cast<unsigned long long>(stats->pages_requested), stats->downtime_us / 1000.0,
      stats->total_us / 1000.0, got && here == there ? "identical" : "DIFFERS");
  return got && here == there && WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
