// Stream-socket transports: one connection per channel, TCP between hosts
// or Unix-domain on one host (which can also pass file descriptors: a local
// update hands guest RAM to a new process, docs/protocol.md section 11).
// Every socket call of the migration module lives in socket_transport.cc
// (and socket_peer.cc: waiting for input, the peer's credentials).
#pragma once

#include <poll.h>
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <span>
#include <string>

#include "src/migration/transport.h"
#include "src/sys/unique_fd.h"

namespace faultline::migration {

// Who is at the other end of a Unix socket (SO_PEERCRED, as of connect).
struct PeerCredentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

class SocketChannel final : public Channel {
 public:
  // Takes a connected socket (TCP or Unix); applies the I/O timeouts and
  // buffer sizes, and on TCP the link timeout (keepalive, TCP_USER_TIMEOUT).
  static Result<std::unique_ptr<SocketChannel>> Adopt(sys::UniqueFd fd,
                                                      const TransportOptions& options);
  ~SocketChannel() override;

  Status SendGather(std::span<const ConstBuffer> parts) override;
  Status ReceiveScatter(std::span<const MutableBuffer> parts) override;
  void Shutdown() override;
  Status SetLowLatency(bool low_latency) override;  // a no-op on Unix sockets
  Status SendWithFds(ConstBuffer bytes, std::span<const int> fds) override;
  Result<std::vector<sys::UniqueFd>> ReceiveWithFds(MutableBuffer bytes, size_t max_fds) override;
  ChannelStats stats() const override;
  std::string name() const override { return name_; }

  // For peers that send messages of unannounced length (the userfaultfd
  // handshake, docs/page_server.md): one receive of at most bytes.size()
  // bytes, 0 at end of stream, the descriptors that came with them added
  // to `fds` (more than `max_fds` is an error). Unix only.
  Result<size_t> ReceiveSome(MutableBuffer bytes, size_t max_fds, std::vector<sys::UniqueFd>& fds);
  // Waits up to `timeout` until a receive would not block (data, or the
  // peer closed); false on timeout. (socket_peer.cc)
  Result<bool> WaitReadable(std::chrono::milliseconds timeout) const;
  // The same for a send (room in the send buffer, or an error). (socket_peer.cc)
  Result<bool> WaitWritable(std::chrono::milliseconds timeout) const;
  // For a layer that drives the socket itself (TLS, tls_transport.h): its
  // reads and writes return EAGAIN at once instead of blocking, and the
  // layer waits with WaitReadable/WaitWritable. (socket_peer.cc)
  Status SetNonBlocking();
  // The peer of a Unix socket. (socket_peer.cc)
  Result<PeerCredentials> peer_credentials() const;
  // To poll beside other descriptors; owned by the channel.
  int native_fd() const { return fd_.get(); }

 private:
  SocketChannel(sys::UniqueFd fd, std::string name, bool is_unix)
      : fd_(std::move(fd)), name_(std::move(name)), is_unix_(is_unix) {}
  Status IoError(int error, const char* what, uint64_t done, uint64_t total) const;

  // Closed only by the destructor: Shutdown() from another thread must never
  // act on a descriptor number that was closed and reused meanwhile.
  const sys::UniqueFd fd_;
  const std::string name_;
  const bool is_unix_;
  std::atomic<bool> shut_down_{false};
  // Relaxed counters: statistics, not synchronisation.
  std::atomic<uint64_t> bytes_sent_{0};
  std::atomic<uint64_t> bytes_received_{0};
  std::atomic<uint64_t> send_calls_{0};
  std::atomic<uint64_t> receive_calls_{0};
};

// Waits up to `timeout` until `fd` is readable (or its peer closed); false
// on timeout.
Result<bool> PollReadable(int fd, std::chrono::milliseconds timeout);
// Waits up to `timeout` until one of `fds` has one of its events (or an
// error or hang-up); the number of such descriptors, 0 on timeout.
// (socket_peer.cc)
Result<int> PollAny(std::span<pollfd> fds, std::chrono::milliseconds timeout);

// Listens on a TCP address or a Unix socket path; each accepted connection
// is a channel. A Unix socket file is created mode 0600 (only this user may
// connect); a stale one, which nobody listens on any more, is replaced; one
// that a live process listens on is refused. The file is removed when the
// listener goes.
class SocketListener final : public Acceptor {
 public:
  static Result<std::unique_ptr<SocketListener>> Listen(const Address& address,
                                                        const TransportOptions& options);
  ~SocketListener() override;

  Result<std::unique_ptr<Channel>> Accept(std::chrono::milliseconds timeout) override;
  // Accept, as the socket channel it is.
  Result<std::unique_ptr<SocketChannel>> AcceptSocket(std::chrono::milliseconds timeout);
  // With the port actually bound (port 0 asks for any free one).
  std::string address() const override { return bound_.ToString(); }
  // To poll beside other descriptors (readable: a connection waits).
  int native_fd() const { return fd_.get(); }
  const TransportOptions& options() const { return options_; }
  uint16_t port() const { return bound_.port; }
  const Address& bound() const { return bound_; }

 private:
  SocketListener(sys::UniqueFd fd, Address bound, TransportOptions options)
      : fd_(std::move(fd)), bound_(std::move(bound)), options_(options) {}

  sys::UniqueFd fd_;
  uint64_t socket_inode_ = 0;  // unix: the file this listener created
  Address bound_;
  TransportOptions options_;
};

// Opens a new connection to the same address for each channel.
class SocketConnector final : public Connector {
 public:
  SocketConnector(Address address, TransportOptions options)
      : address_(std::move(address)), options_(options) {}
  Result<std::unique_ptr<Channel>> Connect() override;
  // Connect, as the socket channel it is.
  Result<std::unique_ptr<SocketChannel>> ConnectSocket();
  std::string name() const override { return address_.ToString(); }

 private:
  Address address_;
  TransportOptions options_;
};

}  // namespace faultline::migration
