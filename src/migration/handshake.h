// Session establishment: the source dials the main channel, the two sides
// exchange Hello / HelloAck (and Auth when a key is configured), and then the
// source dials each page channel and binds it to the session with a
// ChannelHello carrying the session id (and a proof of the key). The result
// is a Session: the negotiated parameters and one Link per channel, ready for
// the engines (source.h, destination.h) to continue on.
#pragma once

#include <chrono>
#include <memory>
#include <vector>

#include "faultline/status.h"
#include "src/migration/auth.h"
#include "src/migration/message_io.h"
#include "src/migration/receiver_state.h"
#include "src/migration/transport.h"
#include "src/migration/wire.h"

namespace faultline::migration {

struct Session {
  Hello hello;
  HelloAck ack;
  // The session's RAM blocks, which page messages are checked against. On
  // the heap so that readers may point at it while the Session moves.
  std::shared_ptr<const std::vector<BlockInfo>> blocks;
  std::unique_ptr<Link> main;
  std::vector<std::unique_ptr<Link>> pages;  // by channel index

  // Shuts every channel down (idempotent): unblocks every thread using them.
  void Shutdown();
  // Summed over every channel.
  ChannelStats stats() const;
};

struct SourceSessionOptions {
  std::vector<BlockInfo> blocks;
  uint16_t page_channels = 4;
  AuthKey key;                  // non-empty: authentication offered and required
  uint64_t extra_features = 0;  // offered besides kFeatureAuth (none implemented yet)
  HelloAccel accel = HelloAccel::kUnspecified;  // whose vCPU state this source sends
};

// The source side. On a failure after the main channel is up, the source
// tells the destination why with an Error message before returning.
Result<Session> ConnectSession(Connector& connector, const SourceSessionOptions& options);

struct AcceptOptions {
  // For each channel to arrive.
  std::chrono::milliseconds timeout{30'000};
  // Connections that are not part of this session (no Hello or ChannelHello
  // first, another session's id) are closed and waited past, this many
  // times at most.
  int max_stray_connections = 8;
};

// The destination side: accepts one session's main and page channels,
// driving `receiver` through Hello (and Auth). When the source is refused
// (version, features, blocks, authentication), it is told why with an Error
// message and the refusal is returned.
Result<Session> AcceptSession(Acceptor& acceptor, SessionReceiver& receiver,
                              const AcceptOptions& options = {});

// Sends an Error message on `link` (best effort: the link may be broken,
// which is often why there is an error) and returns `status`.
Status SendError(Link& link, ErrorCode code, Status status);

}  // namespace faultline::migration
