#include "src/control/destination.h"

#include <algorithm>

#include <fmt/format.h>

#include "src/migration/wire.h"

namespace faultline::control {
namespace {

nlohmann::json LatencyOrNull(const paging::LatencySummary& l, double us) {
  return l.count > 0 ? nlohmann::json(us) : nlohmann::json();
}

// A number from `j[key]`, or `fallback` when absent or not a number.
double Number(const nlohmann::json& j, const char* key, double fallback = 0) {
  auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<double>() : fallback;
}

std::string Us(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_number() ? fmt::format("{:.1f} us", it->get<double>()) : "-";
}

}  // namespace

nlohmann::json PostcopyFiguresJson(const migration::PostcopyDestinationStats& s) {
  const paging::PagingStats& p = s.paging;
  const migration::NetworkSourceStats& n = s.network;
  nlohmann::json vcpus = nlohmann::json::array();
  for (size_t i = 0; i < p.vcpu_faults.size(); ++i) {
    const paging::LatencySummary& l =
        i < p.vcpu_latency.size() ? p.vcpu_latency[i] : paging::LatencySummary{};
    vcpus.push_back({{"vcpu", i},
                     {"faults", p.vcpu_faults[i]},
                     {"fault_p50_us", LatencyOrNull(l, l.p50_us)},
                     {"fault_p99_us", LatencyOrNull(l, l.p99_us)},
                     {"max_us", LatencyOrNull(l, l.max_us)},
                     {"blocked_ms", l.total_us / 1e3}});
  }
  return {
      {"fault_p50_us", LatencyOrNull(p.latency, p.latency.p50_us)},
      {"fault_p99_us", LatencyOrNull(p.latency, p.latency.p99_us)},
      {"faults", p.faults},
      {"blocked_ms", p.blocked_seconds() * 1e3},
      {"vcpus", vcpus},
      {"other_faults", p.other_faults},
      {"request_p50_us", LatencyOrNull(n.fault_latency, n.fault_latency.p50_us)},
      {"request_p99_us", LatencyOrNull(n.fault_latency, n.fault_latency.p99_us)},
      {"requests", n.fault_latency.count},
      {"pages_demanded", n.pages_demanded},
      {"pages_pushed", n.pages_pushed},
      {"present_at_start", s.present_at_start},
      // Fault-path threads here running SCHED_FIFO: the reply reader and the
      // userfaultfd handlers (0: not permitted, or --realtime-priority 0).
      {"realtime_threads", p.realtime_threads + (s.realtime ? 1 : 0)},
  };
}

std::string PostcopyFiguresLine(const migration::PostcopyDestinationStats& s) {
  const paging::PagingStats& p = s.paging;
  std::string line = fmt::format(
      "{} pages demanded, {} pushed; {} faults, latency p50 {:.0f} us, p99 {:.0f} us; vCPUs "
      "blocked {:.1f} ms",
      s.network.pages_demanded, s.network.pages_pushed, p.faults, p.latency.p50_us,
      p.latency.p99_us, p.blocked_seconds() * 1e3);
  for (size_t i = 0; i < p.vcpu_latency.size(); ++i) {
    const paging::LatencySummary& l = p.vcpu_latency[i];
    line += fmt::format("; vcpu {}: {} faults, p50 {:.0f} us, p99 {:.0f} us", i, p.vcpu_faults[i],
                        l.p50_us, l.p99_us);
  }
  return line;
}

MigrationPhase ToMigrationPhase(migration::PostcopyPhase phase) {
  switch (phase) {
    case migration::PostcopyPhase::kNotStarted:
      return MigrationPhase::kSetup;
    case migration::PostcopyPhase::kPrecopy:
      return MigrationPhase::kPrecopy;
    case migration::PostcopyPhase::kPostcopy:
    case migration::PostcopyPhase::kPaused:
      return MigrationPhase::kPostcopy;
    case migration::PostcopyPhase::kCompleted:
      return MigrationPhase::kCompleted;
    case migration::PostcopyPhase::kFailed:
      return MigrationPhase::kFailed;
  }
  return MigrationPhase::kFailed;
}

IncomingStatus::IncomingStatus(MigrationMode mode, uint64_t bytes_total)
    : mode_(mode), bytes_total_(bytes_total), start_(Clock::now()) {}

void IncomingStatus::Attach(const migration::PostcopyDestination* destination) {
  sys::MutexLock lock(mu_);
  destination_ = destination;
}

void IncomingStatus::Detach() {
  sys::MutexLock lock(mu_);
  destination_ = nullptr;
}

void IncomingStatus::SetPhase(MigrationPhase phase) {
  sys::MutexLock lock(mu_);
  phase_ = phase;
}

void IncomingStatus::Finish(MigrationPhase phase, std::string error,
                            const migration::PostcopyDestinationStats* stats) {
  sys::MutexLock lock(mu_);
  destination_ = nullptr;
  phase_ = phase;
  error_ = std::move(error);
  final_ = StatusLocked(stats, phase);
}

MigrationPhase IncomingStatus::phase() const {
  sys::MutexLock lock(mu_);
  if (destination_ != nullptr) return ToMigrationPhase(destination_->phase());
  return phase_;
}

nlohmann::json IncomingStatus::Status() const {
  sys::MutexLock lock(mu_);
  if (!final_.is_null()) return final_;
  if (destination_ == nullptr) return StatusLocked(nullptr, phase_);
  // The live snapshot: the phase first, so that figures are never older
  // than the phase they are shown with.
  const migration::PostcopyPhase phase = destination_->phase();
  const migration::PostcopyDestinationStats stats = destination_->stats();
  nlohmann::json j = StatusLocked(&stats, ToMigrationPhase(phase));
  j["paused"] = phase == migration::PostcopyPhase::kPaused;
  return j;
}

nlohmann::json IncomingStatus::StatusLocked(const migration::PostcopyDestinationStats* stats,
                                            MigrationPhase phase) const {
  MigrationStatus m;
  m.phase = phase;
  m.mode = mode_;
  m.bytes_total = bytes_total_;
  m.elapsed_ms = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start_).count());
  m.error = error_;
  uint64_t received_pages = 0;
  if (stats != nullptr) {
    m.pass = stats->passes;
    m.sessions = stats->sessions;
    received_pages =
        stats->precopy_pages + stats->network.pages_demanded + stats->network.pages_pushed;
    m.pages_demanded = stats->network.pages_demanded;
    m.pages_pushed = stats->network.pages_pushed;
  }
  m.bytes_sent = received_pages * migration::kWirePageSize;
  const uint64_t total_pages = bytes_total_ / migration::kWirePageSize;
  if (phase == MigrationPhase::kCompleted) {
    m.bytes_remaining = 0;
  } else if (stats != nullptr && phase == MigrationPhase::kPostcopy) {
    // Every page is here once: present at the start, demanded or pushed.
    const uint64_t here =
        stats->present_at_start + stats->network.pages_demanded + stats->network.pages_pushed;
    m.bytes_remaining = (total_pages - std::min(here, total_pages)) * migration::kWirePageSize;
  } else {
    m.bytes_remaining = bytes_total_;
  }
  nlohmann::json j = m;
  j["direction"] = "incoming";
  if (stats != nullptr && mode_ == MigrationMode::kPostcopy) {
    j.update(PostcopyFiguresJson(*stats));
  }
  return j;
}

std::string FormatMigrationStatus(const nlohmann::json& s) {
  if (!s.is_object()) return s.dump() + "\n";
  const std::string direction = s.value("direction", "outgoing");
  const std::string mode = s.value("mode", "precopy");
  std::string out = fmt::format("{} {} migration: {}{}", direction, mode, s.value("phase", "?"),
                                s.value("paused", false) ? " (paused: link broken)" : "");
  const std::string to = s.value("to", "");
  if (!to.empty()) out += fmt::format(" to {}", to);
  out += fmt::format(", {:.0f} ms", Number(s, "elapsed_ms"));
  if (auto e = s.find("error"); e != s.end() && e->is_string())
    out += ", error: " + e->get<std::string>();
  out += "\n";
  const double total = Number(s, "bytes_total");
  const double remaining = Number(s, "bytes_remaining");
  out += fmt::format("  memory: {:.0f} MiB, {:.0f} MiB {}, {:.0f} MiB still to come; pass {:.0f}\n",
                     total / 1048576, Number(s, "bytes_sent") / 1048576,
                     direction == "incoming" ? "received" : "sent", remaining / 1048576,
                     Number(s, "pass"));
  if (mode != "postcopy") return out;
  out += fmt::format("  pages: {:.0f} demanded, {:.0f} pushed", Number(s, "pages_demanded"),
                     Number(s, "pages_pushed"));
  if (s.contains("present_at_start")) {
    out += fmt::format(", {:.0f} present at the switchover", Number(s, "present_at_start"));
  }
  out += "\n";
  if (!s.contains("faults")) return out;  // the source does not see faults
  out += fmt::format("  faults: {:.0f}, latency p50 {}, p99 {}; vCPUs blocked {:.1f} ms",
                     Number(s, "faults"), Us(s, "fault_p50_us"), Us(s, "fault_p99_us"),
                     Number(s, "blocked_ms"));
  out += fmt::format(" (network request p50 {}, p99 {})\n", Us(s, "request_p50_us"),
                     Us(s, "request_p99_us"));
  if (auto v = s.find("vcpus"); v != s.end() && v->is_array()) {
    for (const nlohmann::json& c : *v) {
      out +=
          fmt::format("  vcpu {:.0f}: {:.0f} faults, p50 {}, p99 {}, max {}, blocked {:.1f} ms\n",
                      Number(c, "vcpu"), Number(c, "faults"), Us(c, "fault_p50_us"),
                      Us(c, "fault_p99_us"), Us(c, "max_us"), Number(c, "blocked_ms"));
    }
  }
  if (Number(s, "other_faults") > 0) {
    out += fmt::format("  other threads: {:.0f} faults\n", Number(s, "other_faults"));
  }
  return out;
}

}  // namespace faultline::control
