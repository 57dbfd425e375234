#include "src/migration/tls_transport.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509_vfy.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <list>
#include <optional>
#include <vector>

#include "src/migration/socket_transport.h"
#include "src/sys/process.h"

namespace faultline::migration {
namespace {

using Clock = std::chrono::steady_clock;

// The largest TLS record's payload: a send fills records of this size.
constexpr size_t kRecordBytes = 16384;
// Handshakes the acceptor carries at once. A connection beyond them drops
// the oldest (memory stays bounded under a flood of silent peers, and a
// good peer that comes after a burst of them is not kept waiting).
constexpr size_t kMaxPendingHandshakes = 16;

struct SslFree {
  void operator()(SSL* ssl) const { SSL_free(ssl); }
};
using SslPtr = std::unique_ptr<SSL, SslFree>;

std::chrono::milliseconds Left(Clock::time_point deadline) {
  return std::max(std::chrono::milliseconds(0),
                  std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
}

bool Contains(const std::string& text, const char* part) {
  return text.find(part) != std::string::npos;
}

// What a failed TLS step means for the operator. `errors` is TakeTlsErrors()
// after it, `verify` the certificate check's result.
std::string Explain(const std::string& errors, long verify, int saved_errno,
                    const TlsContext& tls) {
  if (verify != X509_V_OK) {
    std::string why = X509_verify_cert_error_string(verify);
    if (verify == X509_V_ERR_HOSTNAME_MISMATCH || verify == X509_V_ERR_IP_ADDRESS_MISMATCH) {
      return fmt::format("the peer's certificate does not name '{}' (the expected peer name)",
                         tls.peer_name());
    }
    return fmt::format(
        "the peer's certificate failed verification ({}): it is not signed by {}/ca.pem, or "
        "has expired; both ends need certificates from the same CA",
        why, tls.dir());
  }
  if (Contains(errors, "wrong version number") || Contains(errors, "packet length too long") ||
      Contains(errors, "http request") || Contains(errors, "unknown protocol") ||
      Contains(errors, "record layer failure")) {
    return fmt::format("the peer does not speak TLS ({}): give it the TLS directory (--tls-dir)",
                       errors);
  }
  if (Contains(errors, "bad record mac") || Contains(errors, "decrypt")) {
    return fmt::format(
        "a TLS record failed its integrity check ({}): a replayed or tampered handshake", errors);
  }
  if (Contains(errors, "peer did not return a certificate") ||
      Contains(errors, "certificate required")) {
    return fmt::format("no certificate from the peer ({}): both ends need --tls-dir", errors);
  }
  if (Contains(errors, "alert")) {
    return fmt::format(
        "the peer refused this side's certificate ({}): is {}/cert.pem signed by the CA the "
        "peer trusts?",
        errors, tls.dir());
  }
  if (errors.empty() || Contains(errors, "unexpected eof")) {
    if (saved_errno != 0 && saved_errno != ECONNRESET && saved_errno != EPIPE) {
      return fmt::format("{} in the TLS handshake", std::strerror(saved_errno));
    }
    return "the peer closed the connection in the TLS handshake: does it use TLS (--tls-dir), "
           "and does it accept this side's certificate?";
  }
  return errors;
}

// One step of a non-blocking handshake: done, a wait for the socket, or a
// refusal that says why.
struct HandshakeStep {
  bool done = false;
  bool want_write = false;
  std::optional<std::string> refused;
};

HandshakeStep StepHandshake(SSL* ssl, const TlsContext& tls) {
  ERR_clear_error();
  errno = 0;
  sys::ScopedSigpipeBlock no_sigpipe;
  const int r = SSL_do_handshake(ssl);
  if (r == 1) return HandshakeStep{.done = true, .want_write = false, .refused = {}};
  const int err = SSL_get_error(ssl, r);
  if (err == SSL_ERROR_WANT_READ) return HandshakeStep{};
  if (err == SSL_ERROR_WANT_WRITE)
    return HandshakeStep{.done = false, .want_write = true, .refused = {}};
  const int saved_errno = err == SSL_ERROR_SYSCALL ? errno : 0;
  return HandshakeStep{.refused =
                           Explain(TakeTlsErrors(), SSL_get_verify_result(ssl), saved_errno, tls)};
}

// A TLS connection over a non-blocking socket. OpenSSL's SSL object is not
// safe for a reader and a writer at once, which Channel allows: every SSL
// call takes mu_ and returns at once (the socket never blocks), and the
// waits for the socket happen outside the lock, so a receive waiting for
// data never holds up a send.
class TlsChannel final : public Channel {
 public:
  TlsChannel(std::unique_ptr<SocketChannel> socket, SslPtr ssl,
             std::chrono::milliseconds io_timeout)
      : socket_(std::move(socket)),
        name_(socket_->name() + " (TLS)"),
        io_timeout_(io_timeout),
        ssl_(std::move(ssl)) {}

  Status SendGather(std::span<const ConstBuffer> parts) override;
  Status ReceiveScatter(std::span<const MutableBuffer> parts) override;
  void Shutdown() override {
    shut_down_.store(true, std::memory_order_release);
    socket_->Shutdown();  // wakes waits in other threads
  }
  Status SetLowLatency(bool low_latency) override { return socket_->SetLowLatency(low_latency); }
  ChannelStats stats() const override {
    return ChannelStats{bytes_sent_.load(std::memory_order_relaxed),
                        bytes_received_.load(std::memory_order_relaxed),
                        send_calls_.load(std::memory_order_relaxed),
                        receive_calls_.load(std::memory_order_relaxed)};
  }
  std::string name() const override { return name_; }

 private:
  // One SSL_write_ex/SSL_read_ex under mu_.
  struct Io {
    size_t bytes = 0;
    int error = SSL_ERROR_NONE;  // SSL_get_error's
    std::string why;             // for a fatal error
    int saved_errno = 0;
  };
  Io Call(bool write, uint8_t* data, size_t size);
  Status Transfer(bool write, uint8_t* data, size_t size, uint64_t& done, uint64_t total,
                  Clock::time_point& progress_at);
  Status WriteAll(const uint8_t* data, size_t size, uint64_t& done, uint64_t total) {
    auto progress_at = Clock::now();
    return Transfer(true, const_cast<uint8_t*>(data), size, done, total, progress_at);
  }
  Status Failed(const Io& io, const char* what, uint64_t done, uint64_t total) const;

  const std::unique_ptr<SocketChannel> socket_;
  const std::string name_;
  const std::chrono::milliseconds io_timeout_;
  sys::Mutex mu_;
  const SslPtr ssl_ PT_GUARDED_BY(mu_);
  std::atomic<bool> shut_down_{false};
  std::atomic<uint64_t> bytes_sent_{0};
  std::atomic<uint64_t> bytes_received_{0};
  std::atomic<uint64_t> send_calls_{0};
  std::atomic<uint64_t> receive_calls_{0};
};

TlsChannel::Io TlsChannel::Call(bool write, uint8_t* data, size_t size) {
  Io io;
  sys::MutexLock lock(mu_);
  ERR_clear_error();
  errno = 0;
  const int r = write ? SSL_write_ex(ssl_.get(), data, size, &io.bytes)
                      : SSL_read_ex(ssl_.get(), data, size, &io.bytes);
  if (r == 1) return io;
  io.error = SSL_get_error(ssl_.get(), r);
  if (io.error == SSL_ERROR_SYSCALL) io.saved_errno = errno;
  if (io.error != SSL_ERROR_WANT_READ && io.error != SSL_ERROR_WANT_WRITE) io.why = TakeTlsErrors();
  return io;
}

Status TlsChannel::Failed(const Io& io, const char* what, uint64_t done, uint64_t total) const {
  if (shut_down_.load(std::memory_order_acquire)) {
    return Status(ESHUTDOWN, fmt::format("{}: {} after {} of {} bytes: channel shut down", name_,
                                         what, done, total));
  }
  const bool closed =
      io.error == SSL_ERROR_ZERO_RETURN ||
      (io.error == SSL_ERROR_SYSCALL &&
       (io.saved_errno == 0 || io.saved_errno == EPIPE || io.saved_errno == ECONNRESET));
  if (closed) {
    return Status(ECONNRESET, fmt::format("{}: connection closed by the peer after {} of {} bytes",
                                          name_, done, total));
  }
  if (io.error == SSL_ERROR_SYSCALL) {
    return ErrnoError(io.saved_errno, "{}: {} ({} of {} bytes done)", name_, what, done, total);
  }
  // A record that fails its check (tampering on the path) or an alert.
  return Status(EPROTO, fmt::format("{}: TLS {} failed after {} of {} bytes: {}", name_, what, done,
                                    total, io.why.empty() ? "unknown TLS error" : io.why));
}

// Moves `size` bytes between `data` and the connection, waiting for the
// socket as OpenSSL asks; a direction fails once nothing moved for
// io_timeout_, except that a receive that has moved nothing at all returns
// EAGAIN (the stream position is intact, see Channel).
Status TlsChannel::Transfer(bool write, uint8_t* data, size_t size, uint64_t& done, uint64_t total,
                            Clock::time_point& progress_at) {
  const char* what = write ? "send" : "receive";
  size_t off = 0;
  while (off < size) {
    if (shut_down_.load(std::memory_order_acquire)) return Failed(Io{}, what, done, total);
    // SSL_write_ex wants the same arguments again after a WANT_*.
    const Io io = Call(write, data + off, size - off);
    if (io.error == SSL_ERROR_NONE) {
      off += io.bytes;
      done += io.bytes;
      (write ? bytes_sent_ : bytes_received_).fetch_add(io.bytes, std::memory_order_relaxed);
      progress_at = Clock::now();
      continue;
    }
    if (io.error != SSL_ERROR_WANT_READ && io.error != SSL_ERROR_WANT_WRITE) {
      return Failed(io, what, done, total);
    }
    const auto left = Left(progress_at + io_timeout_);
    Result<bool> ready = io.error == SSL_ERROR_WANT_WRITE ? socket_->WaitWritable(left)
                                                          : socket_->WaitReadable(left);
    if (!ready.has_value()) return ready.error();
    if (shut_down_.load(std::memory_order_acquire)) return Failed(io, what, done, total);
    if (*ready) continue;
    if (!write && done == 0) {
      return Status(EAGAIN, fmt::format("{}: nothing received within the I/O timeout", name_));
    }
    return Status(ETIMEDOUT, fmt::format("{}: {} made no progress within the I/O timeout ({} of "
                                         "{} bytes done)",
                                         name_, what, done, total));
  }
  return Status::Ok();
}

Status TlsChannel::SendGather(std::span<const ConstBuffer> parts) {
  send_calls_.fetch_add(1, std::memory_order_relaxed);
  uint64_t total = 0, done = 0;
  for (const ConstBuffer& p : parts) total += p.size();
  // write() on a socket the peer closed raises SIGPIPE (OpenSSL cannot ask
  // for MSG_NOSIGNAL): it must fail with EPIPE instead.
  sys::ScopedSigpipeBlock no_sigpipe;
  // Small parts (headers) are gathered into full records; a large part
  // goes out from where it is, a record at a time.
  std::array<uint8_t, kRecordBytes> staging;
  size_t staged = 0;
  for (const ConstBuffer& part : parts) {
    size_t off = 0;
    while (off < part.size()) {
      if (staged == 0 && part.size() - off >= kRecordBytes) {
        const size_t n = (part.size() - off) / kRecordBytes * kRecordBytes;
        RETURN_IF_ERROR(WriteAll(part.data() + off, n, done, total));
        off += n;
        continue;
      }
      const size_t n = std::min(part.size() - off, kRecordBytes - staged);
      std::memcpy(staging.data() + staged, part.data() + off, n);
      staged += n;
      off += n;
      if (staged == kRecordBytes) {
        RETURN_IF_ERROR(WriteAll(staging.data(), staged, done, total));
        staged = 0;
      }
    }
  }
  if (staged > 0) RETURN_IF_ERROR(WriteAll(staging.data(), staged, done, total));
  return Status::Ok();
}

Status TlsChannel::ReceiveScatter(std::span<const MutableBuffer> parts) {
  receive_calls_.fetch_add(1, std::memory_order_relaxed);
  uint64_t total = 0, done = 0;
  for (const MutableBuffer& p : parts) total += p.size();
  sys::ScopedSigpipeBlock no_sigpipe;  // a read may write (a TLS alert)
  auto progress_at = Clock::now();
  for (const MutableBuffer& part : parts) {
    RETURN_IF_ERROR(Transfer(false, part.data(), part.size(), done, total, progress_at));
  }
  return Status::Ok();
}

// Makes the channel once the handshake is done, and counts it.
std::unique_ptr<Channel> Established(std::unique_ptr<SocketChannel> socket, SslPtr ssl,
                                     TlsContext& tls, const TransportOptions& options) {
  tls.CountHandshake(SSL_get_version(ssl.get()), SSL_get_cipher_name(ssl.get()),
                     BIO_get_ktls_send(SSL_get_wbio(ssl.get())) == 1,
                     BIO_get_ktls_recv(SSL_get_rbio(ssl.get())) == 1);
  return std::make_unique<TlsChannel>(std::move(socket), std::move(ssl), options.io_timeout);
}

Result<SslPtr> NewSsl(TlsContext& tls, SocketChannel& socket, bool server) {
  RETURN_IF_ERROR(socket.SetNonBlocking());
  SslPtr ssl(SSL_new(tls.native()));
  if (!ssl || SSL_set_fd(ssl.get(), socket.native_fd()) != 1) {
    return Error("{}: setting up TLS: {}", socket.name(), TakeTlsErrors());
  }
  if (server) {
    SSL_set_accept_state(ssl.get());
  } else {
    SSL_set_connect_state(ssl.get());
  }
  return ssl;
}

class TlsConnector final : public Connector {
 public:
  TlsConnector(Address address, TransportOptions options)
      : socket_(address, options), options_(std::move(options)) {}

  Result<std::unique_ptr<Channel>> Connect() override {
    const auto deadline = Clock::now() + options_.connect_timeout;
    ASSIGN_OR_RETURN(std::unique_ptr<SocketChannel> socket, socket_.ConnectSocket());
    TlsContext& tls = *options_.tls;
    ASSIGN_OR_RETURN(SslPtr ssl, NewSsl(tls, *socket, false));
    while (true) {
      const HandshakeStep step = StepHandshake(ssl.get(), tls);
      if (step.done) return Established(std::move(socket), std::move(ssl), tls, options_);
      if (step.refused) {
        tls.CountRefusal(*step.refused);
        return Status(ECONNREFUSED, fmt::format("TLS to {}: {}", socket_.name(), *step.refused));
      }
      Result<bool> ready = step.want_write ? socket->WaitWritable(Left(deadline))
                                           : socket->WaitReadable(Left(deadline));
      if (!ready.has_value()) return ready.error();
      if (!*ready) {
        tls.CountRefusal("handshake timed out");
        return Status(ETIMEDOUT, fmt::format("TLS to {}: no TLS handshake within {} ms (does the "
                                             "destination use TLS, --tls-dir?)",
                                             socket_.name(), options_.connect_timeout.count()));
      }
    }
  }
  std::string name() const override { return socket_.name(); }

 private:
  SocketConnector socket_;
  TransportOptions options_;
};

// Accepts connections and carries their handshakes side by side: the first
// to pass becomes the channel Accept returns; the others stay for the next
// call. Used by one thread at a time, like any Acceptor.
class TlsAcceptor final : public Acceptor {
 public:
  TlsAcceptor(std::unique_ptr<SocketListener> listener, TransportOptions options)
      : listener_(std::move(listener)), options_(std::move(options)) {}

  Result<std::unique_ptr<Channel>> Accept(std::chrono::milliseconds timeout) override;
  std::string address() const override { return listener_->address(); }

 private:
  struct Pending {
    std::unique_ptr<SocketChannel> socket;
    SslPtr ssl;
    Clock::time_point deadline;
    bool want_write = false;
  };
  Status TakeConnection();
  void Refuse(const Pending& p, const std::string& why);
  // Steps the handshakes whose socket is ready; a finished one, if any.
  std::unique_ptr<Channel> Progress(std::span<const pollfd> ready);

  const std::unique_ptr<SocketListener> listener_;
  const TransportOptions options_;
  std::list<Pending> pending_;
};

Status TlsAcceptor::TakeConnection() {
  Result<std::unique_ptr<SocketChannel>> socket =
      listener_->AcceptSocket(std::chrono::milliseconds(0));
  if (!socket.has_value()) {
    // Gone between poll and accept: not this listener's failure.
    return socket.error().code() == ETIMEDOUT ? Status::Ok() : socket.error();
  }
  ASSIGN_OR_RETURN(SslPtr ssl, NewSsl(*options_.tls, **socket, true));
  if (pending_.size() == kMaxPendingHandshakes) {
    Refuse(pending_.front(), fmt::format("more than {} TLS handshakes at once: the oldest is "
                                         "dropped",
                                         kMaxPendingHandshakes));
    pending_.pop_front();
  }
  pending_.push_back(
      Pending{std::move(*socket), std::move(ssl), Clock::now() + options_.connect_timeout});
  return Status::Ok();
}

void TlsAcceptor::Refuse(const Pending& p, const std::string& why) {
  options_.tls->CountRefusal(why);
  if (options_.on_refused) {
    options_.on_refused(fmt::format("refused a connection ({}): {}", p.socket->name(), why));
  }
}

std::unique_ptr<Channel> TlsAcceptor::Progress(std::span<const pollfd> ready) {
  const auto now = Clock::now();
  auto it = pending_.begin();
  for (size_t i = 0; it != pending_.end(); ++i) {
    // ready[i] is this handshake's entry, polled in pending_'s order.
    if (i < ready.size() && ready[i].revents == 0) {
      if (now >= it->deadline) {
        Refuse(*it, fmt::format("no TLS handshake within {} ms (a silent peer)",
                                options_.connect_timeout.count()));
        it = pending_.erase(it);
      } else {
        ++it;
      }
      continue;
    }
    const HandshakeStep step = StepHandshake(it->ssl.get(), *options_.tls);
    if (step.done) {
      std::unique_ptr<Channel> channel =
          Established(std::move(it->socket), std::move(it->ssl), *options_.tls, options_);
      pending_.erase(it);
      return channel;
    }
    if (step.refused) {
      Refuse(*it, *step.refused);
      it = pending_.erase(it);
      continue;
    }
    it->want_write = step.want_write;
    ++it;
  }
  return nullptr;
}

Result<std::unique_ptr<Channel>> TlsAcceptor::Accept(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  std::vector<pollfd> fds;
  while (true) {
    fds.clear();
    auto wake = deadline;
    for (const Pending& p : pending_) {
      fds.push_back(
          pollfd{p.socket->native_fd(), static_cast<short>(p.want_write ? POLLOUT : POLLIN), 0});
      wake = std::min(wake, p.deadline);
    }
    fds.push_back(pollfd{listener_->native_fd(), POLLIN, 0});
    RETURN_IF_ERROR(PollAny(fds, Left(wake)).status());
    if (std::unique_ptr<Channel> channel =
            Progress(std::span<const pollfd>(fds.data(), pending_.size()))) {
      return channel;
    }
    if (fds.back().revents != 0) RETURN_IF_ERROR(TakeConnection());
    if (Clock::now() >= deadline) {
      const std::string refused = options_.tls->stats().last_refusal;
      return Status(
          ETIMEDOUT,
          fmt::format("accept on {}: no TLS connection within {} ms{}", address(), timeout.count(),
                      refused.empty() ? "" : "; the last one refused: " + refused));
    }
  }
}

}  // namespace

Result<std::unique_ptr<Connector>> MakeTlsConnector(const Address& address,
                                                    const TransportOptions& options) {
  RETURN_IF_ERROR(CheckTls(address, options));
  return std::unique_ptr<Connector>(std::make_unique<TlsConnector>(address, options));
}

std::unique_ptr<Acceptor> MakeTlsAcceptor(std::unique_ptr<SocketListener> listener,
                                          const TransportOptions& options) {
  return std::make_unique<TlsAcceptor>(std::move(listener), options);
}

}  // namespace faultline::migration
