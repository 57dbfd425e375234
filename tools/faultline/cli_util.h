// Parsing and formatting shared by the faultline subcommands.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "faultline/status.h"
#include "src/migration/transport.h"
#include "src/vmm/guest_report.h"
#include "src/vmm/vm.h"

namespace CLI {
class App;
class Option;
}  // namespace CLI

namespace faultline::cli {

// --accel and --dirty, for the commands that create VMs (run, demo, bench).
struct AccelOptions {
  std::string accel = "auto";
  std::string dirty;  // empty: the accelerator's own
};
void AddAccelOptions(CLI::App* command, AccelOptions* options);
// Parses them into `config` (errors name the option and list the choices),
// and has the VM say once on stderr when `auto` chose the software CPU.
Status ApplyAccelOptions(const AccelOptions& options, vmm::VmConfig& config);

// The machine of `faultline run` and `faultline demo`: --guest, --mem,
// --vcpus, --backing and the accelerator options, parsed into `config`
// (errors name the option).
Status ApplyMachineOptions(const std::string& guest, std::string_view mem, uint32_t vcpus,
                           std::string_view backing, const AccelOptions& accel,
                           vmm::VmConfig& config);

// --tls-dir and --tls-peer-name, for the commands that migrate (run,
// migrate, demo, serve-pages --from): TLS 1.3 with both ends' certificates
// checked (docs/protocol.md section 8.2).
struct TlsOptions {
  std::string dir;        // ca.pem, cert.pem, key.pem; empty: plaintext
  std::string peer_name;  // the name the peer's certificate must carry
};
// Returns --tls-dir, for the command's own constraints on it.
CLI::Option* AddTlsOptions(CLI::App* command, TlsOptions* options);
// Transport options with the TLS context of `options` loaded (none without
// --tls-dir; errors name the option), whose refused peers are said on
// stderr as "faultline COMMAND: refused a connection ...".
Result<migration::TransportOptions> TransportFor(const TlsOptions& options,
                                                 std::string_view command);

// "1G", "512M", "64MiB", "2g", "4096": a byte count. Errors say the syntax.
Result<uint64_t> ParseSize(std::string_view text);

// `--workload NAME[,key=value...]` to the guest's command line. Names:
// verify (fill then verify), fill, random (fill, random writes, verify),
// hotset (fill, hot-set rewrites, verify), random-hotset (fill, random
// writes until the VMM's stop command, hot_ops hot-set writes, verify),
// touch, triplefault. A non-zero
// `duration_s` bounds the open-ended phases.
Result<std::string> WorkloadToGuestArgs(std::string_view workload, double duration_s);

// The report as JSON: pages_verified, bad_pages, max_stall_us, success,
// per-vCPU phases and the bad pages.
nlohmann::json ReportToJson(const GuestReport& report);
// The report for a person.
std::string FormatReport(const GuestReport& report);

}  // namespace faultline::cli
