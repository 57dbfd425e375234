#include "src/migration/postcopy_destination.h"

#include <cerrno>
#include <thread>

#include "src/migration/handshake.h"
#include "src/migration/postcopy_attempt.h"
#include "src/migration/postcopy_session.h"
#include "src/migration/receiver_state.h"
#include "src/sys/sched.h"

namespace faultline::migration {
namespace {

using Clock = std::chrono::steady_clock;

std::chrono::microseconds Since(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t);
}

}  // namespace

PostcopyDestination::PostcopyDestination(PostcopyDestinationVm& vm, DestinationOptions options)
    : vm_(vm), options_(std::move(options)) {}

PostcopyDestination::~PostcopyDestination() {
  if (network_) network_->CancelAll();
}

void PostcopyDestination::Cancel() {
  std::lock_guard lock(mu_);
  cancelled_ = true;
  if (active_ != nullptr) active_->Break(Status(ECANCELED, "migration cancelled"));
}

PostcopyDestinationStats PostcopyDestination::stats() const {
  PostcopyDestinationStats s;
  {
    std::lock_guard lock(mu_);
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
  ASSIGN_OR_RETURN(Nonce nonce, RandomNonce());
  SessionReceiver receiver(MakeReceiverConfig(), nonce);

  Attempt a;
  Status status = [&]() -> Status {
    ASSIGN_OR_RETURN(a.session, AcceptSession(acceptor, receiver, options_.accept));
    if (!(a.session.ack.features & kFeaturePostcopy)) {
      return SendError(*a.session.main, ErrorCode::kFeatures,
                       Error("this destination runs post-copy; the source did not offer it"));
    }
    ASSIGN_OR_RETURN(a.priority, AcceptPriorityChannel(acceptor, a.session, options_.key,
                                                       options_.accept.timeout));
    return Status::Ok();
  }();
  if (!status.ok()) {
    phase_.store(PostcopyPhase::kFailed, std::memory_order_release);
    return status;
  }
  session_id_ = a.session.hello.session_id;
  {
    std::lock_guard lock(mu_);
    active_ = &a;
    stats_.sessions = 1;
    if (cancelled_) a.Break(Status(ECANCELED, "migration cancelled"));
  }
  const size_t n = a.session.pages.size();
  a.received.resize(n);
  for (size_t c = 0; c < n; ++c) {
    for (const auto& b : blocks_) a.received[c].emplace_back(b->size() / kWirePageSize);
  }
  for (size_t c = 0; c < n; ++c) {
    a.threads.emplace_back([this, &a, c] {
      Status s = ReceivePrecopyChannel(a, c);
      if (s.ok()) s = ReceivePushChannel(a, c);
      if (!s.ok()) a.Break(s.WithContext(fmt::format("page channel {}", c)));
    });
  }

  // Pre-copy and the switchover, until the guest runs. SCHED_FIFO: the
  // Switchover is read as soon as it arrives (the pause has begun), and
  // starting the guest waits for nothing else.
  status = [&]() -> Status {
    sys::ScopedRealtime realtime(options_.realtime_priority);
    RETURN_IF_ERROR(FollowPrecopy(a));
    return StartGuest(a);
  }();
  if (!status.ok() && phase() == PostcopyPhase::kPrecopy) {
    {
      std::lock_guard lock(a.mu);
      if (!a.error.ok() && a.error.code() != ECANCELED) status = a.error;
    }
    (void)a.session.main->writer().Send(ErrorMessage{ErrorCode::kProtocol, status.ToString()});
    if (network_) network_->Disconnect();
    a.Break(status);
    a.Join();
    std::lock_guard lock(mu_);
    active_ = nullptr;
    phase_.store(PostcopyPhase::kFailed, std::memory_order_release);
    return status.WithContext("post-copy destination (the VM was not started)");
  }
  if (status.ok()) status = FollowPostcopy(a);
  return Finish(a, status);
}

Status PostcopyDestination::FollowPrecopy(Attempt& a) {
  MessageReader& reader = a.session.main->reader();
  uint32_t passes = 0;
  while (true) {
    Result<Message> m = reader.Read();
    if (!m && m.error().code() == EAGAIN) continue;
    if (!m) return m.error();
    if (const auto* end = std::get_if<PassEnd>(&*m)) {
      if (passes > 0 && end->pass == passes - 1 && !a.early.empty()) {
        // The end of the early dirty set: its stale pages are dropped.
        RETURN_IF_ERROR(a.session.main->writer().Send(PassEnd{end->pass, 0, 0, 0}));
        continue;
      }
      if (end->pass != passes) return Error("PassEnd for pass {}, expected {}", end->pass, passes);
      ++passes;
      continue;
    }
    if (const auto* e = std::get_if<ErrorMessage>(&*m)) return PeerError(*e);
    if (const auto* d = std::get_if<DirtyPages>(&*m)) {
      // The early dirty set: once every channel ended the last pass, drop
      // the stale copies now, while the source's guest still runs; the
      // PassEnd answer says so. DirtyPages of one block may come in parts.
      if (passes == 0) return Error("DirtyPages before any pass ended");
      if (a.early.empty()) {
        for (const auto& b : blocks_) a.early.emplace_back(b->size() / kWirePageSize);
      }
      a.early[d->block].MergeRaw(d->words, d->page_count, d->first_page);
      // The source sends the set and then waits: drop when the main channel
      // has nothing more for now.
      RETURN_IF_ERROR(DropEarly(a, passes, *d));
      continue;
    }
    const auto* s = std::get_if<migration::Switchover>(&*m);
    if (s == nullptr) {
      return Error("pre-copy: unexpected {} on the main channel", MessageTypeName(TypeOf(*m)));
    }
    if (s->mode != SwitchoverMode::kPostcopy) {
      return Error("Switchover: stop-and-copy to a post-copy destination");
    }
    if (s->final_pass != passes) {
      return Error("Switchover: final pass {}, but {} passes ended", s->final_pass, passes);
    }
    if (s->vcpu_count != vm_.vcpu_count()) {
      return Error("Switchover: the source has {} vCPUs, this VM {}", s->vcpu_count,
                   vm_.vcpu_count());
    }
    if (s->device_count > kMaxDevices) return Error("Switchover: {} devices", s->device_count);
    final_pass_ = s->final_pass;
    switchover_devices_ = s->device_count;
    std::lock_guard lock(mu_);
    stats_.passes = passes;
    stats_.dirty_at_switchover = s->dirty_pages;
    return Status::Ok();
  }
}

Status PostcopyDestination::DropEarly(Attempt& a, uint32_t passes, const DirtyPages& d) {
  const size_t n = a.session.pages.size();
  const uint32_t last = passes - 1;
  if (!a.WaitFor([&] { return a.pass_arrivals.size() > last && a.pass_arrivals[last] == n; })) {
    std::lock_guard lock(a.mu);
    return a.error;
  }
  // Every channel ended the last pass and waits for the next message: the
  // pages they wrote are in place and nobody writes them now.
  if (blocks_[d.block]->page_size() != kWirePageSize) return Status::Ok();  // StartPostcopy's
  const DirtyBitmap& early = a.early[d.block];
  for (uint64_t p = early.FindNextSet(d.first_page); p < d.first_page + d.page_count;) {
    uint64_t end = p + 1;
    while (end < d.first_page + d.page_count && early.Test(end)) ++end;
    bool written = false;
    for (size_t c = 0; c < n && !written; ++c)
      written = a.received[c][d.block].AnyInRange(p, end - p);
    if (written) RETURN_IF_ERROR(vm_.DropPages(d.block, p, end - p));
    p = end < early.pages() ? early.FindNextSet(end) : early.pages();
  }
  return Status::Ok();
}

Status PostcopyDestination::DropStale(Attempt& a) {
  const size_t n = a.session.pages.size();
  for (uint32_t b = 0; b < blocks_.size(); ++b) {
    if (blocks_[b]->page_size() != kWirePageSize) continue;  // StartPostcopy's
    const DirtyBitmap* early = a.early.empty() ? nullptr : &a.early[b];
    // Written in pre-copy, dirty since, and not dropped with the early set.
    auto stale = [&](uint64_t page) {
      if (early != nullptr && early->Test(page)) return false;
      for (size_t c = 0; c < n; ++c) {
        if (a.received[c][b].Test(page)) return true;
      }
      return false;
    };
    uint64_t run = 0, count = 0;
    Status status;
    a.dirty_set[b].ForEachSet([&](uint64_t page) {
      if (!status.ok() || !stale(page)) return;
      if (count > 0 && run + count == page) {
        ++count;
        return;
      }
      if (count > 0) status = vm_.DropPages(b, run, count);
      run = page;
      count = 1;
    });
    if (status.ok() && count > 0) status = vm_.DropPages(b, run, count);
    RETURN_IF_ERROR(status);
  }
  return Status::Ok();
}

Status PostcopyDestination::StartGuest(Attempt& a) {
  const auto switched = Clock::now();
  MessageReader& reader = a.session.main->reader();
  uint64_t dirty_count;
  const uint32_t device_count = switchover_devices_;
  {
    std::lock_guard lock(mu_);
    dirty_count = stats_.dirty_at_switchover;
  }
  std::vector<DirtyBitmap> dirty;
  for (const auto& b : blocks_) dirty.emplace_back(b->size() / kWirePageSize);
  std::vector<std::vector<uint8_t>> vcpus(vm_.vcpu_count());
  std::vector<DeviceBlob> devices;
  uint64_t dirty_seen = 0;
  uint32_t vcpus_seen = 0;
  // DirtyPages*, then VcpuState for each vCPU in order, then DeviceState*;
  // the counts were announced in the Switchover.
  while (dirty_seen < dirty_count || vcpus_seen < vcpus.size() || devices.size() < device_count) {
    Result<Message> m = reader.Read();
    if (!m && m.error().code() == EAGAIN) continue;
    if (!m) return m.error();
    if (const auto* d = std::get_if<DirtyPages>(&*m)) {
      if (vcpus_seen > 0) return Error("DirtyPages after VcpuState");
      DirtyBitmap& bits = dirty[d->block];
      const uint64_t before = bits.CountRange(d->first_page, d->page_count);
      bits.MergeRaw(d->words, d->page_count, d->first_page);
      dirty_seen += bits.CountRange(d->first_page, d->page_count) - before;
      if (dirty_seen > dirty_count) {
        return Error("DirtyPages: more than the {} dirty pages announced", dirty_count);
      }
    } else if (auto* v = std::get_if<VcpuStateMessage>(&*m)) {
      if (dirty_seen != dirty_count) {
        return Error("{} dirty pages announced, {} received", dirty_count, dirty_seen);
      }
      if (vcpus_seen == vcpus.size()) return Error("VcpuState for more than {} vCPUs", vcpus_seen);
      if (v->index != vcpus_seen) return Error("VcpuState {}, expected {}", v->index, vcpus_seen);
      vcpus[vcpus_seen++] = std::move(v->state);
    } else if (auto* d = std::get_if<DeviceState>(&*m)) {
      if (vcpus_seen != vcpus.size()) {
        return Error("DeviceState '{}' before the state of every vCPU", d->name);
      }
      devices.push_back(DeviceBlob{std::move(d->name), std::move(d->state)});
    } else if (const auto* e = std::get_if<ErrorMessage>(&*m)) {
      return PeerError(*e);
    } else {
      return Error("switchover: unexpected {}", MessageTypeName(TypeOf(*m)));
    }
  }
  // The devices' state goes to the VMM with the vCPUs' (StartPostcopy);
  // the reference VMM has none and refuses any that arrives.
  const size_t n = a.session.pages.size();
  const auto state_in = Clock::now();
  a.dirty_set = std::move(dirty);
  // Every page channel ends the last pre-copy pass before its Switchover (a
  // marker: nothing follows until the push), so once they all did, every
  // page they wrote is in place and none is written: drop the stale ones
  // here rather than wait for each channel's thread to be scheduled.
  if (!a.WaitFor([&] {
        return final_pass_ == 0 ||
               (a.pass_arrivals.size() >= final_pass_ && a.pass_arrivals[final_pass_ - 1] == n);
      })) {
    std::lock_guard lock(a.mu);
    return a.error;
  }
  RETURN_IF_ERROR(DropStale(a));
  const auto channels_in = Clock::now();
  // Present: arrived in pre-copy and clean.
  std::vector<DirtyBitmap> present;
  uint64_t present_pages = 0;
  uint64_t precopy_pages = 0;
  for (size_t b = 0; b < blocks_.size(); ++b) {
    DirtyBitmap p(blocks_[b]->size() / kWirePageSize);
    for (size_t c = 0; c < n; ++c) p.Merge(a.received[c][b]);
    precopy_pages += p.Count();
    a.dirty_set[b].ForEachSet([&](uint64_t page) { p.Clear(page); });
    // A huge page is installed whole: present only if all of it is; the
    // source pushes every page of a huge page with a dirty one.
    const uint64_t unit = blocks_[b]->page_size() / kWirePageSize;
    if (unit > 1) {
      for (uint64_t u = 0; u < p.pages(); u += unit) {
        if (p.CountRange(u, unit) != unit) p.ClearRange(u, unit);
      }
    }
    present_pages += p.Count();
    present.push_back(std::move(p));
  }
  std::vector<NetworkBlock> nb;
  for (uint32_t b = 0; b < blocks_.size(); ++b) {
    nb.push_back({blocks_[b]->size(), vm_.direct_push_target(b)});
  }
  network_ = std::make_shared<NetworkPageSource>(std::move(nb));
  for (uint32_t b = 0; b < blocks_.size(); ++b) network_->MarkHave(b, present[b]);
  RETURN_IF_ERROR(network_->Connect(a.priority.get()));
  // The priority channel's replies are read from before the guest runs:
  // its first faults are requested at once.
  a.threads.emplace_back([this, &a] {
    Status s = ReceiveReplies(a);
    if (!s.ok()) a.Break(s.WithContext("priority channel"));
  });
  const auto paging_at = Clock::now();
  RETURN_IF_ERROR(vm_.StartPostcopy(network_, present, vcpus, devices));
  network_->SetPushTarget(vm_.push_target());
  const auto started = Clock::now();
  phase_.store(PostcopyPhase::kPostcopy, std::memory_order_release);
  {
    std::lock_guard lock(mu_);
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
  a.Notify([&] { a.postcopy_go = true; });
  return Status::Ok();
}

Status PostcopyDestination::FollowPostcopy(Attempt& a) {
  MessageReader& reader = a.session.main->reader();
  const auto started = Clock::now();
  while (true) {
    Result<Message> m = reader.Read();
    if (!m && m.error().code() == EAGAIN) continue;
    if (!m) return m.error().WithContext("main channel");
    if (const auto* e = std::get_if<ErrorMessage>(&*m)) return PeerError(*e);
    const auto* complete = std::get_if<Complete>(&*m);
    if (complete == nullptr) {
      return Error("post-copy: unexpected {} on the main channel", MessageTypeName(TypeOf(*m)));
    }
    // Every page was pushed (or answered): wait for the pushes to land,
    // fetch whatever a crossing left missing, end paging, acknowledge.
    const size_t n = a.session.pages.size();
    if (!a.WaitFor([&] { return a.push_ended == n; })) {
      std::lock_guard lock(a.mu);
      return a.error;
    }
    RETURN_IF_ERROR(vm_.FetchMissing());
    RETURN_IF_ERROR(vm_.FinishPaging());
    RETURN_IF_ERROR(a.session.main->writer()
                        .Send(CompleteAck{complete->passes, 0, 0})
                        .WithContext("CompleteAck"));
    std::lock_guard lock(mu_);
    stats_.postcopy += Since(started);
    return Status::Ok();
  }
}

Result<PostcopyDestinationStats> PostcopyDestination::Finish(Attempt& a, Status status) {
  // Post-copy from here on: OK means complete; anything else pauses.
  network_->Disconnect();
  a.Break(status.ok() ? Status(ECANCELED, "completed") : status);
  a.Join();
  {
    std::lock_guard lock(mu_);
    active_ = nullptr;
    stats_.bytes_received +=
        a.session.stats().bytes_received + a.priority->channel().stats().bytes_received;
    stats_.total = Since(start_);
  }
  if (!status.ok()) {
    std::lock_guard lock(a.mu);
    if (!a.error.ok() && a.error.code() != ECANCELED) status = a.error;
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
  ASSIGN_OR_RETURN(Nonce nonce, RandomNonce());
  SessionReceiver receiver(MakeReceiverConfig(), nonce);
  Attempt a;
  ASSIGN_OR_RETURN(a.session, AcceptSession(acceptor, receiver, options_.accept));
  ASSIGN_OR_RETURN(a.priority, AcceptPriorityChannel(acceptor, a.session, options_.key,
                                                     options_.accept.timeout));
  Link& main = *a.session.main;
  {
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
  }
  // What is here; what the vCPUs wait for goes out as requests on Connect.
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
  RETURN_IF_ERROR(main.writer().Send(migration::Resume{session_id_, have_pages}));
  {
    std::lock_guard lock(mu_);
    active_ = &a;
    ++stats_.sessions;
  }
  phase_.store(PostcopyPhase::kPostcopy, std::memory_order_release);
  a.postcopy_go = true;
  RETURN_IF_ERROR(network_->Connect(a.priority.get()));
  a.threads.emplace_back([this, &a] {
    Status s = ReceiveReplies(a);
    if (!s.ok()) a.Break(s.WithContext("priority channel"));
  });
  for (size_t c = 0; c < a.session.pages.size(); ++c) {
    a.threads.emplace_back([this, &a, c] {
      // Each page channel opens its push with a copy of the Switchover.
      Link& link = *a.session.pages[c];
      Result<Message> m = link.reader().Read();
      while (!m && m.error().code() == EAGAIN) m = link.reader().Read();
      Status s = !m ? m.error()
                 : std::holds_alternative<migration::Switchover>(*m)
                     ? Status::Ok()
                     : Error("resumed page channel opened with {}", MessageTypeName(TypeOf(*m)));
      if (s.ok()) s = ReceivePushChannel(a, c);
      if (!s.ok()) a.Break(s.WithContext(fmt::format("page channel {}", c)));
    });
  }
  Status status = FollowPostcopy(a);
  return Finish(a, status);
}

}  // namespace faultline::migration
