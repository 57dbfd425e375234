// libFuzzer target: the control socket's requests, as a hostile local
// client sends them, and the replies a client parses, as a hostile VMM
// sends them.
//
// Each input is one request line for ControlServer::HandleLine (framing,
// JSON limits, dispatch), whose "migrate" and "snapshot" handlers run the
// real argument parsers; an accepted request must survive a round trip
// through its JSON (to_json, then the parser again, to the same JSON).
// The same bytes, as JSON, are also a query-migrate reply for
// ParseMigrationStatus, with the same round-trip property.
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "src/control/server.h"
#include "src/control/snapshot.h"
#include "src/control/types.h"

namespace fc = faultline::control;

namespace {

template <typename T, typename Parse>
faultline::Result<nlohmann::json> RoundTrip(const nlohmann::json& args, Parse parse) {
  faultline::Result<T> first = parse(args);
  if (!first) return first.error();
  const nlohmann::json j = *first;
  faultline::Result<T> second = parse(j);
  if (!second || nlohmann::json(*second) != j) std::abort();  // the parser disagrees with itself
  return j;
}

fc::ControlServer& Server() {
  static std::unique_ptr<fc::ControlServer> server = [] {
    const std::string path = "/tmp/faultline-fuzz-control-" + std::to_string(getpid()) + ".sock";
    auto s = fc::ControlServer::Create(path);
    if (!s) std::abort();
    (*s)->Register("migrate", [](const nlohmann::json& args) {
      return RoundTrip<fc::MigrateRequest>(args, fc::ParseMigrateRequest);
    });
    (*s)->Register("snapshot", [](const nlohmann::json& args) {
      return RoundTrip<fc::SnapshotRequest>(args, fc::ParseSnapshotRequest);
    });
    return std::move(*s);
  }();
  return *server;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const std::string reply = Server().HandleLine(text);
  if (reply.empty() || reply.find('\n') != std::string::npos) std::abort();  // one line each
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_discarded()) (void)RoundTrip<fc::MigrationStatus>(j, fc::ParseMigrationStatus);
  return 0;
}
