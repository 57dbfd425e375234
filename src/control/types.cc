#include "src/control/types.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <utility>

#include "src/control/args.h"

namespace faultline::control {
namespace {

constexpr std::array<std::pair<MigrationPhase, const char*>, 8> kPhaseNames = {{
    {MigrationPhase::kNone, "none"},
    {MigrationPhase::kSetup, "setup"},
    {MigrationPhase::kPrecopy, "precopy"},
    {MigrationPhase::kPostcopy, "postcopy"},
    {MigrationPhase::kSwitchover, "switchover"},
    {MigrationPhase::kCompleted, "completed"},
    {MigrationPhase::kFailed, "failed"},
    {MigrationPhase::kCancelled, "cancelled"},
}};

bool IsHostChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '-' || c == '_' || c == ':' || c == '%';
}

nlohmann::json OptionalToJson(const std::optional<uint64_t>& value) {
  return value ? nlohmann::json(*value) : nlohmann::json(nullptr);
}

}  // namespace

const char* MigrationPhaseName(MigrationPhase phase) {
  for (const auto& [p, name] : kPhaseNames) {
    if (p == phase) return name;
  }
  return "none";
}

Result<MigrationPhase> ParseMigrationPhase(std::string_view name) {
  for (const auto& [p, n] : kPhaseNames) {
    if (name == n) return p;
  }
  return Error("unknown migration phase '{}'", name);
}

bool IsTerminal(MigrationPhase phase) {
  return phase == MigrationPhase::kCompleted || phase == MigrationPhase::kFailed ||
         phase == MigrationPhase::kCancelled;
}

const char* MigrationModeName(MigrationMode mode) {
  return mode == MigrationMode::kPostcopy ? "postcopy" : "precopy";
}

Result<MigrationMode> ParseMigrationMode(std::string_view name) {
  if (name == "precopy") return MigrationMode::kPrecopy;
  if (name == "postcopy") return MigrationMode::kPostcopy;
  return InvalidArgument("unknown migration mode '{}': use precopy or postcopy", name);
}

std::string MigrationTarget::ToString() const {
  if (!unix_path.empty()) return fmt::format("unix:{}", unix_path);
  if (host.find(':') != std::string::npos) return fmt::format("tcp:[{}]:{}", host, port);
  return fmt::format("tcp:{}:{}", host, port);
}

Result<MigrationTarget> ParseMigrationTarget(std::string_view uri) {
  auto bad = [&](std::string_view why) {
    return InvalidArgument("'{}' is not a migration target ({}): use tcp:HOST:PORT or unix:PATH",
                           uri, why);
  };
  constexpr std::string_view kUnix = "unix:";
  if (uri.starts_with(kUnix)) {
    std::string_view path = uri.substr(kUnix.size());
    if (path.empty()) return bad("no path");
    // sockaddr_un holds 107 bytes and a NUL.
    if (path.size() > 107) return bad("a Unix socket path is at most 107 bytes");
    if (path.find('\0') != std::string_view::npos) return bad("NUL in the path");
    MigrationTarget target;
    target.unix_path = std::string(path);
    return target;
  }
  constexpr std::string_view kScheme = "tcp:";
  if (!uri.starts_with(kScheme)) return bad("unknown scheme");
  std::string_view rest = uri.substr(kScheme.size());
  size_t colon = rest.rfind(':');
  if (colon == std::string_view::npos) return bad("no port");
  std::string_view host = rest.substr(0, colon);
  std::string_view port_text = rest.substr(colon + 1);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
    if (host.find(':') == std::string_view::npos) return bad("brackets are for IPv6 addresses");
  } else if (host.find(':') != std::string_view::npos) {
    return bad("write an IPv6 address in brackets, tcp:[::1]:PORT");
  }
  if (host.empty()) return bad("no host");
  if (host.size() > 253 || !std::all_of(host.begin(), host.end(), IsHostChar)) {
    return bad("bad host name");
  }
  uint32_t port = 0;
  auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (ec != std::errc() || end != port_text.data() + port_text.size() || port == 0 ||
      port > 65535) {
    return bad("the port must be 1 to 65535");
  }
  MigrationTarget target;
  target.host = std::string(host);
  target.port = static_cast<uint16_t>(port);
  return target;
}

void to_json(nlohmann::json& j, const MigrateRequest& request) {
  j = nlohmann::json{{"to", request.to.ToString()},
                     {"mode", MigrationModeName(request.mode)},
                     {"channels", request.channels},
                     {"downtime_ms", request.downtime_ms},
                     {"bandwidth_bytes_per_sec", request.bandwidth_bytes_per_sec}};
  if (request.mode == MigrationMode::kPostcopy) {
    j["precopy_passes"] = request.precopy_passes;
    j["postcopy_on_command"] = request.postcopy_on_command;
    j["postcopy_answers"] = request.answers_on_bulk ? "bulk" : "priority";
  }
  if (request.local) j["local"] = true;
  if (!request.tls_dir.empty()) j["tls_dir"] = request.tls_dir;
  if (!request.tls_peer_name.empty()) j["tls_peer_name"] = request.tls_peer_name;
}

Result<MigrateRequest> ParseMigrateRequest(const nlohmann::json& args) {
  JsonFields f(args);
  RETURN_IF_ERROR(f.CheckObject());
  RETURN_IF_ERROR(f.RejectUnknown(
      {"to", "mode", "channels", "downtime_ms", "bandwidth_bytes_per_sec", "precopy_passes",
       "postcopy_on_command", "postcopy_answers", "local", "tls_dir", "tls_peer_name"}));
  MigrateRequest r;
  ASSIGN_OR_RETURN(std::string to, f.String("to"));
  ASSIGN_OR_RETURN(r.to, ParseMigrationTarget(to));
  ASSIGN_OR_RETURN(std::optional<std::string> mode, f.OptionalString("mode"));
  if (mode) {
    ASSIGN_OR_RETURN(r.mode, ParseMigrationMode(*mode));
  }
  ASSIGN_OR_RETURN(std::optional<uint64_t> channels,
                   f.OptionalUint("channels", 1, kMaxMigrationChannels));
  r.channels = static_cast<uint32_t>(channels.value_or(1));
  // An hour is far beyond any sensible downtime; the bound catches unit slips.
  ASSIGN_OR_RETURN(std::optional<uint64_t> downtime, f.OptionalUint("downtime_ms", 1, 3'600'000));
  r.downtime_ms = downtime.value_or(kDefaultDowntimeMs);
  ASSIGN_OR_RETURN(std::optional<uint64_t> bandwidth, f.OptionalUint("bandwidth_bytes_per_sec"));
  r.bandwidth_bytes_per_sec = bandwidth.value_or(0);
  ASSIGN_OR_RETURN(std::optional<uint64_t> passes, f.OptionalUint("precopy_passes", 0, 1000));
  ASSIGN_OR_RETURN(std::optional<bool> on_command, f.OptionalBool("postcopy_on_command"));
  ASSIGN_OR_RETURN(std::optional<std::string> answers, f.OptionalString("postcopy_answers"));
  if ((passes || on_command || answers) && r.mode != MigrationMode::kPostcopy) {
    return InvalidArgument(
        "precopy_passes, postcopy_on_command and postcopy_answers apply to mode postcopy only; "
        "add \"mode\": \"postcopy\" or drop them");
  }
  if (answers && *answers != "priority" && *answers != "bulk") {
    return InvalidArgument(
        "postcopy_answers must be \"priority\" (the default) or \"bulk\" (behind the push, "
        "for comparison), not \"{}\"",
        *answers);
  }
  r.answers_on_bulk = answers == "bulk";
  r.precopy_passes = static_cast<uint32_t>(passes.value_or(1));
  r.postcopy_on_command = on_command.value_or(false);
  ASSIGN_OR_RETURN(std::optional<bool> local, f.OptionalBool("local"));
  r.local = local.value_or(false);
  if (r.local && !r.to.is_unix()) {
    return InvalidArgument(
        "local: true moves the guest to another process on this host, over a Unix socket: "
        "\"to\" must be unix:PATH, not {}",
        r.to.ToString());
  }
  ASSIGN_OR_RETURN(std::optional<std::string> tls_dir, f.OptionalString("tls_dir"));
  ASSIGN_OR_RETURN(std::optional<std::string> tls_peer_name, f.OptionalString("tls_peer_name"));
  r.tls_dir = tls_dir.value_or("");
  r.tls_peer_name = tls_peer_name.value_or("");
  if (!r.tls_dir.empty() && r.to.is_unix()) {
    return InvalidArgument(
        "tls_dir protects tcp: targets; a unix: socket stays on this host (drop tls_dir)");
  }
  return r;
}

double MigrationStatus::Percent() const {
  if (phase == MigrationPhase::kCompleted) return 100.0;
  if (bytes_total == 0) return 0.0;
  uint64_t remaining = std::min(bytes_remaining, bytes_total);
  return 100.0 * static_cast<double>(bytes_total - remaining) / static_cast<double>(bytes_total);
}

void to_json(nlohmann::json& j, const MigrationStatus& s) {
  j = nlohmann::json{{"phase", MigrationPhaseName(s.phase)},
                     {"mode", MigrationModeName(s.mode)},
                     {"to", s.to},
                     {"pass", s.pass},
                     {"bytes_total", s.bytes_total},
                     {"bytes_sent", s.bytes_sent},
                     {"bytes_remaining", s.bytes_remaining},
                     {"pages_sent", s.pages_sent},
                     {"dirty_rate_bytes_per_sec", s.dirty_rate_bytes_per_sec},
                     {"bandwidth_bytes_per_sec", s.bandwidth_bytes_per_sec},
                     {"eta_ms", OptionalToJson(s.eta_ms)},
                     {"downtime_ms", OptionalToJson(s.downtime_ms)},
                     {"elapsed_ms", s.elapsed_ms}};
  if (!s.error.empty()) j["error"] = s.error;
  if (!s.tls.empty()) j["tls"] = s.tls;
  if (s.downtime_us) j["downtime_us"] = *s.downtime_us;
  if (s.mode == MigrationMode::kPostcopy) {
    auto optional_us = [](const std::optional<double>& v) {
      return v ? nlohmann::json(*v) : nlohmann::json(nullptr);
    };
    j["paused"] = s.paused;
    j["pages_demanded"] = s.pages_demanded;
    j["pages_pushed"] = s.pages_pushed;
    j["requests_rejected"] = s.requests_rejected;
    j["sessions"] = s.sessions;
    j["fault_p50_us"] = optional_us(s.fault_p50_us);
    j["fault_p99_us"] = optional_us(s.fault_p99_us);
  }
  if (s.local) {
    j["local"] = true;
    j["memory"] = s.local_memory;
    j["fds_passed"] = s.fds_passed;
    j["pages_copied"] = s.pages_copied;
  }
}

Result<MigrationStatus> ParseMigrationStatus(const nlohmann::json& reply) {
  // Unknown fields are allowed: a newer VMM may report more.
  JsonFields f(reply, "field");
  if (!reply.is_object()) return Error("a query-migrate reply must be a JSON object");
  MigrationStatus s;
  ASSIGN_OR_RETURN(std::string phase, f.String("phase"));
  ASSIGN_OR_RETURN(s.phase, ParseMigrationPhase(phase));
  ASSIGN_OR_RETURN(std::optional<std::string> mode, f.OptionalString("mode"));
  if (mode) {
    ASSIGN_OR_RETURN(s.mode, ParseMigrationMode(*mode));
  }
  ASSIGN_OR_RETURN(std::optional<std::string> to, f.OptionalString("to"));
  s.to = to.value_or("");
  ASSIGN_OR_RETURN(uint64_t pass, f.Uint("pass", 0, UINT32_MAX));
  s.pass = static_cast<uint32_t>(pass);
  ASSIGN_OR_RETURN(s.bytes_total, f.Uint("bytes_total"));
  ASSIGN_OR_RETURN(s.bytes_sent, f.Uint("bytes_sent"));
  ASSIGN_OR_RETURN(std::optional<uint64_t> remaining, f.OptionalUint("bytes_remaining"));
  s.bytes_remaining = remaining.value_or(0);
  ASSIGN_OR_RETURN(std::optional<uint64_t> pages, f.OptionalUint("pages_sent"));
  s.pages_sent = pages.value_or(0);
  ASSIGN_OR_RETURN(std::optional<uint64_t> dirty, f.OptionalUint("dirty_rate_bytes_per_sec"));
  s.dirty_rate_bytes_per_sec = dirty.value_or(0);
  ASSIGN_OR_RETURN(std::optional<uint64_t> bandwidth, f.OptionalUint("bandwidth_bytes_per_sec"));
  s.bandwidth_bytes_per_sec = bandwidth.value_or(0);
  ASSIGN_OR_RETURN(s.eta_ms, f.OptionalUint("eta_ms"));
  ASSIGN_OR_RETURN(s.downtime_ms, f.OptionalUint("downtime_ms"));
  ASSIGN_OR_RETURN(s.downtime_us, f.OptionalUint("downtime_us"));
  ASSIGN_OR_RETURN(std::optional<uint64_t> elapsed, f.OptionalUint("elapsed_ms"));
  s.elapsed_ms = elapsed.value_or(0);
  ASSIGN_OR_RETURN(std::optional<std::string> error, f.OptionalString("error"));
  s.error = error.value_or("");
  ASSIGN_OR_RETURN(std::optional<std::string> tls, f.OptionalString("tls"));
  s.tls = tls.value_or("");
  ASSIGN_OR_RETURN(std::optional<bool> paused, f.OptionalBool("paused"));
  s.paused = paused.value_or(false);
  ASSIGN_OR_RETURN(std::optional<uint64_t> demanded, f.OptionalUint("pages_demanded"));
  s.pages_demanded = demanded.value_or(0);
  ASSIGN_OR_RETURN(std::optional<uint64_t> pushed, f.OptionalUint("pages_pushed"));
  s.pages_pushed = pushed.value_or(0);
  ASSIGN_OR_RETURN(std::optional<uint64_t> rejected, f.OptionalUint("requests_rejected"));
  s.requests_rejected = rejected.value_or(0);
  ASSIGN_OR_RETURN(std::optional<uint64_t> sessions, f.OptionalUint("sessions", 0, UINT32_MAX));
  s.sessions = static_cast<uint32_t>(sessions.value_or(0));
  ASSIGN_OR_RETURN(std::optional<bool> local, f.OptionalBool("local"));
  s.local = local.value_or(false);
  ASSIGN_OR_RETURN(std::optional<std::string> memory, f.OptionalString("memory"));
  s.local_memory = memory.value_or("");
  ASSIGN_OR_RETURN(std::optional<uint64_t> fds, f.OptionalUint("fds_passed", 0, UINT32_MAX));
  s.fds_passed = static_cast<uint32_t>(fds.value_or(0));
  ASSIGN_OR_RETURN(std::optional<uint64_t> copied, f.OptionalUint("pages_copied"));
  s.pages_copied = copied.value_or(0);
  for (auto [name, out] :
       {std::pair{"fault_p50_us", &s.fault_p50_us}, std::pair{"fault_p99_us", &s.fault_p99_us}}) {
    auto it = reply.find(name);
    if (it == reply.end() || it->is_null()) continue;
    if (!it->is_number()) return Error("field '{}' must be a number or null", name);
    *out = it->get<double>();
  }
  return s;
}

const char* VmStateName(VmState state) {
  switch (state) {
    case VmState::kCreated:
      return "created";
    case VmState::kRunning:
      return "running";
    case VmState::kPaused:
      return "paused";
    case VmState::kFinished:
      return "finished";
    case VmState::kFailed:
      return "failed";
  }
  return "created";
}

void to_json(nlohmann::json& j, const VmStatus& s) {
  nlohmann::json guest = nlohmann::json::array();
  for (size_t i = 0; i < s.guest.size(); ++i) {
    const GuestVcpuProgress& g = s.guest[i];
    guest.push_back({{"vcpu", i},
                     {"booted", g.booted},
                     {"phase", g.phase},
                     {"generation", g.generation},
                     {"ops", g.ops},
                     {"done", g.done}});
  }
  j = nlohmann::json{{"state", VmStateName(s.state)},
                     {"vcpus", s.vcpus},
                     {"mem_bytes", s.mem_bytes},
                     {"backing", s.backing},
                     {"uptime_ms", s.uptime_ms},
                     {"guest", std::move(guest)},
                     {"pages_verified", s.pages_verified},
                     {"bad_pages", s.bad_pages},
                     {"migration", MigrationPhaseName(s.migration)}};
  if (!s.error.empty()) j["error"] = s.error;
}

}  // namespace faultline::control
