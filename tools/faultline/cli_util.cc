#include "tools/faultline/cli_util.h"

#include <CLI/CLI.hpp>
#include <memory>
#include <mutex>

#include <charconv>
#include <cmath>
#include <map>

#include <fmt/format.h>

#include "src/migration/tls_transport.h"

namespace faultline::cli {

void AddAccelOptions(CLI::App* command, AccelOptions* options) {
  command
      ->add_option("--accel", options->accel,
                   "Accelerator: auto (KVM when /dev/kvm opens, else the software CPU), kvm, tcg "
                   "(the software CPU, libunicorn)")
      ->capture_default_str();
  command->add_option("--dirty", options->dirty,
                      "Dirty tracking: bitmap or ring (KVM's dirty log), uffd-wp (userfaultfd "
                      "write-protect, any accelerator; default on tcg)");
}

Status ApplyAccelOptions(const AccelOptions& options, vmm::VmConfig& config) {
  Result<hv::AccelChoice> accel = hv::ParseAccel(options.accel);
  if (!accel.has_value()) return accel.error().WithContext("--accel");
  config.accel = *accel;
  if (!options.dirty.empty()) {
    Result<DirtyLogMode> dirty = ParseDirtyLogMode(options.dirty);
    if (!dirty.has_value()) return dirty.error().WithContext("--dirty");
    config.dirty_mode = *dirty;
  }
  // Copies of the config (a demo's two VMs) share the flag: said once.
  auto said = std::make_shared<std::once_flag>();
  config.on_accel_fallback = [said](std::string_view why) {
    std::call_once(*said, [&] {
      fmt::print(stderr,
                 "faultline: no KVM ({}): running on the software CPU (tcg); --accel kvm "
                 "makes this an error\n",
                 why);
    });
  };
  return Status::Ok();
}

Status ApplyMachineOptions(const std::string& guest, std::string_view mem, uint32_t vcpus,
                           std::string_view backing, const AccelOptions& accel,
                           vmm::VmConfig& config) {
  config.guest_path = guest;
  Result<uint64_t> size = ParseSize(mem);
  if (!size.has_value()) return size.error().WithContext("--mem");
  config.mem_size = *size;
  config.vcpus = vcpus;
  Result<Backing> parsed = ParseBacking(backing);
  if (!parsed.has_value()) return parsed.error().WithContext("--backing");
  config.backing = *parsed;
  return ApplyAccelOptions(accel, config);
}

Result<uint64_t> ParseSize(std::string_view text) {
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end == text.data()) {
    return Error("'{}' is not a size: use a number with an optional K, M or G suffix (e.g. 2G)",
                 text);
  }
  std::string suffix(end, text.data() + text.size());
  for (char& c : suffix) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  static const std::map<std::string, int> kShifts = {
      {"", 0},    {"B", 0},    {"K", 10}, {"KB", 10}, {"KIB", 10}, {"M", 20},
      {"MB", 20}, {"MIB", 20}, {"G", 30}, {"GB", 30}, {"GIB", 30}, {"T", 40}};
  auto it = kShifts.find(suffix);
  if (it == kShifts.end()) {
    return Error("'{}' has an unknown size suffix '{}': use K, M or G", text, suffix);
  }
  if (it->second > 0 && value > (UINT64_MAX >> it->second)) return Error("'{}' is too large", text);
  return value << it->second;
}

Result<std::string> WorkloadToGuestArgs(std::string_view workload, double duration_s) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (start <= workload.size()) {
    size_t comma = workload.find(',', start);
    if (comma == std::string_view::npos) comma = workload.size();
    parts.emplace_back(workload.substr(start, comma - start));
    start = comma + 1;
  }
  static const std::map<std::string, std::string> kPhases = {
      {"verify", "fill,verify"},
      {"fill", "fill"},
      {"random", "fill,random,verify"},
      {"hotset", "fill,hotset,verify"},
      {"touch", "touch"},
      {"triplefault", "triplefault"},
      // For snapshots: random writes until the VMM says stop (a restore with
      // --guest-stop), then a hot-set phase of a fixed length, then verify.
      {"random-hotset", "fill,random,hotset,verify until_command=1 hot_ops=4096"},
  };
  auto it = kPhases.find(parts[0]);
  if (it == kPhases.end()) {
    return Error(
        "unknown workload '{}': choose verify, fill, random, hotset, random-hotset, touch or "
        "triplefault, then optional ,key=value guest options",
        parts[0]);
  }
  std::string args = "workload=" + it->second;
  for (size_t i = 1; i < parts.size(); ++i) {
    const std::string& kv = parts[i];
    size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0 || kv.find_first_of(" \t") != std::string::npos) {
      return Error("workload option '{}' is not key=value", kv);
    }
    args += " " + kv;
  }
  if (duration_s > 0) {
    args += fmt::format(" duration_ms={}", static_cast<uint64_t>(std::llround(duration_s * 1000)));
  }
  return args;
}

nlohmann::json ReportToJson(const GuestReport& report) {
  nlohmann::json j;
  j["success"] = report.success();
  j["pages_verified"] = report.pages_verified();
  j["bad_pages"] = report.bad_page_count();
  j["max_stall_us"] = report.CyclesToUs(report.max_stall_cycles());
  j["tsc_khz"] = report.tsc_khz;
  nlohmann::json vcpus = nlohmann::json::array();
  for (size_t i = 0; i < report.vcpus.size(); ++i) {
    const GuestVcpuReport& v = report.vcpus[i];
    nlohmann::json jv;
    jv["vcpu"] = i;
    jv["region"] = {v.region_start.value, v.region_end.value};
    jv["pages"] = v.pages;
    jv["done"] = v.done;
    jv["status"] = v.status;
    jv["exit_code"] = v.exit_code ? nlohmann::json(*v.exit_code) : nlohmann::json();
    jv["pages_verified"] = v.pages_verified;
    jv["bad_pages"] = v.bad_pages;
    jv["max_stall_us"] = report.CyclesToUs(v.max_stall_cycles);
    if (v.panic) jv["panic"] = *v.panic;
    nlohmann::json phases = nlohmann::json::array();
    for (const GuestPhase& p : v.phases) {
      double seconds = report.CyclesToUs(p.cycles) / 1e6;
      phases.push_back({{"phase", GuestPhaseName(p.phase)},
                        {"generation", p.generation},
                        {"ops", p.ops},
                        {"pages_verified", p.pages_verified},
                        {"bad_pages", p.bad_pages},
                        {"seconds", seconds},
                        {"pages_per_sec", seconds > 0 ? p.ops / seconds : 0.0},
                        {"max_stall_us", report.CyclesToUs(p.max_stall_cycles)}});
    }
    jv["phases"] = phases;
    vcpus.push_back(jv);
  }
  j["vcpus"] = vcpus;
  nlohmann::json bad = nlohmann::json::array();
  for (const GuestBadPage& b : report.bad_pages) {
    bad.push_back({{"vcpu", b.vcpu},
                   {"gpa", b.gpa.value},
                   {"expected_generation", b.expected_generation},
                   {"word", b.word_index},
                   {"expected", b.expected_word},
                   {"found", b.found_word}});
  }
  j["bad_page_list"] = bad;
  return j;
}

std::string FormatReport(const GuestReport& report) {
  std::string out;
  for (size_t i = 0; i < report.vcpus.size(); ++i) {
    const GuestVcpuReport& v = report.vcpus[i];
    out += fmt::format("vcpu {}: region [{:#x}, {:#x}), {} pages\n", i, v.region_start.value,
                       v.region_end.value, v.pages);
    for (const GuestPhase& p : v.phases) {
      double seconds = report.CyclesToUs(p.cycles) / 1e6;
      out += fmt::format("  {:<7} {:>9} pages  {:>10.0f} pages/s  max stall {:>9.1f} us{}\n",
                         GuestPhaseName(p.phase), p.ops, seconds > 0 ? p.ops / seconds : 0.0,
                         report.CyclesToUs(p.max_stall_cycles),
                         p.bad_pages ? fmt::format("  {} BAD PAGES", p.bad_pages) : "");
    }
    if (v.panic) out += fmt::format("  guest exception: {}\n", *v.panic);
  }
  for (const GuestBadPage& b : report.bad_pages) {
    out += fmt::format(
        "bad page: vcpu {} gpa {:#x} generation {} word {}: expected {:#018x}, "
        "found {:#018x}\n",
        b.vcpu, b.gpa.value, b.expected_generation, b.word_index, b.expected_word, b.found_word);
  }
  out += fmt::format("{}: {} pages verified, {} bad pages, max stall {:.1f} us\n",
                     report.success() ? "PASS" : "FAIL", report.pages_verified(),
                     report.bad_page_count(), report.CyclesToUs(report.max_stall_cycles()));
  return out;
}

CLI::Option* AddTlsOptions(CLI::App* command, TlsOptions* options) {
  CLI::Option* dir = command->add_option(
      "--tls-dir", options->dir,
      "TLS 1.3 on every migration channel: DIR holds ca.pem, cert.pem and key.pem (both ends' "
      "certificates from one CA)");
  command
      ->add_option("--tls-peer-name", options->peer_name,
                   "With --tls-dir: the peer's certificate must carry this DNS name or IP address")
      ->needs(dir);
  return dir;
}

Result<migration::TransportOptions> TransportFor(const TlsOptions& options,
                                                 std::string_view command) {
  migration::TransportOptions transport;
  if (options.dir.empty()) return transport;
  Result<std::shared_ptr<migration::TlsContext>> tls =
      migration::TlsContext::Load(options.dir, options.peer_name);
  if (!tls.has_value()) return tls.error().WithContext("--tls-dir");
  transport.tls = std::move(*tls);
  transport.on_refused = [command = std::string(command)](const std::string& line) {
    fmt::print(stderr, "faultline {}: {}\n", command, line);
    std::fflush(stderr);
  };
  return transport;
}

}  // namespace faultline::cli
