#include "src/migration/tls_context.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>
#include <unistd.h>

#include <cerrno>

namespace faultline::migration {
namespace {

// AES-GCM first: AES-NI and the kernel's TLS both have it.
constexpr const char* kCipherSuites =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

bool Contains(const std::string& text, const char* part) {
  return text.find(part) != std::string::npos;
}

int RejectPassphrase(char*, int, int, void*) { return -1; }

std::string Path(const std::string& dir, const char* file) { return dir + "/" + file; }

// cert.pem must chain to ca.pem, or no peer could ever accept it.
Status CheckOwnCertificate(SSL_CTX* ctx, const std::string& dir) {
  X509* leaf = SSL_CTX_get0_certificate(ctx);
  STACK_OF(X509)* chain = nullptr;
  SSL_CTX_get0_chain_certs(ctx, &chain);
  X509_STORE_CTX* store_ctx = X509_STORE_CTX_new();
  if (store_ctx == nullptr ||
      X509_STORE_CTX_init(store_ctx, SSL_CTX_get_cert_store(ctx), leaf, chain) != 1) {
    X509_STORE_CTX_free(store_ctx);
    return Error("{}: checking cert.pem: {}", dir, TakeTlsErrors());
  }
  const int ok = X509_verify_cert(store_ctx);
  const int error = X509_STORE_CTX_get_error(store_ctx);
  X509_STORE_CTX_free(store_ctx);
  if (ok != 1) {
    return Error(
        "{} is not signed by {} ({}): both ends need certificates from one CA, and ca.pem is "
        "that CA's certificate",
        Path(dir, "cert.pem"), Path(dir, "ca.pem"), X509_verify_cert_error_string(error));
  }
  return Status::Ok();
}

Status LoadFiles(SSL_CTX* ctx, const std::string& dir) {
  for (const char* file : {"ca.pem", "cert.pem", "key.pem"}) {
    if (access(Path(dir, file).c_str(), R_OK) != 0) {
      return ErrnoError(errno,
                        "TLS directory {}: cannot read {} (it needs ca.pem, cert.pem and key.pem; "
                        "docs/protocol.md section 8.2 shows how to make them)",
                        dir, file);
    }
  }
  if (SSL_CTX_load_verify_locations(ctx, Path(dir, "ca.pem").c_str(), nullptr) != 1) {
    return Error("{}: not a PEM certificate: {}", Path(dir, "ca.pem"), TakeTlsErrors());
  }
  if (SSL_CTX_use_certificate_chain_file(ctx, Path(dir, "cert.pem").c_str()) != 1) {
    return Error("{}: not a PEM certificate chain: {}", Path(dir, "cert.pem"), TakeTlsErrors());
  }
  // An encrypted key would prompt on the terminal: refuse it instead.
  SSL_CTX_set_default_passwd_cb(ctx, RejectPassphrase);
  if (SSL_CTX_use_PrivateKey_file(ctx, Path(dir, "key.pem").c_str(), SSL_FILETYPE_PEM) != 1) {
    const std::string errors = TakeTlsErrors();
    if (Contains(errors, "mismatch")) {
      return Error("{} is not the key of {} ({})", Path(dir, "key.pem"), Path(dir, "cert.pem"),
                   errors);
    }
    return Error("{}: not an unencrypted PEM private key: {}", Path(dir, "key.pem"), errors);
  }
  if (SSL_CTX_check_private_key(ctx) != 1) {
    return Error("{} is not the key of {}: {}", Path(dir, "key.pem"), Path(dir, "cert.pem"),
                 TakeTlsErrors());
  }
  return CheckOwnCertificate(ctx, dir);
}

Status Configure(SSL_CTX* ctx, const std::string& peer_name) {
  if (SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1 ||
      SSL_CTX_set_ciphersuites(ctx, kCipherSuites) != 1) {
    return Error("TLS 1.3 setup: {}", TakeTlsErrors());
  }
  // Both ends present a certificate, and both check the other's.
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  // No session tickets or resumption: every channel proves itself afresh,
  // and no post-handshake message interleaves with the data.
  SSL_CTX_set_num_tickets(ctx, 0);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  // A peer that closes without close_notify ends the stream like TCP does
  // (the protocol's own framing detects truncation).
  SSL_CTX_set_options(ctx, SSL_OP_ENABLE_KTLS | SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_TICKET);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  if (peer_name.empty()) return Status::Ok();
  X509_VERIFY_PARAM* param = SSL_CTX_get0_param(ctx);
  X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
  const bool ip = X509_VERIFY_PARAM_set1_ip_asc(param, peer_name.c_str()) == 1;
  if (!ip && X509_VERIFY_PARAM_set1_host(param, peer_name.c_str(), peer_name.size()) != 1) {
    return Error("TLS peer name '{}': {}", peer_name, TakeTlsErrors());
  }
  ERR_clear_error();  // set1_ip_asc's complaint about a name that is no address
  return Status::Ok();
}

}  // namespace

std::string TakeTlsErrors() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    const char* reason = ERR_reason_error_string(e);
    if (!out.empty()) out += "; ";
    out += reason != nullptr ? reason : fmt::format("OpenSSL error {:#x}", e);
  }
  return out;
}

Result<std::shared_ptr<TlsContext>> TlsContext::Load(const std::string& dir,
                                                     std::string peer_name) {
  ERR_clear_error();
  SSL_CTX* ctx = SSL_CTX_new(TLS_method());
  if (ctx == nullptr) return Error("TLS: SSL_CTX_new: {}", TakeTlsErrors());
  std::shared_ptr<TlsContext> tls(new TlsContext(ctx, dir, std::move(peer_name)));
  RETURN_IF_ERROR(Configure(ctx, tls->peer_name_));
  RETURN_IF_ERROR(LoadFiles(ctx, dir));
  return tls;
}

TlsContext::~TlsContext() { SSL_CTX_free(ctx_); }

TlsStats TlsContext::stats() const {
  sys::MutexLock lock(mu_);
  return stats_;
}

std::string TlsContext::Describe() const {
  const TlsStats s = stats();
  if (s.handshakes == 0) return fmt::format("TLS, no channel yet ({} refused)", s.refused);
  return fmt::format("{} {}, kernel TLS on {}/{} channels sending and {}/{} receiving{}",
                     s.protocol, s.cipher, s.ktls_send, s.handshakes, s.ktls_receive, s.handshakes,
                     s.refused == 0 ? "" : fmt::format(", {} refused", s.refused));
}

void TlsContext::CountHandshake(const std::string& protocol, const std::string& cipher,
                                bool ktls_send, bool ktls_receive) {
  sys::MutexLock lock(mu_);
  ++stats_.handshakes;
  stats_.ktls_send += ktls_send ? 1 : 0;
  stats_.ktls_receive += ktls_receive ? 1 : 0;
  stats_.protocol = protocol;
  stats_.cipher = cipher;
}

void TlsContext::CountRefusal(const std::string& why) {
  sys::MutexLock lock(mu_);
  ++stats_.refused;
  stats_.last_refusal = why;
}

}  // namespace faultline::migration
