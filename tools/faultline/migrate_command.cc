// faultline migrate: drive a VMM's migration through its control socket and
// show its progress; faultline query: one control command, reply as JSON.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include <fmt/format.h>

#include "src/control/destination.h"
#include "src/control/types.h"
#include "tools/faultline/cli_util.h"
#include "tools/faultline/commands.h"
#include "tools/faultline/control_client.h"

namespace faultline::cli {
namespace {

using Clock = std::chrono::steady_clock;
using control::MigrationPhase;
using control::MigrationStatus;

constexpr int kExitInterrupted = 130;  // the shell's convention for SIGINT
// After a cancel, how long the VMM has to report a terminal phase.
constexpr auto kCancelGrace = std::chrono::seconds(30);

struct MigrateOptions {
  std::string control;
  std::string to;
  std::string mode = "precopy";
  uint32_t channels = 1;
  uint64_t downtime_ms = control::kDefaultDowntimeMs;
  std::string bandwidth = "unlimited";
  bool json = false;
  bool resume = false;
  bool cancel = false;
  bool watch = false;
  bool start_postcopy = false;
  std::optional<uint32_t> precopy_passes;  // mode postcopy
  bool postcopy_on_command = false;
  std::optional<std::string> postcopy_answers;  // mode postcopy: priority or bulk
  bool local = false;
  uint32_t interval_ms = 200;
  TlsOptions tls;  // sent as tls_dir (absolute: the VMM's cwd is not ours)
};

int Fail(const Status& status) {
  fmt::print(stderr, "faultline migrate: error: {}\n", status.ToString());
  return 1;
}

// "unlimited", "0", or a size per second: "100M", "1G/s".
Result<uint64_t> ParseRate(std::string text) {
  if (text == "unlimited") return 0;
  if (text.ends_with("/s")) text.resize(text.size() - 2);
  return ParseSize(text);
}

std::string HumanBytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.1f} {}", bytes, units[u]);
}

// Most telling first: a terminal line is cut to fit 80 columns (a wrapped
// line cannot be rewritten in place), which costs the byte counts at most.
std::string FormatProgress(const MigrationStatus& s) {
  if (s.local && s.local_memory == "fds") {
    return fmt::format("{:<10} local update: {} of RAM handed over by descriptor, not copied",
                       control::MigrationPhaseName(s.phase),
                       HumanBytes(static_cast<double>(s.bytes_total)));
  }
  if (s.phase == MigrationPhase::kPostcopy) {
    return fmt::format("{:<10} {:5.1f}%  {} demanded, {} pushed  {}/s  {} of {} sent",
                       s.paused ? "postcopy PAUSED (link broken: migrate --resume)" : "postcopy",
                       s.Percent(), s.pages_demanded, s.pages_pushed,
                       HumanBytes(static_cast<double>(s.bandwidth_bytes_per_sec)),
                       HumanBytes(static_cast<double>(s.bytes_sent)),
                       HumanBytes(static_cast<double>(s.bytes_total)));
  }
  std::string eta = s.eta_ms ? fmt::format("{:.1f} s", *s.eta_ms / 1000.0) : "-";
  return fmt::format("{:<10} pass {:>2} {:5.1f}%  ETA {}  {}/s  dirty {}/s  {} of {} sent",
                     control::MigrationPhaseName(s.phase), s.pass, s.Percent(), eta,
                     HumanBytes(static_cast<double>(s.bandwidth_bytes_per_sec)),
                     HumanBytes(static_cast<double>(s.dirty_rate_bytes_per_sec)),
                     HumanBytes(static_cast<double>(s.bytes_sent)),
                     HumanBytes(static_cast<double>(s.bytes_total)));
}

// The live progress display: one line rewritten in place on a terminal;
// on anything else a line per phase or pass change, at most one a second
// otherwise. Silent with --json, whose stdout is the final object.
class Progress {
 public:
  explicit Progress(bool enabled) : enabled_(enabled), tty_(isatty(STDOUT_FILENO) == 1) {}
  ~Progress() { Finish(); }

  void Update(const MigrationStatus& s) {
    if (!enabled_) return;
    std::string line = FormatProgress(s);
    auto now = Clock::now();
    if (tty_) {
      constexpr size_t kColumns = 79;
      if (line.size() > kColumns) line.resize(kColumns);
      fmt::print("\r{}\x1b[K", line);  // erase what a longer line left
      std::fflush(stdout);
      open_line_ = true;
    } else if (!printed_ || s.phase != last_phase_ || s.pass != last_pass_ ||
               s.paused != last_paused_ || now - last_print_ >= std::chrono::seconds(1) ||
               control::IsTerminal(s.phase)) {
      fmt::print("{}\n", line);
      std::fflush(stdout);
      last_print_ = now;
    }
    printed_ = true;
    last_phase_ = s.phase;
    last_pass_ = s.pass;
    last_paused_ = s.paused;
  }
  // Ends an in-place line, so that what follows starts on its own.
  void Finish() {
    if (open_line_) fmt::print("\n");
    open_line_ = false;
    std::fflush(stdout);
  }

 private:
  const bool enabled_;
  const bool tty_;
  bool open_line_ = false;
  bool printed_ = false;
  MigrationPhase last_phase_ = MigrationPhase::kNone;
  uint32_t last_pass_ = 0;
  bool last_paused_ = false;
  Clock::time_point last_print_;
};

// Blocks SIGINT and SIGTERM while alive, so that the polling loop takes them
// with sigtimedwait instead of a handler and a global flag. Pending ones are
// consumed before unblocking: they were answered with a cancel already.
class InterruptWatch {
 public:
  InterruptWatch() {
    sigemptyset(&set_);
    sigaddset(&set_, SIGINT);
    sigaddset(&set_, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set_, &old_);
  }
  ~InterruptWatch() {
    timespec zero = {0, 0};
    while (sigtimedwait(&set_, nullptr, &zero) > 0) {
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  // Sleeps `ms`; true if interrupted meanwhile.
  bool Sleep(uint32_t ms) {
    timespec ts = {static_cast<time_t>(ms / 1000), static_cast<long>(ms % 1000) * 1'000'000};
    return sigtimedwait(&set_, nullptr, &ts) > 0;
  }

 private:
  sigset_t set_, old_;
};

// What following a migration has seen so far.
struct Followed {
  nlohmann::json raw;  // the last query-migrate reply, as it came
  MigrationStatus status;
  bool interrupted = false;  // a cancel has been asked for
  Clock::time_point cancel_deadline;
};

// Ctrl-C while following: the first one cancels the migration (but not in
// post-copy, which cannot be), the next one leaves. Returns the exit code
// when leaving, nothing to follow on.
std::optional<int> OnInterrupt(ControlClient& client, Followed& f) {
  if (f.status.phase == MigrationPhase::kPostcopy) {
    // Past the switchover nothing can be cancelled: the guest runs at the
    // destination and needs the pages only the source has.
    fmt::print(stderr,
               "faultline migrate: interrupted; the post-copy migration goes on (follow it "
               "with `faultline migrate --watch`)\n");
    return kExitInterrupted;
  }
  if (f.interrupted) {
    fmt::print(stderr, "faultline migrate: interrupted again; not waiting for the VMM\n");
    return kExitInterrupted;
  }
  f.interrupted = true;
  f.cancel_deadline = Clock::now() + kCancelGrace;
  fmt::print(stderr, "faultline migrate: cancelling the migration (interrupt again to leave)\n");
  Result<ControlReply> cancel = client.Call("migrate-cancel");
  if (!cancel.has_value()) return Fail(cancel.error());
  // WrongState: it ended meanwhile; the next poll says how.
  if (!cancel->ok() && cancel->error_class != "WrongState") {
    return Fail(Error("migrate-cancel: {}", cancel->error_desc));
  }
  return std::nullopt;
}

// A completed migration, for people.
void PrintCompleted(const MigrationStatus& s) {
  if (s.local && s.local_memory == "fds") {
    const double pause_ms =
        s.downtime_us ? *s.downtime_us / 1000.0 : static_cast<double>(s.downtime_ms.value_or(0));
    fmt::print(
        "local update to {} completed in {:.1f} ms: the guest's {} of RAM passed as {} "
        "descriptor(s), {} pages copied, {} of state sent; paused {:.2f} ms\n",
        s.to, static_cast<double>(s.elapsed_ms), HumanBytes(static_cast<double>(s.bytes_total)),
        s.fds_passed, s.pages_copied, HumanBytes(static_cast<double>(s.bytes_sent)), pause_ms);
  } else if (s.mode == control::MigrationMode::kPostcopy) {
    fmt::print(
        "post-copy migration to {} completed in {:.1f} s: {} sent, {} pre-copy "
        "pass(es), then {} pages demanded and {} pushed over {} session(s)\n",
        s.to, s.elapsed_ms / 1000.0, HumanBytes(static_cast<double>(s.bytes_sent)), s.pass,
        s.pages_demanded, s.pages_pushed, s.sessions);
  } else {
    std::string downtime = s.downtime_ms ? fmt::format(", downtime {} ms", *s.downtime_ms) : "";
    fmt::print("migration to {} completed in {:.1f} s: {} sent in {} passes{}\n", s.to,
               s.elapsed_ms / 1000.0, HumanBytes(static_cast<double>(s.bytes_sent)), s.pass,
               downtime);
  }
}

// How the migration ended, said once; returns the exit code.
int ReportEnd(const MigrateOptions& o, const Followed& f, double elapsed_ms) {
  const MigrationStatus& s = f.status;
  if (o.json) {
    nlohmann::json out = {{"migration", f.raw},
                          {"result", control::MigrationPhaseName(s.phase)},
                          {"elapsed_ms", elapsed_ms},
                          {"interrupted", f.interrupted}};
    fmt::print("{}\n", out.dump());
  }
  if (s.phase == MigrationPhase::kCompleted) {
    if (!o.json) PrintCompleted(s);
    return 0;
  }
  if (o.cancel && s.paused) {
    if (!o.json) {
      fmt::print(
          "post-copy migration to {} paused (link broken); the guest waits at the "
          "destination: reconnect with `faultline migrate --resume`\n",
          s.to);
    }
    return 0;
  }
  if (o.cancel && s.phase == MigrationPhase::kCancelled) {
    if (!o.json) fmt::print("migration to {} cancelled\n", s.to);
    return 0;  // what was asked for
  }
  if (s.phase == MigrationPhase::kFailed) {
    fmt::print(stderr, "faultline migrate: error: migration to {} failed: {}\n", s.to,
               s.error.empty() ? "no reason given" : s.error);
  } else {
    fmt::print(stderr, "faultline migrate: migration to {} cancelled{}\n", s.to,
               s.error.empty() ? "" : ": " + s.error);
  }
  return f.interrupted ? kExitInterrupted : 1;
}

// Polls query-migrate until the migration ends; returns the exit code.
int Follow(ControlClient& client, const MigrateOptions& o, bool show_progress) {
  auto start = Clock::now();
  InterruptWatch interrupts;
  Progress progress(show_progress && !o.json);
  Followed f;
  for (;;) {
    Result<nlohmann::json> reply = client.Execute("query-migrate");
    Result<MigrationStatus> parsed = reply.has_value() ? control::ParseMigrationStatus(*reply)
                                                       : Result<MigrationStatus>(reply.error());
    if (!parsed.has_value()) {
      progress.Finish();
      return Fail(parsed.error().WithContext("query-migrate"));
    }
    f.raw = std::move(*reply);
    f.status = std::move(*parsed);
    const MigrationStatus& s = f.status;
    progress.Update(s);
    if (control::IsTerminal(s.phase)) break;
    if (o.cancel && s.paused) break;  // a cancel in post-copy pauses it
    if (s.phase == MigrationPhase::kNone) {
      progress.Finish();
      return Fail(Error("no migration is active on {}", client.path()));
    }
    if (f.interrupted && Clock::now() > f.cancel_deadline) {
      progress.Finish();
      return Fail(Error("the VMM did not confirm the cancellation within {} s (phase {})",
                        kCancelGrace.count(), control::MigrationPhaseName(s.phase)));
    }
    if (interrupts.Sleep(o.interval_ms)) {
      progress.Finish();
      if (std::optional<int> code = OnInterrupt(client, f)) return *code;
    }
  }
  progress.Finish();
  return ReportEnd(o, f, std::chrono::duration<double, std::milli>(Clock::now() - start).count());
}

// Drops the errno of an InvalidArgument: "Invalid argument" adds nothing.
Status Plain(const Status& s, std::string_view context) {
  return Status(0, s.message()).WithContext(context);
}

int Migrate(const MigrateOptions& o) {
  bool start = !o.to.empty() && !o.resume;
  if (start + o.resume + o.cancel + o.watch + o.start_postcopy != 1) {
    return Fail(
        Error("say what to do: --to tcp:HOST:PORT, --resume, --cancel, --watch or "
              "--start-postcopy (one of them)"));
  }
  if (o.interval_ms == 0) return Fail(Error("--interval-ms must be at least 1"));
  if (start && o.to.starts_with("file:")) {
    // To a directory: a snapshot, written live (`faultline snapshot`).
    return TakeSnapshot(o.control, o.to.substr(5), /*paused=*/false, /*leave_paused=*/false,
                        o.json);
  }
  nlohmann::json args = nlohmann::json::object();
  if (!o.to.empty()) {
    Result<control::MigrationTarget> target = control::ParseMigrationTarget(o.to);
    if (!target.has_value()) return Fail(Plain(target.error(), "--to"));
    control::MigrateRequest request;
    request.to = *target;
    Result<control::MigrationMode> mode = control::ParseMigrationMode(o.mode);
    if (!mode.has_value()) return Fail(Plain(mode.error(), "--mode"));
    request.mode = *mode;
    Result<uint64_t> rate = ParseRate(o.bandwidth);
    if (!rate.has_value()) return Fail(rate.error().WithContext("--bandwidth"));
    request.bandwidth_bytes_per_sec = *rate;
    request.channels = o.channels;
    request.downtime_ms = o.downtime_ms;
    if ((o.precopy_passes || o.postcopy_on_command || o.postcopy_answers) &&
        request.mode != control::MigrationMode::kPostcopy) {
      return Fail(
          Error("--precopy-passes, --postcopy-on-command and --postcopy-answers go with --mode "
                "postcopy"));
    }
    request.precopy_passes = o.precopy_passes.value_or(1);
    request.postcopy_on_command = o.postcopy_on_command;
    request.answers_on_bulk = o.postcopy_answers == "bulk";
    request.local = o.local;
    if (o.local && !request.to.is_unix()) {
      return Fail(
          Error("--local moves the guest to another process on this host: give --to "
                "unix:PATH (the socket of `faultline run --incoming unix:PATH`)"));
    }
    if (o.local && o.resume) return Fail(Error("--local goes with --to, not --resume"));
    if (!o.tls.dir.empty() && o.resume) {
      return Fail(Error("--tls-dir goes with --to: a resumed migration keeps its own TLS"));
    }
    if (!o.tls.dir.empty()) request.tls_dir = std::filesystem::absolute(o.tls.dir).string();
    request.tls_peer_name = o.tls.peer_name;
    // The VMM checks the ranges again; it has the last word.
    args = o.resume ? nlohmann::json{{"to", request.to.ToString()}} : nlohmann::json(request);
  }

  Result<ControlClient> client = ControlClient::Connect(o.control);
  if (!client.has_value()) return Fail(client.error());
  if (o.start_postcopy || o.cancel) {
    const char* command = o.cancel ? "migrate-cancel" : "migrate-start-postcopy";
    Result<nlohmann::json> reply = client->Execute(command);
    if (!reply.has_value()) return Fail(reply.error());
    if (o.start_postcopy) return 0;
    return Follow(*client, o, /*show_progress=*/false);
  }
  if (o.resume || !o.to.empty()) {
    Result<nlohmann::json> reply = client->Execute(o.resume ? "migrate-resume" : "migrate", args);
    if (!reply.has_value()) return Fail(reply.error());
  }
  return Follow(*client, o, /*show_progress=*/true);
}

int Query(const std::string& control, const std::string& command, const std::string& args_text,
          bool pretty) {
  auto fail = [](const Status& s) {
    fmt::print(stderr, "faultline query: error: {}\n", s.ToString());
    return 1;
  };
  nlohmann::json args = nlohmann::json::parse(args_text, nullptr, /*allow_exceptions=*/false);
  if (args.is_discarded() || !args.is_object()) {
    return fail(Error("--args: '{}' is not a JSON object", args_text));
  }
  Result<ControlClient> client = ControlClient::Connect(control);
  if (!client.has_value()) return fail(client.error());
  Result<nlohmann::json> reply = client->Execute(command, args);
  if (!reply.has_value()) return fail(reply.error());
  if (!pretty) {
    fmt::print("{}\n", reply->dump());
  } else if (command == "query-migrate") {
    fmt::print("{}", control::FormatMigrationStatus(*reply));
  } else {
    fmt::print("{}\n", reply->dump(2));
  }
  return 0;
}

}  // namespace

void AddMigrateCommand(CLI::App& app, Action& action) {
  auto o = std::make_shared<MigrateOptions>();
  CLI::App* cmd = app.add_subcommand(
      "migrate", "Migrate a running VMM's guest, through its control socket, and show progress");
  cmd->add_option("--control", o->control, "The VMM's control socket (faultline run --control)")
      ->required();
  cmd->add_option("--to", o->to,
                  "Destination, tcp:HOST:PORT or unix:PATH (with --resume: a new one), or "
                  "file:DIR: a snapshot (see `faultline snapshot`)");
  cmd->add_option("--mode", o->mode, "precopy or postcopy")->capture_default_str();
  cmd->add_option("--channels", o->channels, "Page channels (TCP connections), 1..16")
      ->capture_default_str();
  cmd->add_option("--precopy-passes", o->precopy_passes,
                  "With --mode postcopy: pre-copy passes before the switch (default 1; 0: at "
                  "once)");
  cmd->add_flag("--postcopy-on-command", o->postcopy_on_command,
                "With --mode postcopy: run pre-copy passes until `faultline migrate "
                "--start-postcopy`");
  cmd->add_option("--postcopy-answers", o->postcopy_answers,
                  "With --mode postcopy: where answers to page requests go: priority (the "
                  "default: their own channel) or bulk (behind the push on page channel 0, as "
                  "without QEMU's postcopy-preempt; for comparison)")
      ->check(CLI::IsMember({"priority", "bulk"}));
  cmd->add_flag("--local", o->local,
                "With --to unix:PATH: a local update: hand the guest to a new VMM process on "
                "this host without copying its memory (memfd and hugetlb RAM is passed by "
                "descriptor; anonymous RAM is copied instead, in --mode)");
  cmd->add_option("--downtime-ms", o->downtime_ms, "Longest acceptable guest stop")
      ->capture_default_str();
  cmd->add_option("--bandwidth", o->bandwidth, "Rate limit in bytes/s, e.g. 500M, 1G/s")
      ->capture_default_str();
  cmd->add_flag("--json", o->json, "No progress; one JSON object on stdout at the end");
  AddTlsOptions(cmd, &o->tls);
  cmd->add_flag("--resume", o->resume, "Reconnect a post-copy migration whose link broke");
  cmd->add_flag("--cancel", o->cancel,
                "Cancel the active migration and wait until it stops (in post-copy: break the "
                "link and pause it, for --resume)");
  cmd->add_flag("--watch", o->watch, "Follow the active migration's progress");
  cmd->add_flag("--start-postcopy", o->start_postcopy,
                "Switch the active pre-copy migration to post-copy now");
  cmd->add_option("--interval-ms", o->interval_ms, "How often to poll the VMM")
      ->capture_default_str();
  cmd->footer(
      "Exit status: 0 when the migration completed; 1 when it failed or was cancelled, or on "
      "error; 130 when interrupted (Ctrl-C cancels the migration, a second one leaves at once).");
  cmd->callback([o, &action] { action = [o] { return Migrate(*o); }; });
}

void AddQueryCommand(CLI::App& app, Action& action) {
  struct QueryOptions {
    std::string control, command = "query-status", args = "{}";
    bool pretty = false;
  };
  auto o = std::make_shared<QueryOptions>();
  CLI::App* cmd =
      app.add_subcommand("query", "Send one control command to a VMM and print its reply as JSON");
  cmd->add_option("--control", o->control, "The VMM's control socket")->required();
  cmd->add_option("command", o->command, "query-status, query-migrate, query-commands, ...")
      ->capture_default_str();
  cmd->add_option("--args", o->args, "Arguments as a JSON object")->capture_default_str();
  cmd->add_flag("--pretty", o->pretty,
                "For people: query-migrate as a summary (on a post-copy destination: pages "
                "demanded and pushed, fault latency per vCPU, blocked time), other replies as "
                "indented JSON");
  cmd->callback(
      [o, &action] { action = [o] { return Query(o->control, o->command, o->args, o->pretty); }; });
}

}  // namespace faultline::cli
