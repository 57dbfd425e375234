// The VMM's side of the page server (docs/page_server.md): its guest RAM
// is demand-paged by another process. ConnectUffdBackend creates a
// userfaultfd (with UFFD_FEATURE_EVENT_REMOVE where the kernel has it),
// registers each block's host() range (MISSING), connects to the server's
// Unix socket and sends Firecracker's handshake (regions back to back in
// block order: block i's offset is the sum of the sizes before it, which
// is how the server lays out a snapshot's blocks) with the userfaultfd
// attached. From then on a fault on a block is served by the server.
//
//   auto backend = ConnectUffdBackend("/run/pages.sock", vm.blocks(),
//       [](const Status& why) { fmt::print(stderr, "{}\n", why); _exit(1); });
//
// The backend watches the socket: if the server goes (end of stream,
// reset), `on_server_lost` is called once, on the watcher's thread, at once
// (a Unix socket's end is seen as soon as the process dies). A VMM should
// then stop: its guest would otherwise wait forever on the next missing
// page. The backend keeps the VMM's copy of the userfaultfd open while it
// lives: were every copy closed, the kernel would drop the registrations
// and the guest would read zeros instead of its memory, silently.
//
// The blocks must be fresh (nothing written yet: a present page never
// faults) and stay mapped while the backend lives; anon, memfd or hugetlb.
#pragma once

#include <functional>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "faultline/ram_block.h"
#include "faultline/status.h"
#include "src/migration/transport.h"
#include "src/migration/uffd_handshake.h"
#include "src/sys/userfaultfd.h"

namespace faultline::migration {

class UffdBackend {
 public:
  ~UffdBackend();  // stops watching (no callback after it returns)
  UffdBackend(const UffdBackend&) = delete;
  UffdBackend& operator=(const UffdBackend&) = delete;

  const std::vector<UffdRegion>& regions() const { return regions_; }
  const sys::Userfaultfd& uffd() const { return uffd_; }
  bool server_lost() const { return lost_.load(std::memory_order_acquire); }

 private:
  friend Result<std::unique_ptr<UffdBackend>> ConnectUffdBackend(
      const std::string&, std::span<const std::shared_ptr<RamBlock>>,
      std::function<void(const Status&)>);
  UffdBackend() = default;
  void Watch();

  sys::Userfaultfd uffd_;
  std::vector<sys::UffdRegistration> registrations_;
  std::vector<UffdRegion> regions_;
  std::unique_ptr<Channel> channel_;
  std::function<void(const Status&)> on_server_lost_;
  std::atomic<bool> closing_{false};
  std::atomic<bool> lost_{false};
  std::thread watcher_;
};

// Registers `blocks` on a new userfaultfd and hands it to the page server
// at `socket_path`. Errors say what to do (no server there: start
// `faultline serve-pages --socket PATH --snapshot DIR`).
Result<std::unique_ptr<UffdBackend>> ConnectUffdBackend(
    const std::string& socket_path, std::span<const std::shared_ptr<RamBlock>> blocks,
    std::function<void(const Status&)> on_server_lost);

}  // namespace faultline::migration
