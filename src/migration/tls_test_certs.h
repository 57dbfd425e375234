// Certificates for tests of TLS channels (tls_transport.h): a throw-away CA
// and TLS directories (ca.pem, cert.pem, key.pem) with certificates it
// signs, made with OpenSSL in memory (EC P-256, valid from an hour ago for
// a day). Operators make theirs with the openssl command instead
// (docs/protocol.md section 8.2).
#pragma once

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <cstdio>
#include <memory>
#include <string>

namespace faultline::migration::testing {

struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};

class TestCa {
 public:
  // A self-signed CA certificate named `name`.
  explicit TestCa(const std::string& name = "faultline test CA") : key_(EVP_EC_gen("P-256")) {
    cert_.reset(NewCertificate(name, key_.get(), nullptr, key_.get(), true, ""));
  }

  // Writes `dir`/ca.pem (this CA), cert.pem (a certificate for `name`, with
  // subjectAltName `san`, e.g. "DNS:dest,IP:127.0.0.1", signed by this CA)
  // and key.pem. `trust` non-null: ca.pem is that CA instead (a side that
  // trusts another CA than the one that signed its own certificate).
  void WriteDir(const std::string& dir, const std::string& name, const std::string& san,
                const TestCa* trust = nullptr) const {
    mkdir(dir.c_str(), 0700);
    std::unique_ptr<EVP_PKEY, PkeyFree> key(EVP_EC_gen("P-256"));
    std::unique_ptr<X509, X509Free> cert(
        NewCertificate(name, key.get(), cert_.get(), key_.get(), false, san));
    Write(dir + "/ca.pem", [&](FILE* f) {
      return PEM_write_X509(f, (trust != nullptr ? trust : this)->cert_.get());
    });
    Write(dir + "/cert.pem", [&](FILE* f) { return PEM_write_X509(f, cert.get()); });
    Write(dir + "/key.pem", [&](FILE* f) {
      return PEM_write_PrivateKey(f, key.get(), nullptr, nullptr, 0, nullptr, nullptr);
    });
  }

 private:
  static void AddExtension(X509* cert, X509* issuer, int nid, const std::string& value) {
    X509V3_CTX ctx;
    X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
    X509_add_ext(cert, ext, -1);
    X509_EXTENSION_free(ext);
  }

  // `issuer` null: self-signed.
  static X509* NewCertificate(const std::string& name, EVP_PKEY* key, X509* issuer,
                              EVP_PKEY* issuer_key, bool ca, const std::string& san) {
    static long serial = 1;
    X509* cert = X509_new();
    X509_set_version(cert, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(cert), serial++);
    X509_gmtime_adj(X509_getm_notBefore(cert), -3600);
    X509_gmtime_adj(X509_getm_notAfter(cert), 86400);
    X509_set_pubkey(cert, key);
    X509_NAME_add_entry_by_txt(X509_get_subject_name(cert), "CN", MBSTRING_ASC,
                               reinterpret_cast<const unsigned char*>(name.c_str()), -1, -1, 0);
    X509* signer = issuer != nullptr ? issuer : cert;
    X509_set_issuer_name(cert, X509_get_subject_name(signer));
    if (ca) {
      AddExtension(cert, signer, NID_basic_constraints, "critical,CA:TRUE");
      AddExtension(cert, signer, NID_key_usage, "critical,keyCertSign,cRLSign");
    } else {
      AddExtension(cert, signer, NID_basic_constraints, "critical,CA:FALSE");
      AddExtension(cert, signer, NID_ext_key_usage, "serverAuth,clientAuth");
      if (!san.empty()) AddExtension(cert, signer, NID_subject_alt_name, san);
    }
    X509_sign(cert, issuer_key, EVP_sha256());
    return cert;
  }

  template <typename F>
  static void Write(const std::string& path, F write) {
    FILE* f = std::fopen(path.c_str(), "w");
    if (f == nullptr) return;
    write(f);
    std::fclose(f);
  }

  std::unique_ptr<EVP_PKEY, PkeyFree> key_;
  std::unique_ptr<X509, X509Free> cert_;
};

}  // namespace faultline::migration::testing
