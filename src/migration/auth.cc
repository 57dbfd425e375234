#include "src/migration/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <string_view>

#include "src/migration/bytes.h"

namespace faultline::migration {
namespace {

// Each proof starts with a distinct label, so a proof of one kind can never
// be presented as another (the destination's proof as the source's, say).
constexpr std::string_view kDestinationLabel = "faultline-v1 destination proof";
constexpr std::string_view kSourceLabel = "faultline-v1 source proof";
constexpr std::string_view kChannelLabel = "faultline-v1 channel proof";

Mac Hmac(std::span<const uint8_t> key, std::span<const uint8_t> data) {
  Mac mac{};
  unsigned int length = 0;
  // HMAC() fails only on allocation failure or a bad digest; neither can be
  // handled usefully here, and a zero MAC simply fails verification.
  if (HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), data.data(), data.size(),
           mac.data(), &length) == nullptr ||
      length != mac.size()) {
    mac.fill(0);
  }
  return mac;
}

std::vector<uint8_t> Transcript(std::string_view label, const Hello& hello, const HelloAck& ack) {
  std::vector<uint8_t> data;
  ByteWriter w(data);
  w.Text(label);
  w.U8(0);
  // Lengths first, so that the boundary between the two messages is fixed.
  std::vector<uint8_t> hello_bytes, ack_bytes;
  EncodePayload(hello, hello_bytes);
  EncodePayload(ack, ack_bytes);
  w.U32(static_cast<uint32_t>(hello_bytes.size()));
  w.U32(static_cast<uint32_t>(ack_bytes.size()));
  w.Bytes(hello_bytes);
  w.Bytes(ack_bytes);
  return data;
}

}  // namespace

Status ValidateKey(std::span<const uint8_t> key) {
  if (key.size() < kMinKeySize) {
    return Error("authentication key is {} bytes; use at least {} (32 random bytes recommended)",
                 key.size(), kMinKeySize);
  }
  return Status::Ok();
}

Result<Nonce> RandomNonce() {
  Nonce nonce{};
  if (RAND_bytes(nonce.data(), static_cast<int>(nonce.size())) != 1) {
    return Error("RAND_bytes failed: the system random generator is unavailable");
  }
  return nonce;
}

Result<uint64_t> RandomSessionId() {
  uint8_t bytes[8];
  uint64_t id = 0;
  for (int attempt = 0; attempt < 4 && id == 0; ++attempt) {
    if (RAND_bytes(bytes, sizeof(bytes)) != 1) {
      return Error("RAND_bytes failed: the system random generator is unavailable");
    }
    id = LoadLe<uint64_t>(bytes);
  }
  if (id == 0) return Error("RAND_bytes returned zeros four times");
  return id;
}

Mac DestinationProof(std::span<const uint8_t> key, const Hello& hello, const HelloAck& ack) {
  HelloAck unsigned_ack = ack;
  unsigned_ack.mac.fill(0);
  return Hmac(key, Transcript(kDestinationLabel, hello, unsigned_ack));
}

Mac SourceProof(std::span<const uint8_t> key, const Hello& hello, const HelloAck& ack) {
  return Hmac(key, Transcript(kSourceLabel, hello, ack));
}

Mac ChannelProof(std::span<const uint8_t> key, uint64_t session_id, uint16_t index,
                 ChannelKind kind, const Nonce& source_nonce, const Nonce& destination_nonce) {
  std::vector<uint8_t> data;
  ByteWriter w(data);
  w.Text(kChannelLabel);
  w.U8(0);
  w.U64(session_id);
  w.U16(index);
  w.U8(static_cast<uint8_t>(kind));
  w.Bytes(source_nonce);
  w.Bytes(destination_nonce);
  return Hmac(key, data);
}

bool MacEqual(const Mac& a, const Mac& b) {
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace faultline::migration
