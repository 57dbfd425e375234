// Post-copy through the tools, for the integration tests: a destination
// `faultline run --incoming tcp:HOST:0 --postcopy`, waiting for the paused
// state, and checking that the guest verified every page on the destination.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/integration/cli_process.h"

namespace faultline::clitest {

// Where a process of the tests runs and what it is given besides the
// test's own arguments.
struct Host {
  std::string address = "127.0.0.1";  // a destination listens here
  std::vector<std::string> prefix;    // see Cli: e.g. `ip netns exec NS`
  std::vector<std::string> extra;     // more arguments, e.g. --link-timeout-ms
};

// A destination waiting for a post-copy migration on `host.address` (any
// port); its port once it listens (0 if it never did).
inline Destination StartPostcopyDestination(const std::string& mem, const std::string& backing,
                                            const std::string& control = "",
                                            const Host& host = {}) {
  Destination d;
  const std::string listen = fmt::format("tcp:{}:", host.address);
  std::vector<std::string> args{"run",    "--incoming", listen + "0", "--postcopy", "--mem",
                                mem,      "--vcpus",    "2",          "--backing",  backing,
                                "--json", "--quiet",    "--timeout",  "120"};
  if (!control.empty()) args.insert(args.end(), {"--control", control});
  args.insert(args.end(), host.extra.begin(), host.extra.end());
  d.cli = std::make_unique<Cli>(std::move(args), FAULTLINE_CLI_PATH, host.prefix);
  // "... waiting for a post-copy migration on tcp:HOST:PORT (move installer)"
  std::optional<std::string> line = d.cli->AwaitStderr("waiting for a post-copy migration on", 60s);
  if (line && line->find(listen) != std::string::npos) {
    d.port = static_cast<uint16_t>(std::stoul(line->substr(line->find(listen) + listen.size())));
  }
  return d;
}

// The source's query-migrate once it says the migration is paused (its
// link broke in post-copy); nothing if `migrate` (the `faultline migrate`
// that follows it) ended first or 60 s passed.
inline std::optional<nlohmann::json> AwaitPaused(const std::string& control, Cli& migrate) {
  for (auto deadline = Clock::now() + 60s; Clock::now() < deadline && migrate.Running();) {
    std::optional<nlohmann::json> q = Query(control, "query-migrate");
    if (q && (*q)["paused"] == true) return q;
    std::this_thread::sleep_for(50ms);
  }
  return std::nullopt;
}

// The destination ran the guest to the end and it verified every page the
// source's guest had written.
inline void ExpectPostcopyVerified(Cli& dest, uint64_t written, uint32_t sessions,
                                   const std::string& installer, uint32_t min_passes = 0) {
  ExpectVerifiedOn(dest, written);
  if (::testing::Test::HasFatalFailure()) return;
  nlohmann::json d = dest.Json();
  const nlohmann::json& in = d["incoming"];
  EXPECT_EQ(in["mode"], "postcopy") << d.dump();
  EXPECT_EQ(in["sessions"].get<uint32_t>(), sessions) << d.dump();
  // `installer` is the backing's candidates for --installer auto
  // ("copy|move"): the one measured fastest at start, with its trials.
  EXPECT_NE(installer.find(in["installer"].get<std::string>()), std::string::npos) << d.dump();
  EXPECT_EQ(in["installer_calibration"]["chosen"], in["installer"]) << d.dump();
  EXPECT_EQ(in["installer_calibration"]["trials"].size(), 2u) << d.dump();
  EXPECT_GE(in["passes"].get<uint32_t>(), min_passes) << d.dump();
  fmt::print(
      "post-copy destination: {} sessions, {} pages demanded, {} pushed, fault p50 {} us "
      "p99 {} us, blocked {} ms\n",
      in["sessions"].dump(), in["pages_demanded"].dump(), in["pages_pushed"].dump(),
      in["fault_p50_us"].dump(), in["fault_p99_us"].dump(), in["blocked_ms"].dump());
}

}  // namespace faultline::clitest
