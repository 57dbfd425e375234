// The typed payloads of the control socket (docs/control.md): the arguments
// of "migrate", the reply of "query-migrate" (MigrationStatus, which the
// migration engine fills) and the reply of "query-status" (VmStatus).
//
// to_json is found by nlohmann's ADL, so `nlohmann::json j = status;` works.
// Parsing returns a Result instead of throwing: a reply or request from the
// socket is untrusted input.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "faultline/status.h"

namespace faultline::control {

// The life of one migration, as query-migrate reports it. none -> setup ->
// precopy -> [postcopy] -> switchover -> completed, or failed / cancelled
// from any non-terminal phase. (In post-copy mode the switchover, which
// stops the source's vCPUs, comes before the postcopy phase.)
enum class MigrationPhase {
  kNone,  // no migration has been started
  kSetup,
  kPrecopy,
  kPostcopy,
  kSwitchover,
  kCompleted,
  kFailed,
  kCancelled,
};
const char* MigrationPhaseName(MigrationPhase phase);  // "none", "setup", ...
Result<MigrationPhase> ParseMigrationPhase(std::string_view name);
// Completed, failed and cancelled: nothing will change any more.
bool IsTerminal(MigrationPhase phase);
// Setup through switchover.
inline bool IsActive(MigrationPhase phase) {
  return phase != MigrationPhase::kNone && !IsTerminal(phase);
}

enum class MigrationMode { kPrecopy, kPostcopy };
const char* MigrationModeName(MigrationMode mode);  // "precopy", "postcopy"
Result<MigrationMode> ParseMigrationMode(std::string_view name);

// Where the destination listens: "tcp:HOST:PORT" (HOST may be "[v6addr]"),
// or "unix:PATH", a Unix socket on this host.
struct MigrationTarget {
  std::string host;
  uint16_t port = 0;
  std::string unix_path = {};  // set for unix:PATH (host and port are then unused)
  bool is_unix() const { return !unix_path.empty(); }
  std::string ToString() const;  // the tcp:HOST:PORT or unix:PATH form
};
Result<MigrationTarget> ParseMigrationTarget(std::string_view uri);

// The wire protocol's bound (migration::kMaxPageChannels; source.cc
// checks that they agree).
inline constexpr uint32_t kMaxMigrationChannels = 16;
inline constexpr uint64_t kDefaultDowntimeMs = 50;

// The arguments of "migrate".
struct MigrateRequest {
  MigrationTarget to;
  MigrationMode mode = MigrationMode::kPrecopy;
  uint32_t channels = 1;  // TCP connections, 1..kMaxMigrationChannels
  // The longest the guest may be stopped at the switchover; pre-copy keeps
  // iterating until the remaining dirty memory fits in it.
  uint64_t downtime_ms = kDefaultDowntimeMs;
  uint64_t bandwidth_bytes_per_sec = 0;  // 0: unlimited
  // Post-copy only: pre-copy passes before the switch to post-copy (0:
  // straight away), or, with postcopy_on_command, pass after pass until
  // migrate-start-postcopy.
  uint32_t precopy_passes = 1;
  bool postcopy_on_command = false;
  // Post-copy only, for comparison (QEMU's post-copy without preempt):
  // "postcopy_answers": "bulk" sends the answers to page requests behind the
  // push on page channel 0 instead of on the priority channel ("priority").
  bool answers_on_bulk = false;
  // A local update (to a unix: target): the guest's memory is handed to the
  // destination process by file descriptor and not copied; memory that
  // cannot be passed (anonymous) falls back to copying in `mode`.
  bool local = false;
  // TLS (tcp: targets): a directory with ca.pem, cert.pem and key.pem
  // (docs/protocol.md section 8.2), and optionally the name the
  // destination's certificate must carry. Empty: the VMM's own (faultline
  // run --tls-dir), if any.
  std::string tls_dir;
  std::string tls_peer_name;
};
void to_json(nlohmann::json& j, const MigrateRequest& request);
Result<MigrateRequest> ParseMigrateRequest(const nlohmann::json& args);

// The reply of "query-migrate". Byte counts are of guest memory payload.
struct MigrationStatus {
  MigrationPhase phase = MigrationPhase::kNone;
  MigrationMode mode = MigrationMode::kPrecopy;
  std::string to;                // tcp:HOST:PORT, empty for phase none
  uint32_t pass = 0;             // pre-copy pass, 1 for the first full pass; 0 before
  uint64_t bytes_total = 0;      // guest RAM being migrated
  uint64_t bytes_sent = 0;       // over all passes, can exceed bytes_total
  uint64_t bytes_remaining = 0;  // not yet sent in this pass, plus known dirty
  uint64_t pages_sent = 0;
  uint64_t dirty_rate_bytes_per_sec = 0;
  uint64_t bandwidth_bytes_per_sec = 0;  // measured send rate
  std::optional<uint64_t> eta_ms;        // null while it cannot be estimated
  // Null until measured: the time the guest was stopped at the switchover.
  std::optional<uint64_t> downtime_ms;
  // The same in microseconds, where the engine measures it that finely (a
  // local update's pause is well under a millisecond's resolution).
  std::optional<uint64_t> downtime_us;
  uint64_t elapsed_ms = 0;  // since "migrate" was accepted
  std::string error;        // why, for phase failed (and cancelled, if known)
  // TLS channels: protocol, cipher, and on how many channels the kernel
  // took over encryption (TlsContext::Describe); empty without TLS.
  std::string tls;

  // Post-copy (mode postcopy; in JSON only then). The source's view: pages
  // the destination asked for (demanded by its faults) against pages pushed
  // in the background; paused while the link is broken (migrate-resume).
  // Fault latency is measured where the faults happen, at the destination:
  // null here unless the reporter knows it.
  bool paused = false;
  uint64_t pages_demanded = 0;
  uint64_t pages_pushed = 0;
  // The source's: page requests it refused (an index out of range, say),
  // as a destination that misbehaves or an attacker on the path sends.
  uint64_t requests_rejected = 0;
  uint32_t sessions = 0;  // 1 + resumes
  std::optional<double> fault_p50_us;
  std::optional<double> fault_p99_us;

  // Local update (local: true in JSON, only then): how the memory moved,
  // "fds" (passed, nothing copied; bytes_sent is then the state on the
  // socket) or "copy" (anonymous memory, copied by a migration in `mode`).
  bool local = false;
  std::string local_memory;
  uint32_t fds_passed = 0;
  uint64_t pages_copied = 0;

  // How far along: 100 * (total - remaining) / total, 100 when completed.
  double Percent() const;
};
void to_json(nlohmann::json& j, const MigrationStatus& status);
Result<MigrationStatus> ParseMigrationStatus(const nlohmann::json& reply);

enum class VmState { kCreated, kRunning, kPaused, kFinished, kFailed };
const char* VmStateName(VmState state);  // "created", "running", ...

// One vCPU's workload as the test guest last reported it.
struct GuestVcpuProgress {
  bool booted = false;
  std::string phase;  // "fill", "verify", ...; empty before the first report
  uint32_t generation = 0;
  uint64_t ops = 0;  // pages written, verified or touched in that phase
  bool done = false;
};

// The reply of "query-status".
struct VmStatus {
  VmState state = VmState::kCreated;
  uint32_t vcpus = 0;
  uint64_t mem_bytes = 0;
  std::string backing;  // "anon", "memfd", "hugetlb", "gmem"
  uint64_t uptime_ms = 0;
  std::vector<GuestVcpuProgress> guest;  // one per vCPU
  uint64_t pages_verified = 0;
  uint64_t bad_pages = 0;
  MigrationPhase migration = MigrationPhase::kNone;
  std::string error;  // for state failed
};
void to_json(nlohmann::json& j, const VmStatus& status);

}  // namespace faultline::control
