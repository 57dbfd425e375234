#include "src/migration/uffd_backend.h"

#include <cerrno>
#include <utility>

#include "src/migration/socket_transport.h"

namespace faultline::migration {
namespace {

// REMOVE events when the kernel has them (a balloon's discards read as
// zeros); the file-backed MISSING features for memfd and hugetlb blocks.
Result<sys::Userfaultfd> CreateUffd(std::span<const std::shared_ptr<RamBlock>> blocks) {
  uint64_t features = 0;
  for (const auto& b : blocks) {
    if (b->backing() == Backing::kMemfd) features |= sys::kUffdFeatureMissingShmem;
    if (b->backing() == Backing::kHugetlb) features |= sys::kUffdFeatureMissingHugetlbfs;
  }
  auto uffd = sys::Userfaultfd::Create(0, features | sys::kUffdFeatureEventRemove);
  if (uffd.has_value()) return uffd;
  return sys::Userfaultfd::Create(0, features);
}

Result<std::vector<UffdRegion>> Describe(std::span<const std::shared_ptr<RamBlock>> blocks) {
  std::vector<UffdRegion> regions;
  uint64_t offset = 0;
  for (const auto& b : blocks) {
    if (b == nullptr) return Error("uffd backend: no RAM block");
    if (b->backing() == Backing::kGuestMemfd) {
      return Error(
          "uffd backend: block '{}' is guest_memfd, which userfaultfd cannot register; "
          "use anon, memfd or hugetlb",
          b->name());
    }
    regions.push_back({Hva(b->host()).value, b->size(), offset, b->page_size()});
    offset += b->size();
  }
  if (regions.empty()) return Error("uffd backend: no RAM blocks to hand over");
  return regions;
}

}  // namespace

Result<std::unique_ptr<UffdBackend>> ConnectUffdBackend(
    const std::string& socket_path, std::span<const std::shared_ptr<RamBlock>> blocks,
    std::function<void(const Status&)> on_server_lost) {
  std::unique_ptr<UffdBackend> backend(new UffdBackend());
  ASSIGN_OR_RETURN(backend->regions_, Describe(blocks));
  ASSIGN_OR_RETURN(backend->uffd_, CreateUffd(blocks));
  for (const UffdRegion& r : backend->regions_) {
    ASSIGN_OR_RETURN(auto reg, backend->uffd_.Register(Hva(r.base_host_virt_addr), r.size,
                                                       sys::UffdMode::kMissing));
    backend->registrations_.push_back(std::move(reg));
  }
  SocketConnector connector(Address{.scheme = "unix", .host = "", .port = 0, .path = socket_path},
                            TransportOptions{});
  auto channel = connector.Connect();
  if (!channel.has_value()) {
    return Status(channel.error().code(),
                  fmt::format("uffd backend: {} — is the page server running? (`faultline "
                              "serve-pages --socket {} --snapshot DIR`)",
                              channel.error().ToString(), socket_path));
  }
  backend->channel_ = std::move(*channel);
  const std::string message = EncodeUffdHandshake(backend->regions_);
  const int fd = backend->uffd_.fd();
  RETURN_IF_ERROR(
      backend->channel_
          ->SendWithFds({reinterpret_cast<const uint8_t*>(message.data()), message.size()},
                        std::span<const int>(&fd, 1))
          .WithContext("uffd backend: sending the handshake"));
  backend->on_server_lost_ = std::move(on_server_lost);
  backend->watcher_ = std::thread([b = backend.get()] { b->Watch(); });
  return backend;
}

UffdBackend::~UffdBackend() {
  closing_.store(true, std::memory_order_release);
  if (channel_ != nullptr) channel_->Shutdown();
  if (watcher_.joinable()) watcher_.join();
}

void UffdBackend::Watch() {
  uint8_t byte = 0;
  while (true) {
    // The server sends nothing after the handshake: a receive returns only
    // when it goes (or at the I/O timeout, EAGAIN: wait again).
    Status s = channel_->Receive({&byte, 1});
    if (closing_.load(std::memory_order_acquire)) return;
    if (s.ok() || s.code() == EAGAIN) continue;
    lost_.store(true, std::memory_order_release);
    if (on_server_lost_) {
      on_server_lost_(Status(s.code(), fmt::format("the page server is gone ({}): the guest's "
                                                   "missing pages can no longer arrive",
                                                   s.ToString())));
    }
    return;
  }
}

}  // namespace faultline::migration
