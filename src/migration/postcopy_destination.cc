#include "src/migration/postcopy_destination.h"

#include <cerrno>

#include "src/migration/elapsed.h"
#include "src/migration/handshake.h"
#include "src/migration/postcopy_session.h"
#include "src/migration/receiver_state.h"
#include "src/sys/sched.h"

namespace faultline::migration {

using Clock = std::chrono::steady_clock;

PostcopyDestination::PostcopyDestination(PostcopyDestinationVm& vm, DestinationOptions options)
    : vm_(vm), options_(std::move(options)) {}

PostcopyDestination::~PostcopyDestination() {
  if (network_) network_->CancelAll();
}

void PostcopyDestination::Cancel() {
  sys::MutexLock lock(mu_);
  cancelled_ = true;
  if (active_ != nullptr) {
    active_->Fail(Status(ECANCELED, "migration cancelled"), ErrorCode::kCancelled);
  }
}

PostcopyDestinationStats PostcopyDestination::stats() const {
  PostcopyDestinationStats s;
  {
    sys::MutexLock lock(mu_);
    s = stats_;
  }
  // network_ and the pager are set before the phase becomes kPostcopy
  // (release) and never again: read them only once it has (acquire).
  const PostcopyPhase phase = this->phase();
  if (phase == PostcopyPhase::kPostcopy || phase == PostcopyPhase::kPaused ||
      phase == PostcopyPhase::kCompleted) {
    if (network_) s.network = network_->stats();
    s.paging = vm_.paging_stats();
  }
  return s;
}

ReceiverConfig PostcopyDestination::MakeReceiverConfig() const {
  ReceiverConfig config;
  for (const auto& b : blocks_) config.blocks.push_back(DescribeBlock(*b));
  config.key = options_.key;
  config.max_page_channels = options_.max_page_channels;
  config.vcpus = vm_.vcpu_count();
  config.features_supported = kFeatureAuth | kFeaturePostcopy | kFeatureRecovery;
  config.refusal = vm_.CheckPaging();
  config.accel = vm_.accelerator();
  return config;
}

Result<PostcopyDestinationStats> PostcopyDestination::Run(Acceptor& acceptor) {
  if (phase() != PostcopyPhase::kNotStarted) return Error("PostcopyDestination::Run called twice");
  start_ = Clock::now();
  phase_.store(PostcopyPhase::kPrecopy, std::memory_order_release);
  blocks_ = vm_.blocks();
  Attempt a(Attempt::Reporting::kTellPeer);
  {
    sys::MutexLock lock(mu_);
    active_ = &a;
    if (cancelled_) a.Fail(Status(ECANCELED, "migration cancelled"), ErrorCode::kCancelled);
  }
  if (Status accepted = Accept(a, acceptor); !accepted.ok()) {
    sys::MutexLock lock(mu_);
    active_ = nullptr;
    phase_.store(PostcopyPhase::kFailed, std::memory_order_release);
    return accepted;
  }
  session_id_ = a.session().hello.session_id;
  {
    sys::MutexLock lock(mu_);
    stats_.sessions = 1;
  }
  StartPageChannels(a);
  // Pre-copy and the switchover, until the guest runs. SCHED_FIFO: the
  // Switchover is read as soon as it arrives (the pause has begun), and
  // starting the guest waits for nothing else.
  Status status = [&]() -> Status {
    sys::ScopedRealtime realtime(options_.realtime_priority);
    RETURN_IF_ERROR(FollowPrecopy(a));
    return StartGuest(a);
  }();
  if (!status.ok() && phase() == PostcopyPhase::kPrecopy) return FailBeforeGuest(a, status);
  if (status.ok()) status = FollowPostcopy(a);
  return Finish(a, status);
}

Status PostcopyDestination::Accept(Attempt& a, Acceptor& acceptor) {
  ASSIGN_OR_RETURN(Nonce nonce, RandomNonce());
  SessionReceiver receiver(MakeReceiverConfig(), nonce);
  ASSIGN_OR_RETURN(Session session, AcceptSession(acceptor, receiver, options_.accept));
  if (!(session.ack.features & kFeaturePostcopy)) {
    return SendError(*session.main, ErrorCode::kFeatures,
                     Error("this destination runs post-copy; the source did not offer it"));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Link> priority,
                   AcceptPriorityChannel(acceptor, session, options_.key, options_.accept.timeout));
  return a.Adopt(std::move(session), std::move(priority));
}

Result<PostcopyDestinationStats> PostcopyDestination::FailBeforeGuest(Attempt& a, Status status) {
  a.EndMain(std::move(status));  // the source is told, unless it said why itself
  if (network_) network_->Disconnect();
  a.Close();
  a.Join();
  status = a.error();
  sys::MutexLock lock(mu_);
  active_ = nullptr;
  phase_.store(PostcopyPhase::kFailed, std::memory_order_release);
  return status.WithContext("post-copy destination (the VM was not started)");
}

Status PostcopyDestination::FollowPrecopy(Attempt& a) {
  MessageReader& reader = a.main().reader();
  uint32_t passes = 0;
  while (true) {
    Result<Message> m = reader.Read();
    if (!m && m.error().code() == EAGAIN) continue;
    if (!m) return m.error();
    if (const auto* end = std::get_if<PassEnd>(&*m)) {
      if (passes > 0 && end->pass == passes - 1 && !early_.empty()) {
        // The end of the early dirty set: its stale pages are dropped.
        RETURN_IF_ERROR(a.SendMain(PassEnd{end->pass, 0, 0, 0}));
        continue;
      }
      if (end->pass != passes) return Error("PassEnd for pass {}, expected {}", end->pass, passes);
      ++passes;
      continue;
    }
    if (const auto* e = std::get_if<ErrorMessage>(&*m)) return a.FailByPeer(*e);
    if (const auto* d = std::get_if<DirtyPages>(&*m)) {
      // The early dirty set: once every channel ended the last pass, drop
      // the stale copies now, while the source's guest still runs; the
      // PassEnd answer says so. DirtyPages of one block may come in parts.
      if (passes == 0) return Error("DirtyPages before any pass ended");
      if (early_.empty()) {
        for (const auto& b : blocks_) early_.emplace_back(b->size() / kWirePageSize);
      }
      early_[d->block].MergeRaw(d->words, d->page_count, d->first_page);
      // The source sends the set and then waits: drop when the main channel
      // has nothing more for now.
      RETURN_IF_ERROR(DropEarly(a, passes, *d));
      continue;
    }
    const auto* s = std::get_if<migration::Switchover>(&*m);
    if (s == nullptr) {
      return Error("pre-copy: unexpected {} on the main channel", MessageTypeName(TypeOf(*m)));
    }
    return CheckSwitchover(*s, passes);
  }
}

Status PostcopyDestination::CheckSwitchover(const migration::Switchover& s, uint32_t passes) {
  if (s.mode != SwitchoverMode::kPostcopy) {
    return Error("Switchover: stop-and-copy to a post-copy destination");
  }
  if (s.final_pass != passes) {
    return Error("Switchover: final pass {}, but {} passes ended", s.final_pass, passes);
  }
  if (vm_.vcpu_count() != 0 && s.vcpu_count != vm_.vcpu_count()) {
    return Error("Switchover: the source has {} vCPUs, this VM {}", s.vcpu_count, vm_.vcpu_count());
  }
  if (s.device_count > kMaxDevices) return Error("Switchover: {} devices", s.device_count);
  final_pass_ = s.final_pass;
  switchover_vcpus_ = s.vcpu_count;
  switchover_devices_ = s.device_count;
  sys::MutexLock lock(mu_);
  stats_.passes = passes;
  stats_.dirty_at_switchover = s.dirty_pages;
  return Status::Ok();
}

Status PostcopyDestination::DropEarly(Attempt& a, uint32_t passes, const DirtyPages& d) {
  const uint32_t last = passes - 1;
  if (!a.barrier().AwaitAll(last)) return a.failure();
  // Every channel ended the last pass and waits for the next message: the
  // pages they wrote are in place and nobody writes them now.
  if (blocks_[d.block]->page_size() != kWirePageSize) return Status::Ok();  // StartPostcopy's
  const DirtyBitmap& early = early_[d.block];
  for (uint64_t p = early.FindNextSet(d.first_page); p < d.first_page + d.page_count;) {
    uint64_t end = p + 1;
    while (end < d.first_page + d.page_count && early.Test(end)) ++end;
    bool written = false;
    for (size_t c = 0; c < receivers_.size() && !written; ++c) {
      written = receivers_[c]->received()[d.block].AnyInRange(p, end - p);
    }
    if (written) RETURN_IF_ERROR(vm_.DropPages(d.block, p, end - p));
    p = end < early.pages() ? early.FindNextSet(end) : early.pages();
  }
  return Status::Ok();
}

Status PostcopyDestination::StartGuest(Attempt& a) {
  const auto switched = Clock::now();
  ASSIGN_OR_RETURN(SwitchoverState state, ReceiveSwitchoverState(a));
  // The devices' state goes to the VMM with the vCPUs' (StartPostcopy);
  // the reference VMM has none and refuses any that arrives.
  const auto state_in = Clock::now();
  // Every page channel ends the last pre-copy pass before its Switchover (a
  // marker: nothing follows until the push), so once they all did, every
  // page they wrote is in place and none is written: drop the stale ones
  // here rather than wait for each channel's thread to be scheduled.
  if (final_pass_ > 0 && !a.barrier().AwaitAll(final_pass_ - 1)) return a.failure();
  RETURN_IF_ERROR(DropStale(state.dirty));
  const auto channels_in = Clock::now();
  uint64_t precopy_pages = 0, present_pages = 0;
  const std::vector<DirtyBitmap> present = PresentPages(state.dirty, precopy_pages);
  for (const DirtyBitmap& p : present) present_pages += p.Count();
  CreateNetworkSource(present);
  // The priority channel's replies are read from before the guest runs:
  // its first faults are requested at once.
  RETURN_IF_ERROR(ConnectPriority(a));
  const auto paging_at = Clock::now();
  RETURN_IF_ERROR(RunGuest(a, present, state));
  const auto started = Clock::now();
  phase_.store(PostcopyPhase::kPostcopy, std::memory_order_release);
  {
    sys::MutexLock lock(mu_);
    stats_.start_vm = std::chrono::duration_cast<std::chrono::microseconds>(started - switched);
    stats_.state_wait = std::chrono::duration_cast<std::chrono::microseconds>(state_in - switched);
    stats_.channels_wait =
        std::chrono::duration_cast<std::chrono::microseconds>(channels_in - state_in);
    stats_.start_paging =
        std::chrono::duration_cast<std::chrono::microseconds>(started - paging_at);
    stats_.vm_started_at = started;
    stats_.present_at_start = present_pages;
    stats_.precopy_pages = precopy_pages;
  }
  a.Reach(Milestone::kGuestRuns);
  return Status::Ok();
}

void PostcopyDestination::CreateNetworkSource(const std::vector<DirtyBitmap>& present) {
  std::vector<NetworkBlock> nb;
  for (uint32_t b = 0; b < blocks_.size(); ++b) {
    nb.push_back({blocks_[b]->size(), vm_.direct_push_target(b)});
  }
  network_ = std::make_shared<NetworkPageSource>(std::move(nb));
  for (uint32_t b = 0; b < blocks_.size(); ++b) network_->MarkHave(b, present[b]);
}

Status PostcopyDestination::ConnectPriority(Attempt& a) {
  RETURN_IF_ERROR(network_->Connect(&a.priority()));
  a.Spawn("priority channel", [this, &a] { return ReceiveReplies(a); });
  return Status::Ok();
}

// The vCPUs run inside StartPostcopy: from then on the source must never
// hear an Error from here (it would resume its copy of the guest).
Status PostcopyDestination::RunGuest(Attempt& a, const std::vector<DirtyBitmap>& present,
                                     SwitchoverState& state) {
  RETURN_IF_ERROR(a.StopReporting());  // failed already: an Error may be out
  Status started = vm_.StartPostcopy(network_, present, state.vcpus, state.devices);
  if (!started.ok()) {
    a.TellPeer(started, ErrorCode::kProtocol);  // the vCPUs did not run
    return started;
  }
  // Pushed pages nobody waits for get their places from the pager now.
  network_->SetPushTarget(vm_.push_target());
  return started;
}

Status PostcopyDestination::FollowPostcopy(Attempt& a) {
  MessageReader& reader = a.main().reader();
  const auto started = Clock::now();
  while (true) {
    Result<Message> m = reader.Read();
    if (!m && m.error().code() == EAGAIN) continue;
    if (!m) return m.error().WithContext("main channel");
    if (const auto* e = std::get_if<ErrorMessage>(&*m)) return a.FailByPeer(*e);
    const auto* complete = std::get_if<Complete>(&*m);
    if (complete == nullptr) {
      return Error("post-copy: unexpected {} on the main channel", MessageTypeName(TypeOf(*m)));
    }
    // Every page was pushed (or answered): wait for the pushes to land,
    // fetch whatever a crossing left missing, end paging, acknowledge.
    if (!a.Await(Milestone::kChannelEnded, a.page_channels())) return a.failure();
    RETURN_IF_ERROR(vm_.FetchMissing());
    RETURN_IF_ERROR(vm_.FinishPaging());
    RETURN_IF_ERROR(a.SendMain(CompleteAck{complete->passes, 0, 0}).WithContext("CompleteAck"));
    sys::MutexLock lock(mu_);
    stats_.postcopy += Since(started);
    return Status::Ok();
  }
}

Result<PostcopyDestinationStats> PostcopyDestination::Finish(Attempt& a, Status status) {
  // Post-copy from here on: OK means complete; anything else pauses.
  network_->Disconnect();
  if (status.ok()) {
    a.Close();  // stops the reply reader
  } else {
    a.Fail(status);
  }
  a.Join();
  if (!status.ok()) status = a.error();  // the first failure says why
  {
    sys::MutexLock lock(mu_);
    active_ = nullptr;
    stats_.bytes_received += a.stats().bytes_received;
    stats_.total = Since(start_);
  }
  phase_.store(status.ok() ? PostcopyPhase::kCompleted : PostcopyPhase::kPaused,
               std::memory_order_release);
  if (!status.ok()) return status.WithContext(PostcopyPhaseName(PostcopyPhase::kPaused));
  return stats();
}

Result<PostcopyDestinationStats> PostcopyDestination::Resume(Acceptor& acceptor) {
  if (phase() != PostcopyPhase::kPaused) {
    return Error("PostcopyDestination::Resume: the migration is {}, not paused",
                 PostcopyPhaseName(phase()));
  }
  // The guest runs here: nothing is ever told to the source with an Error.
  Attempt a(Attempt::Reporting::kSilent);
  {
    sys::MutexLock lock(mu_);
    active_ = &a;
  }
  if (Status accepted = AcceptResume(a, acceptor); !accepted.ok()) {
    sys::MutexLock lock(mu_);
    active_ = nullptr;
    return accepted;
  }
  {
    sys::MutexLock lock(mu_);
    ++stats_.sessions;
  }
  phase_.store(PostcopyPhase::kPostcopy, std::memory_order_release);
  a.Reach(Milestone::kGuestRuns);
  Status status = ConnectPriority(a);
  if (status.ok()) {
    a.StartChannels([this, &a](size_t c) -> Status {
      // Each page channel opens its push with a copy of the Switchover.
      Link& link = a.page(c);
      Result<Message> m = link.reader().Read();
      while (!m && m.error().code() == EAGAIN) m = link.reader().Read();
      if (!m) return m.error();
      if (!std::holds_alternative<migration::Switchover>(*m)) {
        return Error("resumed page channel opened with {}", MessageTypeName(TypeOf(*m)));
      }
      return ReceivePushChannel(a, c);
    });
    status = FollowPostcopy(a);
  }
  return Finish(a, status);
}

Status PostcopyDestination::AcceptResume(Attempt& a, Acceptor& acceptor) {
  ASSIGN_OR_RETURN(Nonce nonce, RandomNonce());
  SessionReceiver receiver(MakeReceiverConfig(), nonce);
  ASSIGN_OR_RETURN(Session session, AcceptSession(acceptor, receiver, options_.accept));
  ASSIGN_OR_RETURN(std::unique_ptr<Link> priority,
                   AcceptPriorityChannel(acceptor, session, options_.key, options_.accept.timeout));
  RETURN_IF_ERROR(a.Adopt(std::move(session), std::move(priority)));
  Link& main = a.main();
  Result<Message> m = main.reader().Read();
  while (!m && m.error().code() == EAGAIN) m = main.reader().Read();
  if (!m) return m.error().WithContext("resume");
  const auto* r = std::get_if<migration::Resume>(&*m);
  if (r == nullptr || r->session_id != session_id_) {
    return SendError(main, ErrorCode::kProtocol,
                     Error("expected Resume of session {:#x}, got {}", session_id_,
                           r ? fmt::format("Resume of {:#x}", r->session_id)
                             : std::string(MessageTypeName(TypeOf(*m)))));
  }
  return SendPresent(main);
}

// What is here; what the vCPUs wait for goes out as requests on Connect.
Status PostcopyDestination::SendPresent(Link& main) {
  uint64_t have_pages = 0;
  const std::vector<DirtyBitmap> have = network_->have();
  for (uint32_t b = 0; b < have.size(); ++b) {
    const DirtyBitmap& h = have[b];
    have_pages += h.Count();
    for (uint64_t first = 0; first < h.pages(); first += kMaxBitmapPages) {
      const uint32_t count =
          static_cast<uint32_t>(std::min<uint64_t>(kMaxBitmapPages, h.pages() - first));
      PresentBitmap m{b, first, count,
                      std::vector<uint64_t>(h.words().begin() + first / 64,
                                            h.words().begin() + (first + count + 63) / 64)};
      RETURN_IF_ERROR(main.writer().Send(m));
    }
  }
  return main.writer().Send(migration::Resume{session_id_, have_pages});
}

}  // namespace faultline::migration
