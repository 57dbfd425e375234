#include "src/control/incoming.h"

#include <signal.h>

#include <cstdio>
#include <optional>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "src/paging/installer_calibration.h"
#include "src/sys/mapping.h"

namespace faultline::control {
namespace {

using Clock = std::chrono::steady_clock;
using migration::PostcopyPhase;

Status LocalRefused(const Status& why) {
  return Error(
      "incoming local update refused: {}. The guest was not started here; the source keeps "
      "running it",
      why.ToString());
}

nlohmann::json PrecopyFigures(const migration::DestinationStats& s) {
  return {{"passes", s.passes},
          {"data_pages", s.data_pages},
          {"zero_pages", s.zero_pages},
          {"bytes_received", s.bytes_received},
          {"ms", s.total.count() / 1000.0}};
}

nlohmann::json PostcopyFigures(const migration::PostcopyDestinationStats& s,
                               const std::string& installer, const nlohmann::json& calibration) {
  nlohmann::json j = {{"mode", "postcopy"},
                      {"passes", s.passes},
                      {"precopy_pages", s.precopy_pages},
                      {"bytes_received", s.bytes_received},
                      {"sessions", s.sessions},
                      {"installer", installer},
                      {"installer_calibration", calibration},
                      {"start_vm_ms", s.start_vm.count() / 1000.0},
                      {"ms", s.total.count() / 1000.0}};
  j.update(PostcopyFiguresJson(s));
  return j;
}

// The test hook: the process is killed with the whole state loaded, before
// it confirms the local update.
class DieBeforeConfirm final : public migration::DestinationVm {
 public:
  DieBeforeConfirm(migration::DestinationVm& inner, std::function<void(const std::string&)> say)
      : inner_(inner), say_(std::move(say)) {}

  migration::HelloAccel accelerator() const override { return inner_.accelerator(); }
  std::vector<std::shared_ptr<RamBlock>> blocks() override { return inner_.blocks(); }
  bool memory_is_zero() const override { return inner_.memory_is_zero(); }
  uint32_t vcpu_count() const override { return inner_.vcpu_count(); }
  Status LoadVcpus(std::span<const std::vector<uint8_t>> states) override {
    return inner_.LoadVcpus(states);
  }
  Status LoadDevices(std::span<const migration::DeviceBlob> devices) override {
    RETURN_IF_ERROR(inner_.LoadDevices(devices));
    if (say_) say_("test hook: killed before confirming the local update");
    raise(SIGKILL);
    return Error("unreachable: SIGKILL returned");
  }

 private:
  migration::DestinationVm& inner_;
  const std::function<void(const std::string&)> say_;
};

}  // namespace

IncomingControl::IncomingControl(migration::Acceptor& acceptor, IncomingOptions options)
    : acceptor_(acceptor),
      options_(std::move(options)),
      mode_(options_.mode),
      status_(std::make_shared<IncomingStatus>(mode_, options_.bytes_total)) {}

// The status may outlive this object (the control socket holds it): it must
// not point at the engine that goes with it.
IncomingControl::~IncomingControl() { status_->Detach(); }

Status IncomingControl::AcceptLocalOffer(std::span<const migration::BlockInfo> blocks,
                                         uint32_t vcpus) {
  Say(fmt::format("waiting for a local update or migration on {}", acceptor_.address()));
  Result<std::unique_ptr<migration::LocalUpdateDestination>> accepted =
      migration::LocalUpdateDestination::Accept(acceptor_, options_.accept_timeout);
  if (!accepted.has_value()) return accepted.error().WithContext("--incoming");
  local_ = std::move(*accepted);
  const migration::LocalOffer& offer = local_->offer();
  Status checked = migration::CheckLocalOffer(offer, local_->fds().size(), blocks, vcpus,
                                              migration::HelloAccel::kUnspecified);
  if (checked.ok() && offer.memory == migration::LocalMemory::kCopy &&
      mode_ == MigrationMode::kPostcopy && offer.mode != migration::SwitchoverMode::kPostcopy) {
    checked = Error(
        "this destination was started with --postcopy, and the source offers a pre-copy "
        "migration");
  }
  if (!checked.ok()) {
    return LocalRefused(local_->Refuse(checked, migration::ErrorCode::kBlockMismatch));
  }
  if (offer.memory == migration::LocalMemory::kCopy) {
    mode_ = offer.mode == migration::SwitchoverMode::kPostcopy ? MigrationMode::kPostcopy
                                                               : MigrationMode::kPrecopy;
  }
  // What query-migrate reports from here on: the offer's mode, from now.
  status_ = std::make_shared<IncomingStatus>(mode_, options_.bytes_total);
  return Status::Ok();
}

std::span<const sys::UniqueFd> IncomingControl::passed_fds() const {
  if (!local_) return {};
  return local_->fds();
}

Status IncomingControl::Refuse(const Status& why, migration::ErrorCode code) {
  if (!local_) return why;
  local_->fds().clear();
  return LocalRefused(local_->Refuse(why, code));
}

Status IncomingControl::Prepare(IncomingVm& vm) {
  vm_ = &vm;
  const bool postcopy = mode_ == MigrationMode::kPostcopy && !PassesFds();
  if (postcopy) {
    Status made = MakePostcopyTarget();
    if (!made.ok()) {
      if (local_) (void)local_->Refuse(made, migration::ErrorCode::kResource);
      return made;
    }
  } else {
    target_ = vm.MakeDestination();
  }
  migration::DestinationVm& target = postcopy ? *postcopy_target_ : *target_;
  if (local_) {
    RETURN_IF_ERROR(AcceptLocalVm(target));
    if (PassesFds()) return Status::Ok();  // only the state comes, in Run
  }
  RETURN_IF_ERROR(Prealloc(target));
  migration::DestinationOptions engine;
  engine.accept.timeout = options_.accept_timeout;
  engine.realtime_priority = options_.realtime_priority;
  if (postcopy) {
    postcopy_ = std::make_unique<migration::PostcopyDestination>(*postcopy_target_, engine);
  } else {
    precopy_ = std::make_unique<migration::MigrationDestination>(*target_, engine);
  }
  return Status::Ok();
}

Status IncomingControl::MakePostcopyTarget() {
  migration::PostcopyVmOptions vm_options;
  vm_options.realtime_priority = options_.realtime_priority;
  Result<paging::InstallerKind> kind =
      ChooseInstaller(options_.installer, vm_->backing(), calibration_, options_.quiet);
  if (!kind.has_value()) return kind.error().WithContext("--installer");
  vm_options.installer = *kind;
  postcopy_target_ = vm_->MakePostcopyDestination(std::move(vm_options));
  // Refused here, before anyone waits on this destination, rather than when
  // a source connects (e.g. the zero installer, which never asks the source).
  return postcopy_target_->CheckPaging().WithContext("--installer");
}

Status IncomingControl::AcceptLocalVm(migration::DestinationVm& target) {
  local_->fds().clear();  // the VM holds its own duplicates
  Status checked = migration::CheckLocalAccel(local_->offer(), target.accelerator());
  if (!checked.ok()) {
    return LocalRefused(local_->Refuse(checked, migration::ErrorCode::kFeatures));
  }
  if (PassesFds()) return Status::Ok();
  if (Status ready = local_->Ready(); !ready.ok()) return LocalRefused(ready);
  if (!options_.quiet) {
    Say(fmt::format(
        "the source's guest RAM cannot be passed (anonymous memory): receiving it by {} "
        "migration over {}",
        mode_ == MigrationMode::kPostcopy ? "post-copy" : "pre-copy", acceptor_.address()));
  }
  return Status::Ok();
}

Status IncomingControl::Prealloc(migration::DestinationVm& target) {
  if (!options_.prealloc) return Status::Ok();
  for (const std::shared_ptr<RamBlock>& block : target.blocks()) {
    if (Status s = sys::PopulateWrite(block->host(), block->size()); !s.ok()) {
      return s.WithContext("--prealloc");
    }
  }
  return Status::Ok();
}

Result<IncomingResult> IncomingControl::Run() {
  if (PassesFds()) return ReceiveLocal();
  if (postcopy_) return RunPostcopy();
  if (precopy_) return RunPrecopy();
  return Error("IncomingControl::Run before Prepare");
}

void IncomingControl::Cancel() {
  cancelled_.store(true);
  if (precopy_) precopy_->Cancel();
  if (postcopy_) postcopy_->Cancel();
}

Result<IncomingResult> IncomingControl::RunPrecopy() {
  if (!local_) Say(fmt::format("waiting for a migration on {}", acceptor_.address()));
  // The pre-copy receiver keeps no live counters: query-migrate says
  // precopy (waiting or receiving) until it ends.
  status_->SetPhase(MigrationPhase::kPrecopy);
  Result<migration::DestinationStats> stats = precopy_->Run(acceptor_);
  if (!stats.has_value()) {
    status_->Finish(MigrationPhase::kFailed, stats.error().ToString());
    return Refused(stats.error(), "incoming migration");
  }
  if (!options_.quiet) {
    Say(fmt::format(
        "received the guest: {} MiB in {} passes ({} data, {} zero pages) in {:.0f} ms; running "
        "it",
        stats->bytes_received >> 20, stats->passes, stats->data_pages, stats->zero_pages,
        stats->total.count() / 1000.0));
  }
  IncomingResult result;
  // Started before anything else is done: the source's guest is paused
  // until it runs here.
  Status started = StartGuest(result);
  status_->Finish(MigrationPhase::kCompleted);
  RETURN_IF_ERROR(started);
  result.figures = PrecopyFigures(*stats);
  result.precopy = std::move(*stats);
  return result;
}

Result<IncomingResult> IncomingControl::RunPostcopy() {
  const std::string installer = paging::InstallerName(postcopy_target_->installer());
  Say(fmt::format("waiting for a post-copy migration on {} ({} installer)", acceptor_.address(),
                  installer));
  status_->Attach(postcopy_.get());
  Result<migration::PostcopyDestinationStats> stats = FollowPostcopy();
  if (!stats.has_value()) {
    const migration::PostcopyDestinationStats last = postcopy_->stats();
    status_->Finish(MigrationPhase::kFailed, stats.error().ToString(), &last);
    const PostcopyPhase phase = postcopy_->phase();
    const bool started = phase == PostcopyPhase::kPaused || phase == PostcopyPhase::kPostcopy;
    if (!started || cancelled_.load()) {
      return Refused(stats.error(), "incoming post-copy migration");
    }
    return Error("post-copy migration on {} broke after the guest started here: {}",
                 acceptor_.address(), stats.error().ToString());
  }
  status_->Finish(MigrationPhase::kCompleted, "", &*stats);
  if (!options_.quiet) {
    Say(fmt::format("post-copy complete: {} MiB in {} ms over {} session(s); {}",
                    stats->bytes_received >> 20, stats->total.count() / 1000, stats->sessions,
                    PostcopyFiguresLine(*stats)));
  }
  IncomingResult result;
  result.started_at = stats->vm_started_at;  // by the engine, at the switchover
  result.installer = installer;
  result.installer_calibration = calibration_;
  result.figures = PostcopyFigures(*stats, installer, calibration_);
  result.postcopy = std::move(*stats);
  return result;
}

Result<migration::PostcopyDestinationStats> IncomingControl::FollowPostcopy() {
  Result<migration::PostcopyDestinationStats> stats = postcopy_->Run(acceptor_);
  // A broken link after the switchover pauses the migration: the guest runs
  // here and waits for its missing pages, and the source's resumed session
  // comes to the same listener.
  while (!stats.has_value() && postcopy_->phase() == PostcopyPhase::kPaused && !cancelled_.load()) {
    Say(fmt::format(
        "post-copy link broken ({}); the guest runs here and waits for its missing pages; "
        "waiting on {} for the source to resume (`faultline migrate --resume`)",
        stats.error().ToString(), acceptor_.address()));
    stats = postcopy_->Resume(acceptor_);
  }
  return stats;
}

Result<IncomingResult> IncomingControl::ReceiveLocal() {
  const auto begin = Clock::now();
  status_->SetPhase(MigrationPhase::kSwitchover);
  // While the guest still runs at the source: the state then loads at once.
  if (Status prepared = vm_->PrepareVcpus(); !prepared.ok()) {
    return LocalRefused(local_->Refuse(prepared, migration::ErrorCode::kInternal));
  }
  if (Status ready = local_->Ready(); !ready.ok()) return LocalRefused(ready);
  std::optional<DieBeforeConfirm> hook;
  migration::DestinationVm* into = target_.get();
  if (options_.test_die_before_confirm) into = &hook.emplace(*target_, options_.say);
  Status received = local_->ReceiveState(*into);
  status_->Finish(received.ok() ? MigrationPhase::kCompleted : MigrationPhase::kFailed,
                  received.ok() ? "" : received.ToString());
  if (!received.ok()) return LocalRefused(received);
  const size_t fds = local_->offer().blocks.size();
  IncomingResult result;
  result.figures = {
      {"mode", "local"},
      {"memory", "fds"},
      {"fds", fds},
      {"pages_copied", 0},
      {"bytes_received", local_->bytes_received()},
      {"ms", std::chrono::duration<double, std::milli>(Clock::now() - begin).count()}};
  if (!options_.quiet) {
    Say(fmt::format(
        "local update from {}: the guest's {} MiB of RAM taken over from the source process ({} "
        "descriptor(s), nothing copied), {} bytes of state; running it",
        local_->peer(), options_.bytes_total >> 20, fds, local_->bytes_received()));
  }
  RETURN_IF_ERROR(StartGuest(result));
  return result;
}

Status IncomingControl::StartGuest(IncomingResult& result) {
  RETURN_IF_ERROR(vm_->Start());
  result.started_at = Clock::now();
  return Status::Ok();
}

Status IncomingControl::Refused(const Status& why, std::string_view what) const {
  if (cancelled_.load()) return why;  // the caller asked for it
  return Error("{} on {} refused: {}. The guest was not started here; the source keeps running it",
               what, acceptor_.address(), why.ToString());
}

bool IncomingControl::PassesFds() const {
  return local_ && local_->offer().memory == migration::LocalMemory::kFds;
}

void IncomingControl::Say(const std::string& line) const {
  if (options_.say) options_.say(line);
}

Result<paging::InstallerKind> ChooseInstaller(std::string_view text, Backing backing,
                                              nlohmann::json& calibration, bool quiet) {
  if (!text.empty() && text != "auto") {
    ASSIGN_OR_RETURN(paging::InstallerKind kind, paging::ParseInstaller(text));
    RETURN_IF_ERROR(paging::CheckInstaller(kind, backing));
    return kind;
  }
  const paging::InstallerChoice choice = paging::CalibrateInstaller(backing);
  nlohmann::json trials = nlohmann::json::array();
  std::string line;
  for (const paging::InstallerTrial& t : choice.trials) {
    trials.push_back({{"installer", paging::InstallerName(t.installer)},
                      {"pages_per_sec", t.pages_per_sec},
                      {"runs", t.runs}});
    line += fmt::format(" {} {:.0f} pages/s", paging::InstallerName(t.installer), t.pages_per_sec);
  }
  calibration = {{"chosen", paging::InstallerName(choice.installer)},
                 {"why", choice.why},
                 {"ms", choice.milliseconds},
                 {"trials", trials}};
  if (!quiet) {
    fmt::print(stderr, "faultline: --installer auto chose {} for {} ({}):{}\n",
               paging::InstallerName(choice.installer), BackingName(backing), choice.why, line);
  }
  return choice.installer;
}

}  // namespace faultline::control
