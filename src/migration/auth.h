// Authentication of a migration session with a pre-shared key (feature
// kFeatureAuth): HMAC-SHA256 proofs over the handshake transcript, and a
// binding of every extra channel to the session.
//
// What it gives: each side proves it holds the key before the other accepts
// anything but the handshake, both proofs cover both sides' fresh nonces (a
// recorded handshake cannot be replayed into a new session), and a channel
// that does not carry a proof for this session's nonces is refused. What it
// does not give (yet): integrity of frames after the handshake. A party on
// the path can still alter page data; kFeatureFrameMac is reserved for a MAC
// on every frame. docs/protocol.md, "Authentication".
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "faultline/status.h"
#include "src/migration/wire.h"

namespace faultline::migration {

inline constexpr size_t kMinKeySize = 16;

// A pre-shared key: at least kMinKeySize bytes, ideally 32 random ones.
using AuthKey = std::vector<uint8_t>;
Status ValidateKey(std::span<const uint8_t> key);

// From the system's CSPRNG (OpenSSL RAND_bytes).
Result<Nonce> RandomNonce();
// Non-zero.
Result<uint64_t> RandomSessionId();

// The destination's proof, sent in HelloAck.mac: covers the Hello as
// received and the HelloAck with its mac field zero.
Mac DestinationProof(std::span<const uint8_t> key, const Hello& hello, const HelloAck& ack);
// The source's proof, sent in Auth: covers the Hello and the whole HelloAck
// (destination's proof included).
Mac SourceProof(std::span<const uint8_t> key, const Hello& hello, const HelloAck& ack);
// The proof in ChannelHello.mac that a channel belongs to the session whose
// handshake exchanged these nonces.
Mac ChannelProof(std::span<const uint8_t> key, uint64_t session_id, uint16_t index,
                 ChannelKind kind, const Nonce& source_nonce, const Nonce& destination_nonce);

// Constant-time comparison.
bool MacEqual(const Mac& a, const Mac& b);

}  // namespace faultline::migration
