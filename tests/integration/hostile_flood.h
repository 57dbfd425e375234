// faultline_hostile_peer's `flood` case: an on-path relay between a source
// and its destination that floods the source with page requests on each
// priority channel (hostile_peer.cc says how it is run).
#pragma once

#include <cstdint>

#include "src/migration/transport.h"

namespace faultline::migration {

struct FloodOptions {
  uint32_t count = 1000;  // requests injected per priority channel
  uint32_t pages = 64;    // pages per valid request
};

// Listens on 127.0.0.1 (an ephemeral port, printed on stderr as "listening
// on tcp:127.0.0.1:PORT"), relays every connection to `to`, and injects the
// flood; returns once the relayed connections have all closed (or after 10
// minutes). Prints one JSON object: {"case": "flood", "connections",
// "priority_channels", "injected", "invalid", "answers", "answered_pages"}:
// requests injected (of which `invalid` ask for a page past the block's
// end), and the Pages messages (and their pages) the source sent on the
// priority channels, real answers and the flood's. Exit status: 0 when
// every request of the flood went out on at least one priority channel, 1
// when none did (the session never got that far), 2 on a usage error.
int RunFlood(const Address& to, const FloodOptions& options);

}  // namespace faultline::migration
