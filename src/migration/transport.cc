#include "src/migration/transport.h"

#include <arpa/inet.h>

#include <charconv>

#include "src/migration/tcp_transport.h"

namespace faultline::migration {

std::string Address::ToString() const {
  if (host.find(':') != std::string::npos) return fmt::format("{}:[{}]:{}", scheme, host, port);
  return fmt::format("{}:{}:{}", scheme, host, port);
}

Result<Address> ParseAddress(std::string_view text) {
  constexpr std::string_view kUsage =
      "expected tcp:HOST:PORT, e.g. tcp:127.0.0.1:4444 or tcp:[::1]:4444";
  const size_t colon = text.find(':');
  if (colon == std::string_view::npos) {
    return Error("address '{}': no scheme; {}", text, kUsage);
  }
  Address address;
  address.scheme = std::string(text.substr(0, colon));
  if (address.scheme != "tcp") {
    return Error("address '{}': unknown scheme '{}' (only 'tcp' is supported); {}", text,
                 address.scheme, kUsage);
  }
  std::string_view rest = text.substr(colon + 1);
  std::string_view host, port;
  if (rest.starts_with('[')) {
    const size_t close = rest.find(']');
    if (close == std::string_view::npos) return Error("address '{}': unclosed '['", text);
    host = rest.substr(1, close - 1);
    rest = rest.substr(close + 1);
    if (!rest.starts_with(':')) return Error("address '{}': expected ':PORT' after ']'", text);
    port = rest.substr(1);
  } else {
    const size_t last = rest.rfind(':');
    if (last == std::string_view::npos) return Error("address '{}': no port; {}", text, kUsage);
    host = rest.substr(0, last);
    port = rest.substr(last + 1);
    if (host.find(':') != std::string_view::npos) {
      return Error("address '{}': put an IPv6 address in brackets, e.g. tcp:[::1]:4444", text);
    }
  }
  if (host.empty()) return Error("address '{}': empty host; {}", text, kUsage);
  unsigned value = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (port.empty() || ec != std::errc() || end != port.data() + port.size() || value > 65535) {
    return Error("address '{}': port '{}' is not a number from 0 to 65535", text, port);
  }
  address.port = static_cast<uint16_t>(value);
  address.host = host == "localhost" ? "127.0.0.1" : std::string(host);
  in6_addr scratch{};
  if (inet_pton(AF_INET, address.host.c_str(), &scratch) != 1 &&
      inet_pton(AF_INET6, address.host.c_str(), &scratch) != 1) {
    return Error(
        "address '{}': host '{}' is not a numeric IPv4 or IPv6 address (host names "
        "are not resolved)",
        text, host);
  }
  return address;
}

Result<std::unique_ptr<Connector>> MakeConnector(const Address& address,
                                                 const TransportOptions& options) {
  if (address.scheme != "tcp") return Error("unknown transport '{}'", address.scheme);
  if (address.port == 0) return Error("{}: cannot connect to port 0", address.ToString());
  return std::unique_ptr<Connector>(std::make_unique<TcpConnector>(address, options));
}

Result<std::unique_ptr<Acceptor>> MakeAcceptor(const Address& address,
                                               const TransportOptions& options) {
  if (address.scheme != "tcp") return Error("unknown transport '{}'", address.scheme);
  ASSIGN_OR_RETURN(auto listener, TcpListener::Listen(address, options));
  return std::unique_ptr<Acceptor>(std::move(listener));
}

}  // namespace faultline::migration
