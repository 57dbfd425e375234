// The post-copy additions to a session (handshake.h): the priority channel,
// one more connection that carries only page requests and their replies, so
// that a vCPU's request never queues behind bulk page data in a socket
// buffer (QEMU's "preempt" channel). It is bound like a page channel, with
// ChannelHello{kind = kPriority, index = 0}, after the page channels.
#pragma once

#include <chrono>
#include <memory>

#include "src/migration/handshake.h"

namespace faultline::migration {

// Source side, after ConnectSession.
Result<std::unique_ptr<Link>> ConnectPriorityChannel(Connector& connector, const Session& session,
                                                     const AuthKey& key);

// Destination side, after AcceptSession. Connections that are not this
// session's priority channel are told why and closed (at most
// `max_strays` of them).
Result<std::unique_ptr<Link>> AcceptPriorityChannel(Acceptor& acceptor, const Session& session,
                                                    const AuthKey& key,
                                                    std::chrono::milliseconds timeout,
                                                    int max_strays = 8);

}  // namespace faultline::migration
