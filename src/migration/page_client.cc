#include "src/migration/page_client.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>

#include <nlohmann/json.hpp>

#include "src/paging/foreign_block.h"
#include "src/sys/process.h"
#include "src/sys/userfaultfd.h"

namespace faultline::migration {
namespace {

// Background pushes go in pieces this big, so that Stop() waits for one.
constexpr uint64_t kPushPiece = 2ull << 20;

}  // namespace

PageClient::PageClient(uint64_t id, std::unique_ptr<SocketChannel> socket,
                       std::shared_ptr<const ServedMemory> memory, PageClientOptions options)
    : id_(id),
      socket_(std::move(socket)),
      memory_(std::move(memory)),
      options_(std::move(options)) {
  report_.id = id_;
  wake_ = sys::UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  thread_ = std::thread([this] { Run(); });
}

PageClient::~PageClient() {
  Stop();
  if (thread_.joinable()) thread_.join();
}

void PageClient::Stop() {
  stop_.store(true, std::memory_order_release);
  Wake();
}

void PageClient::Wake() {
  const uint64_t one = 1;
  // An eventfd write of 1 cannot fail short of a bad fd.
  if (wake_.valid()) (void)!::write(wake_.get(), &one, sizeof(one));
}

PageClientReport PageClient::Join() {
  if (thread_.joinable()) thread_.join();
  return report_;
}

void PageClient::Log(const std::string& line) const {
  if (options_.log) options_.log(fmt::format("client {} (pid {}): {}", id_, report_.pid, line));
}

void PageClient::Run() {
  PeerCredentials peer;
  if (auto cred = socket_->peer_credentials(); cred.has_value()) peer = *cred;
  report_.pid = peer.pid;
  report_.uid = peer.uid;
  Log(fmt::format("connected (uid {}, gid {})", peer.uid, peer.gid));
  if (Status served = Serve(peer); !served.ok()) {
    report_.end = served.ToString();
    Log("refused: " + report_.end);
  } else {
    report_.served = true;
    report_.end = Watch();
    stop_.store(true, std::memory_order_release);
    if (prefetch_.joinable()) prefetch_.join();
    pager_->Stop();
    report_.stats = pager_->stats();
  }
  // Every descriptor goes now: the adopted userfaultfd with the pager.
  pager_.reset();
  socket_.reset();
  pidfd_.Reset();
  report_.seconds = std::chrono::duration<double>(Clock::now() - connected_).count();
  finished_.store(true, std::memory_order_release);
}

Status PageClient::Serve(PeerCredentials peer) {
  if (auto pidfd = sys::OpenPidfd(peer.pid); pidfd.has_value()) {
    pidfd_ = std::move(*pidfd);
  } else {
    Log("cannot watch the process (" + pidfd.error().ToString() +
        "): its socket closing will end it");
  }
  std::vector<sys::UniqueFd> fds;
  ASSIGN_OR_RETURN(regions_, ReceiveHandshake(fds));
  ASSIGN_OR_RETURN(sys::Userfaultfd uffd, sys::Userfaultfd::Adopt(std::move(fds[0])));
  paging::PagerOptions options;
  options.queues_per_block = 1;
  options.threads_per_queue = std::max<uint32_t>(options_.threads, 1);
  options.on_error = [this](const Status& error) {
    if (error.code() == ESRCH && !gone_.exchange(true)) Wake();
  };
  ASSIGN_OR_RETURN(pager_, paging::DemandPager::Create(memory_->SourceFor(regions_), options));
  RETURN_IF_ERROR(pager_->AdoptUserfaultfd(std::move(uffd)));
  uint64_t data_bytes = 0;
  for (size_t i = 0; i < regions_.size(); ++i) {
    const UffdRegion& r = regions_[i];
    ASSIGN_OR_RETURN(auto block,
                     paging::ForeignBlock::Create(fmt::format("region{}", i),
                                                  Hva(r.base_host_virt_addr), r.size, r.page_size));
    RETURN_IF_ERROR(pager_->AddAdoptedBlock(block, static_cast<uint32_t>(i),
                                            memory_->ZeroUnits(r.offset, r.size, r.page_size)));
    blocks_.push_back(std::move(block));
    for (const auto& [at, length] : memory_->DataRanges(r.offset, r.size)) data_bytes += length;
    report_.region_bytes += r.size;
  }
  report_.regions = regions_.size();
  RETURN_IF_ERROR(pager_->Start());
  Log(fmt::format("serving {} region(s), {} MiB, {} MiB of data{}", regions_.size(),
                  report_.region_bytes >> 20, data_bytes >> 20,
                  options_.prefetch ? ", prefetching" : ""));
  if (options_.prefetch) prefetch_ = std::thread([this] { Prefetch(); });
  return Status::Ok();
}

Result<std::vector<UffdRegion>> PageClient::ReceiveHandshake(std::vector<sys::UniqueFd>& fds) {
  std::string bytes(kMaxUffdHandshakeBytes, '\0');
  size_t got = 0;
  const auto deadline = Clock::now() + options_.handshake_timeout;
  // One message, its length unannounced: read until it parses as JSON (a
  // VMM sends it with one sendmsg, so normally one read has it all).
  while (got == 0 || !nlohmann::json::accept(bytes.begin(), bytes.begin() + got)) {
    if (stop_.load(std::memory_order_acquire)) return Error("the server is stopping");
    if (Clock::now() >= deadline || got == bytes.size()) break;
    // Once part has come, the rest follows at once or never.
    ASSIGN_OR_RETURN(bool readable,
                     socket_->WaitReadable(std::chrono::milliseconds(got == 0 ? 100 : 250)));
    if (!readable && got > 0) break;
    if (!readable) continue;
    ASSIGN_OR_RETURN(size_t n, socket_->ReceiveSome({reinterpret_cast<uint8_t*>(bytes.data()) + got,
                                                     bytes.size() - got},
                                                    4, fds));
    if (n == 0) break;  // closed: what came is the message
    got += n;
  }
  if (got == 0) {
    return Error("the VMM sent no handshake within {} ms (or closed its socket)",
                 options_.handshake_timeout.count());
  }
  return ParseUffdHandshake(std::string_view(bytes.data(), got), fds.size(), memory_->size());
}

std::string PageClient::Watch() {
  bool socket_open = true;
  while (true) {
    std::array<pollfd, 3> fds = {{{wake_.get(), POLLIN, 0},
                                  {pidfd_.valid() ? pidfd_.get() : -1, POLLIN, 0},
                                  {socket_open ? socket_->native_fd() : -1, POLLIN, 0}}};
    if (::poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, "poll").ToString();
    }
    if (gone_.load(std::memory_order_acquire)) return "its memory is gone (ESRCH): it exited";
    if (stop_.load(std::memory_order_acquire)) return "the server stopped";
    if (fds[1].revents != 0) return "its process exited";
    if (fds[2].revents == 0) continue;
    std::array<uint8_t, 256> sink;
    std::vector<sys::UniqueFd> ignored;
    auto n = socket_->ReceiveSome(sink, 4, ignored);
    if (n.has_value() && *n > 0) continue;  // nothing more is expected: dropped
    if (!pidfd_.valid()) return "its socket closed";
    Log("closed its socket; serving until its process exits");
    socket_open = false;
  }
}

void PageClient::Prefetch() {
  for (const MemoryRange& r : options_.prefetch_first) PushRange(r.offset, r.length);
  for (const UffdRegion& r : regions_) {
    for (const auto& [offset, length] : memory_->DataRanges(r.offset, r.size)) {
      PushRange(offset, length);
    }
  }
}

// Pushes memory bytes [offset, offset + length) into every region that
// maps them; pages present, zero or being fetched are skipped.
void PageClient::PushRange(uint64_t offset, uint64_t length) {
  for (size_t i = 0; i < regions_.size(); ++i) {
    const UffdRegion& r = regions_[i];
    const uint64_t lo = std::max(offset, r.offset);
    const uint64_t hi = std::min(offset + length, r.offset + r.size);
    for (uint64_t at = lo; at < hi; at += kPushPiece) {
      if (stop_.load(std::memory_order_acquire) || gone_.load(std::memory_order_acquire)) return;
      if (Status s = pager_->Push(*blocks_[i], at - r.offset, std::min(kPushPiece, hi - at));
          !s.ok()) {
        return;
      }
    }
  }
}

}  // namespace faultline::migration
