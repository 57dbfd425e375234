#include "src/migration/transport.h"

#include <arpa/inet.h>

#include <cerrno>
#include <charconv>

#include "src/migration/socket_transport.h"
#include "src/migration/tls_transport.h"

namespace faultline::migration {

Status Channel::SendWithFds(ConstBuffer, std::span<const int>) {
  return Status(EOPNOTSUPP,
                fmt::format("{}: passing file descriptors needs a unix: channel", name()));
}

Result<std::vector<sys::UniqueFd>> Channel::ReceiveWithFds(MutableBuffer, size_t) {
  return Status(EOPNOTSUPP,
                fmt::format("{}: passing file descriptors needs a unix: channel", name()));
}

std::string Address::ToString() const {
  if (is_unix()) return fmt::format("unix:{}", path);
  if (host.find(':') != std::string::npos) return fmt::format("{}:[{}]:{}", scheme, host, port);
  return fmt::format("{}:{}:{}", scheme, host, port);
}

Result<Address> ParseAddress(std::string_view text) {
  constexpr std::string_view kUsage =
      "expected tcp:HOST:PORT, e.g. tcp:127.0.0.1:4444 or tcp:[::1]:4444, or unix:PATH";
  const size_t colon = text.find(':');
  if (colon == std::string_view::npos) {
    return Error("address '{}': no scheme; {}", text, kUsage);
  }
  Address address;
  address.scheme = std::string(text.substr(0, colon));
  if (address.scheme == "unix") {
    address.path = std::string(text.substr(colon + 1));
    if (address.path.empty()) return Error("address '{}': empty path; {}", text, kUsage);
    if (address.path.size() > kMaxUnixPath) {
      return Error("address '{}': the path is {} bytes, a Unix socket's is at most {}", text,
                   address.path.size(), kMaxUnixPath);
    }
    if (address.path.find('\0') != std::string::npos) {
      return Error("address '{}': the path has a NUL byte", text);
    }
    return address;
  }
  if (address.scheme != "tcp") {
    return Error("address '{}': unknown scheme '{}' (tcp or unix); {}", text, address.scheme,
                 kUsage);
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
  if (address.scheme != "tcp" && !address.is_unix()) {
    return Error("unknown transport '{}'", address.scheme);
  }
  if (!address.is_unix() && address.port == 0)
    return Error("{}: cannot connect to port 0", address.ToString());
  RETURN_IF_ERROR(CheckTls(address, options));
  if (options.tls) return MakeTlsConnector(address, options);
  return std::unique_ptr<Connector>(std::make_unique<SocketConnector>(address, options));
}

Result<std::unique_ptr<Acceptor>> MakeAcceptor(const Address& address,
                                               const TransportOptions& options) {
  if (address.scheme != "tcp" && !address.is_unix()) {
    return Error("unknown transport '{}'", address.scheme);
  }
  RETURN_IF_ERROR(CheckTls(address, options));
  ASSIGN_OR_RETURN(auto listener, SocketListener::Listen(address, options));
  if (options.tls) return MakeTlsAcceptor(std::move(listener), options);
  return std::unique_ptr<Acceptor>(std::move(listener));
}

Status CheckTls(const Address& address, const TransportOptions& options) {
  if (options.tls && address.is_unix()) {
    return Error(
        "{}: TLS protects TCP channels; a unix: socket stays on this host and is guarded by its "
        "file mode (0600): drop the TLS directory for it",
        address.ToString());
  }
  return Status::Ok();
}

}  // namespace faultline::migration
