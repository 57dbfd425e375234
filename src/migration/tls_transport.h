// TLS 1.3 with mutual certificate authentication on TCP channels
// (docs/protocol.md section 8.2), with OpenSSL 3. Every channel of a
// session (main, page, priority, and those of a resumed post-copy session)
// is its own TLS connection; both ends present a certificate signed by the
// CA they share, and each checks the other's against it (and, if given, for
// an expected name) before a byte of the protocol flows.
//
// The connector handshakes as the client in Connect. The acceptor
// handshakes as the server inside Accept, several connections at once over
// non-blocking sockets, so that a peer that connects and says nothing, or
// speaks plaintext, or shows a certificate from another CA, costs its own
// handshake and never a session: it is refused (said through
// TransportOptions::on_refused) and Accept goes on waiting for a peer that
// passes.
//
// Kernel TLS: with SSL_OP_ENABLE_KTLS, OpenSSL hands a direction's record
// layer to the kernel where the kernel and the cipher allow it (Linux
// CONFIG_TLS, the "tls" TCP ULP); the channel's bytes then go through the
// socket without encryption in user space. Whether it took is counted in
// TlsStats. Without it, OpenSSL encrypts in user space.
#pragma once

#include <memory>

#include "faultline/status.h"
#include "src/migration/tls_context.h"
#include "src/migration/transport.h"

namespace faultline::migration {

class SocketListener;

// Connects to `address` (tcp only) and handshakes as the TLS client, within
// options.connect_timeout, with options.tls.
Result<std::unique_ptr<Connector>> MakeTlsConnector(const Address& address,
                                                    const TransportOptions& options);
// Accepts from `listener` (tcp only) and handshakes as the TLS server with
// options.tls; handshakes that fail or take longer than
// options.connect_timeout are refused and said through options.on_refused.
std::unique_ptr<Acceptor> MakeTlsAcceptor(std::unique_ptr<SocketListener> listener,
                                          const TransportOptions& options);

}  // namespace faultline::migration
