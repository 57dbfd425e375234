// Transport: byte channels between a migration source and destination, and
// the dialling and accepting that creates them. The protocol (wire.h,
// message_io.h) runs on top; a transport knows nothing about messages.
//
// A session uses one main channel (control messages, low latency) and N page
// channels (bulk page data); the handshake (handshake.h) binds them together.
// Implementations: stream sockets, TCP or Unix-domain (socket_transport.h),
// TLS 1.3 over TCP (tls_transport.h), and a wrapper that delays, throttles
// and cuts any other transport for tests (fault_transport.h).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "faultline/status.h"
#include "src/sys/unique_fd.h"

namespace faultline::migration {

class TlsContext;

using ConstBuffer = std::span<const uint8_t>;
using MutableBuffer = std::span<uint8_t>;

struct ChannelStats {
  uint64_t bytes_sent = 0;
  uint64_t bytes_received = 0;
  uint64_t send_calls = 0;     // SendGather calls, not syscalls
  uint64_t receive_calls = 0;  // ReceiveScatter calls
};

// A reliable, ordered, full-duplex byte stream.
//
// Threads: at most one thread sends and at most one thread receives at a
// time (they may be different threads, concurrently); Shutdown() and stats()
// may be called from any thread at any time.
//
// Errors: a failed Send or Receive leaves the channel in an unknown position
// in the stream; the caller must not use that direction again (the protocol
// has no resynchronisation inside a stream; recovery opens new channels).
// End of stream from the peer is an error with code ECONNRESET that says how
// many of the expected bytes arrived. A Receive that gets no byte at all
// within the I/O timeout returns EAGAIN and leaves the channel intact: the
// caller may wait again (a destination waits on the main channel for as
// long as pre-copy takes). Any other timeout (ETIMEDOUT) is final.
class Channel {
 public:
  virtual ~Channel() = default;

  // Sends all bytes of `parts`, in order, as one gather write where the
  // transport allows (a Pages message goes out as header + page spans, with
  // no copy of the page data in user space).
  virtual Status SendGather(std::span<const ConstBuffer> parts) = 0;
  // Receives exactly the total size of `parts`, filling them in order: the
  // caller chooses where each piece lands (a page straight into guest RAM).
  virtual Status ReceiveScatter(std::span<const MutableBuffer> parts) = 0;

  Status Send(ConstBuffer bytes) { return SendGather(std::span<const ConstBuffer>(&bytes, 1)); }
  Status Receive(MutableBuffer bytes) {
    return ReceiveScatter(std::span<const MutableBuffer>(&bytes, 1));
  }

  // Ends both directions now: Send and Receive blocked in other threads
  // return an error, later ones fail at once, and the peer sees end of
  // stream. Idempotent. The channel stays valid until destroyed.
  virtual void Shutdown() = 0;

  // Control and request channels want each small message on the wire at once
  // (TCP_NODELAY); bulk channels want full segments. Default: bulk.
  virtual Status SetLowLatency(bool low_latency) = 0;

  // Unix-domain channels only (others fail with EOPNOTSUPP): `bytes` with
  // the descriptors `fds` attached (SCM_RIGHTS, at most kMaxPassedFds), and
  // its receiving end, which takes exactly `bytes.size()` bytes and the
  // descriptors that came with them (at most `max_fds`: more is an error,
  // and none of them is kept). Received descriptors are close-on-exec.
  virtual Status SendWithFds(ConstBuffer bytes, std::span<const int> fds);
  virtual Result<std::vector<sys::UniqueFd>> ReceiveWithFds(MutableBuffer bytes, size_t max_fds);

  virtual ChannelStats stats() const = 0;
  // For error messages and logs: "tcp 127.0.0.1:40312 -> 127.0.0.1:4444".
  virtual std::string name() const = 0;
};

// Opens channels to one peer (the source side).
class Connector {
 public:
  virtual ~Connector() = default;
  virtual Result<std::unique_ptr<Channel>> Connect() = 0;
  virtual std::string name() const = 0;
};

// Accepts channels from peers (the destination side).
class Acceptor {
 public:
  virtual ~Acceptor() = default;
  // The next incoming channel, or an error after `timeout` (ETIMEDOUT).
  virtual Result<std::unique_ptr<Channel>> Accept(std::chrono::milliseconds timeout) = 0;
  // Where peers connect, in the syntax ParseAddress reads.
  virtual std::string address() const = 0;
};

// Descriptors one SendWithFds may carry (the kernel's SCM_MAX_FD is 253).
inline constexpr size_t kMaxPassedFds = 64;
// sockaddr_un's sun_path holds 108 bytes with the terminating NUL.
inline constexpr size_t kMaxUnixPath = 107;

// A parsed migration address: "tcp" or "unix" (a Unix-domain stream socket
// on this host, for local updates: docs/protocol.md section 11).
struct Address {
  std::string scheme;     // "tcp" or "unix"
  std::string host;       // tcp: a numeric IPv4 or IPv6 address (no brackets)
  uint16_t port = 0;      // tcp: 0 (listening only) asks for any free port
  std::string path = {};  // unix: the socket's file name

  // "tcp:127.0.0.1:4444", "tcp:[::1]:4444", "unix:/run/vm.sock".
  std::string ToString() const;
  bool is_unix() const { return scheme == "unix"; }
};

// Parses "tcp:HOST:PORT" where HOST is a numeric IPv4 address, a bracketed
// numeric IPv6 address, or "localhost" (taken as 127.0.0.1), or
// "unix:PATH" (a path of 1..107 bytes). Host names are refused rather than
// resolved, so that an address never depends on DNS.
Result<Address> ParseAddress(std::string_view text);

// Transport-independent options.
struct TransportOptions {
  // A Send or Receive that makes no progress for this long fails (ETIMEDOUT)
  // instead of hanging on a peer that went silent.
  std::chrono::milliseconds io_timeout{60'000};
  std::chrono::milliseconds connect_timeout{10'000};
  // TCP only: how long the link may be dead before every channel over it
  // fails (ETIMEDOUT), whether this side has data in flight (TCP_USER_TIMEOUT:
  // unacknowledged for this long) or is idle, waiting (keepalive probes from a
  // third of it, every sixth of it, none answered for this long). A link cut
  // in the kernel (a cable, `ip link set down`) breaks no connection by
  // itself; this is how both ends of a post-copy migration notice and pause
  // for `migrate-resume`. Probes are answered by the peer's kernel, so a slow
  // peer process or a slow link never trips it; a link that acknowledges
  // nothing for this long does. Whole seconds of at least 1 s for the probes.
  std::chrono::milliseconds link_timeout{30'000};
  // SO_SNDBUF / SO_RCVBUF for page channels; 0 keeps the kernel's autotuning.
  int socket_buffer_bytes = 0;
  // Non-null: every TCP channel is TLS 1.3 with both ends' certificates
  // checked (tls_transport.h); a TLS handshake takes at most
  // connect_timeout. Null: plaintext, with or without the pre-shared key of
  // the handshake (docs/protocol.md section 8).
  std::shared_ptr<TlsContext> tls;
  // Connections an acceptor refused before they became a channel (a failed
  // TLS handshake): one line each, saying who and why. Null: not said.
  std::function<void(const std::string&)> on_refused;
};

Result<std::unique_ptr<Connector>> MakeConnector(const Address& address,
                                                 const TransportOptions& options);
Result<std::unique_ptr<Acceptor>> MakeAcceptor(const Address& address,
                                               const TransportOptions& options);
// Whether `options` can be used for `address` (TLS is for tcp: only); the
// two above check it.
Status CheckTls(const Address& address, const TransportOptions& options);

}  // namespace faultline::migration
