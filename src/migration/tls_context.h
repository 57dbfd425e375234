// TlsContext: one side's TLS 1.3 certificates (docs/protocol.md section
// 8.2), loaded and checked once and shared by all its channels
// (tls_transport.h), with what those channels did.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "faultline/status.h"
#include "src/sys/mutex.h"

struct ssl_ctx_st;

namespace faultline::migration {

// What the channels made with one TlsContext did.
struct TlsStats {
  uint64_t handshakes = 0;    // channels that passed the handshake
  uint64_t refused = 0;       // connections refused in the handshake (either side)
  uint64_t ktls_send = 0;     // channels whose sending the kernel encrypted
  uint64_t ktls_receive = 0;  // channels whose receiving the kernel decrypted
  std::string protocol;       // of the last handshake: "TLSv1.3"
  std::string cipher;         // of the last handshake: "TLS_AES_128_GCM_SHA256"
  std::string last_refusal;   // why the last refused connection was refused
};

// The certificates of one side, loaded once and shared by all its channels.
// Thread-safe.
class TlsContext {
 public:
  // Reads DIR/ca.pem (the CA whose signature a peer's certificate must
  // carry), DIR/cert.pem (this side's certificate, then any intermediate
  // ones) and DIR/key.pem (its private key, unencrypted PEM). Fails, saying
  // which file and what to do, if one is missing or unreadable, if the key
  // does not match the certificate, or if ca.pem does not sign cert.pem
  // (both ends must share the CA). `peer_name` non-empty: the peer's
  // certificate must also name it (a DNS name or IP address in
  // subjectAltName, or the subject's CN).
  static Result<std::shared_ptr<TlsContext>> Load(const std::string& dir,
                                                  std::string peer_name = "");
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  const std::string& dir() const { return dir_; }
  const std::string& peer_name() const { return peer_name_; }
  TlsStats stats() const;
  // "TLSv1.3 TLS_AES_128_GCM_SHA256, kTLS send 4/4 receive 0/4 channels".
  std::string Describe() const;

  // For the channels (tls_transport.cc).
  ssl_ctx_st* native() const { return ctx_; }
  void CountHandshake(const std::string& protocol, const std::string& cipher, bool ktls_send,
                      bool ktls_receive);
  void CountRefusal(const std::string& why);

 private:
  TlsContext(ssl_ctx_st* ctx, std::string dir, std::string peer_name)
      : ctx_(ctx), dir_(std::move(dir)), peer_name_(std::move(peer_name)) {}

  ssl_ctx_st* const ctx_;  // owned; SSL_CTX is safe to share once set up
  const std::string dir_;
  const std::string peer_name_;
  mutable sys::Mutex mu_;
  TlsStats stats_ GUARDED_BY(mu_);
};

// The reasons OpenSSL queued in this thread, oldest first, joined with
// "; "; clears them.
std::string TakeTlsErrors();

}  // namespace faultline::migration
