// The embedding API (include/faultline/embed.h) over the migration engines:
// the VMM's RAM becomes a GuestMemory whose memslots stay the VMM's and
// whose dirty pages userfaultfd write-protect tracks; the VmHandle becomes
// the engines' VmControl.
#include "faultline/embed.h"

#include <atomic>
#include <utility>

#include "src/embed/vm_glue.h"
#include "src/memory/guest_memory.h"
#include "src/migration/auth.h"
#include "src/migration/destination.h"
#include "src/migration/memory_vm.h"
#include "src/migration/postcopy_destination.h"
#include "src/migration/postcopy_source.h"
#include "src/migration/source.h"
#include "src/migration/tls_context.h"
#include "src/migration/transport.h"

namespace faultline {

Status VmHandle::LoadDevices(std::span<const uint8_t> state) {
  if (state.empty()) return Status::Ok();
  return Error(
      "{} bytes of device state arrived, and this VMM does not load device state (override "
      "VmHandle::LoadDevices)",
      state.size());
}

namespace {

using embed::HandleControl;
using embed::Ram;

Status CheckOptions(const MigrationOptions& o) {
  if (o.channels == 0 || o.channels > migration::kMaxPageChannels) {
    return Error("MigrationOptions::channels {}: must be 1..{}", o.channels,
                 migration::kMaxPageChannels);
  }
  if (!o.key.empty()) {
    const migration::AuthKey key(o.key.begin(), o.key.end());
    RETURN_IF_ERROR(migration::ValidateKey(key).WithContext("MigrationOptions::key"));
  }
  return Status::Ok();
}

migration::AuthKey Key(const MigrationOptions& o) { return {o.key.begin(), o.key.end()}; }

Result<migration::TransportOptions> Transport(const MigrationOptions& o) {
  migration::TransportOptions t;
  t.io_timeout = o.io_timeout;
  if (!o.tls_dir.empty()) {
    Result<std::shared_ptr<migration::TlsContext>> tls =
        migration::TlsContext::Load(o.tls_dir, o.tls_peer_name);
    if (!tls.has_value()) return tls.error().WithContext("MigrationOptions::tls_dir");
    t.tls = std::move(*tls);
  } else if (!o.tls_peer_name.empty()) {
    return Error("MigrationOptions::tls_peer_name goes with tls_dir");
  }
  return t;
}

const char* PhaseName(migration::PostcopyPhase phase) {
  switch (phase) {
    case migration::PostcopyPhase::kNotStarted:
      return "setup";
    case migration::PostcopyPhase::kPrecopy:
      return "precopy";
    case migration::PostcopyPhase::kPostcopy:
      return "postcopy";
    case migration::PostcopyPhase::kPaused:
      return "paused";
    case migration::PostcopyPhase::kCompleted:
      return "completed";
    case migration::PostcopyPhase::kFailed:
      return "failed";
  }
  return "failed";
}

uint64_t Us(std::chrono::microseconds d) { return static_cast<uint64_t>(d.count()); }

MigrationStats FromPostcopySource(const migration::PostcopySourceStats& s) {
  MigrationStats out;
  out.passes = static_cast<uint32_t>(s.passes.size());
  for (const migration::PassStats& p : s.passes) {
    out.pages += p.data_pages;
    out.zero_pages += p.zero_pages;
  }
  out.bytes = s.bytes_sent;
  out.downtime_us = Us(s.switchover_send);
  out.postcopy_us = Us(s.postcopy);
  out.pages_pushed = s.pages_pushed;
  out.pages_requested = s.pages_requested;
  out.sessions = s.sessions;
  out.total_us = Us(s.total);
  return out;
}

}  // namespace

// --- The source ---

struct OutgoingMigration::Impl {
  MigrationOptions options;
  migration::TransportOptions transport;  // Transport(options)
  Ram ram;
  std::unique_ptr<migration::SourceVm> vm;
  std::unique_ptr<migration::MigrationSource> precopy;  // one of the two
  std::unique_ptr<migration::PostcopySource> postcopy;
  std::atomic<bool> started{false};
  std::atomic<bool> ended{false};

  Result<std::unique_ptr<migration::Connector>> Connect(std::string_view address) const {
    ASSIGN_OR_RETURN(migration::Address a, migration::ParseAddress(address));
    return migration::MakeConnector(a, transport);
  }
};

OutgoingMigration::OutgoingMigration(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
OutgoingMigration::~OutgoingMigration() = default;

Result<std::unique_ptr<OutgoingMigration>> OutgoingMigration::Create(VmHandle& vm,
                                                                     std::vector<GuestRegion> ram,
                                                                     MigrationOptions options) {
  RETURN_IF_ERROR(CheckOptions(options));
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  ASSIGN_OR_RETURN(impl->transport, Transport(options));
  RETURN_IF_ERROR(impl->ram.Init(ram));
  impl->vm =
      migration::MakeMemorySource(*impl->ram.memory, std::make_unique<HandleControl>(vm, false));
  migration::SourceOptions base;
  base.page_channels = options.channels;
  base.key = Key(options);
  base.downtime_target = options.downtime_target;
  base.bandwidth_limit = options.bandwidth_limit;
  if (options.postcopy) {
    migration::PostcopySourceOptions p;
    p.base = base;
    p.precopy_passes = options.precopy_passes;
    impl->postcopy = std::make_unique<migration::PostcopySource>(*impl->vm, p);
  } else {
    if (options.precopy_passes != 0) base.max_precopy_passes = options.precopy_passes;
    impl->precopy = std::make_unique<migration::MigrationSource>(*impl->vm, base);
  }
  return std::unique_ptr<OutgoingMigration>(new OutgoingMigration(std::move(impl)));
}

Result<MigrationStats> OutgoingMigration::Run(std::string_view address) {
  ASSIGN_OR_RETURN(std::unique_ptr<migration::Connector> connector, impl_->Connect(address));
  impl_->started.store(true);
  if (impl_->precopy) {
    Result<migration::SourceStats> s = impl_->precopy->Run(*connector);
    impl_->ended.store(true);
    if (!s.has_value()) return s.error();
    MigrationStats out;
    out.passes = static_cast<uint32_t>(s->passes.size());
    out.pages = s->data_pages;
    out.zero_pages = s->zero_pages;
    out.bytes = s->bytes_sent;
    out.downtime_us = Us(s->downtime);
    out.total_us = Us(s->total);
    return out;
  }
  Result<migration::PostcopySourceStats> s = impl_->postcopy->Run(*connector);
  if (!s.has_value()) return s.error();
  return FromPostcopySource(*s);
}

Result<MigrationStats> OutgoingMigration::Resume(std::string_view address) {
  if (!impl_->postcopy) return Error("Resume: only a post-copy migration resumes");
  ASSIGN_OR_RETURN(std::unique_ptr<migration::Connector> connector, impl_->Connect(address));
  Result<migration::PostcopySourceStats> s = impl_->postcopy->Resume(*connector);
  if (!s.has_value()) return s.error();
  return FromPostcopySource(*s);
}

void OutgoingMigration::StartPostcopy() {
  if (impl_->postcopy) impl_->postcopy->StartPostcopy();
}

void OutgoingMigration::Cancel() {
  if (impl_->precopy) impl_->precopy->Cancel();
  if (impl_->postcopy) impl_->postcopy->Cancel();
}

MigrationProgress OutgoingMigration::progress() const {
  MigrationProgress p;
  if (impl_->postcopy) {
    const migration::PostcopyProgress q = impl_->postcopy->progress();
    p.pass = q.pass;
    p.pages_sent = q.pages_sent + q.pages_pushed;
    p.pages_remaining = q.pages_remaining;
    p.phase = PhaseName(q.phase);
    return p;
  }
  const migration::SourceProgress q = impl_->precopy->progress();
  p.pass = q.pass;
  p.pages_sent = q.pages_sent;
  const migration::SourceOutcome outcome = impl_->precopy->outcome();
  if (outcome == migration::SourceOutcome::kCompleted) {
    p.phase = "completed";
  } else if (impl_->ended.load()) {
    p.phase = "failed";
  } else if (!impl_->started.load()) {
    p.phase = "setup";
  } else {
    p.phase = q.paused ? "switchover" : "precopy";
  }
  return p;
}

// --- The destination ---

struct IncomingMigration::Impl {
  VmHandle* handle = nullptr;
  MigrationOptions options;
  migration::TransportOptions transport;  // Transport(options)
  Ram ram;
  std::unique_ptr<migration::DestinationVm> vm;  // pre-copy
  std::unique_ptr<migration::PostcopyDestinationVm> postcopy_vm;
  std::unique_ptr<migration::MigrationDestination> precopy;  // one of the two
  std::unique_ptr<migration::PostcopyDestination> postcopy;
  std::unique_ptr<migration::Acceptor> listener;
  std::atomic<int> state{0};  // 0 setup, 1 running, 2 completed, 3 failed

  Status Listening() const {
    if (listener == nullptr) return Error("IncomingMigration: Listen() first");
    return Status::Ok();
  }
};

IncomingMigration::IncomingMigration(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
IncomingMigration::~IncomingMigration() = default;

Result<std::unique_ptr<IncomingMigration>> IncomingMigration::Create(VmHandle& vm,
                                                                     std::vector<GuestRegion> ram,
                                                                     MigrationOptions options) {
  RETURN_IF_ERROR(CheckOptions(options));
  auto impl = std::make_unique<Impl>();
  impl->handle = &vm;
  impl->options = options;
  ASSIGN_OR_RETURN(impl->transport, Transport(options));
  RETURN_IF_ERROR(impl->ram.Init(ram));
  auto control = std::make_unique<HandleControl>(vm, options.memory_is_zero);
  migration::DestinationOptions d;
  d.key = Key(options);
  if (options.postcopy) {
    impl->postcopy_vm =
        migration::MakeMemoryPostcopyDestination(*impl->ram.memory, std::move(control));
    // Refused now, before a source connects (e.g. a backing no installer
    // can page over the network).
    RETURN_IF_ERROR(impl->postcopy_vm->CheckPaging());
    impl->postcopy = std::make_unique<migration::PostcopyDestination>(*impl->postcopy_vm, d);
  } else {
    impl->vm = migration::MakeMemoryDestination(*impl->ram.memory, std::move(control));
    impl->precopy = std::make_unique<migration::MigrationDestination>(*impl->vm, d);
  }
  return std::unique_ptr<IncomingMigration>(new IncomingMigration(std::move(impl)));
}

Result<std::string> IncomingMigration::Listen(std::string_view address) {
  if (impl_->listener != nullptr) return Error("IncomingMigration: already listening");
  ASSIGN_OR_RETURN(migration::Address a, migration::ParseAddress(address));
  ASSIGN_OR_RETURN(impl_->listener, migration::MakeAcceptor(a, impl_->transport));
  return impl_->listener->address();
}

namespace {

MigrationStats FromPostcopy(const migration::PostcopyDestinationStats& s) {
  MigrationStats out;
  out.passes = s.passes;
  out.pages = s.precopy_pages;
  out.bytes = s.bytes_received;
  out.postcopy_us = Us(s.postcopy);
  out.pages_pushed = s.network.pages_pushed;
  out.pages_requested = s.network.pages_requested;
  out.faults = s.paging.faults;
  out.fault_p50_us = s.network.fault_latency.p50_us;
  out.fault_p99_us = s.network.fault_latency.p99_us;
  out.sessions = s.sessions;
  out.total_us = Us(s.total);
  return out;
}

}  // namespace

Result<MigrationStats> IncomingMigration::Run() {
  RETURN_IF_ERROR(impl_->Listening());
  impl_->state.store(1);
  if (impl_->postcopy) {
    Result<migration::PostcopyDestinationStats> s = impl_->postcopy->Run(*impl_->listener);
    if (!s.has_value()) {
      impl_->state.store(3);
      return s.error();
    }
    impl_->state.store(2);
    return FromPostcopy(*s);
  }
  Result<migration::DestinationStats> s = impl_->precopy->Run(*impl_->listener);
  Status started =
      s.has_value() ? impl_->handle->Start().WithContext("starting the guest") : s.error();
  impl_->state.store(started.ok() ? 2 : 3);
  RETURN_IF_ERROR(started);
  MigrationStats out;
  out.passes = s->passes;
  out.pages = s->data_pages;
  out.zero_pages = s->zero_pages;
  out.bytes = s->bytes_received;
  out.total_us = Us(s->total);
  return out;
}

Result<MigrationStats> IncomingMigration::Resume() {
  RETURN_IF_ERROR(impl_->Listening());
  if (!impl_->postcopy) return Error("Resume: only a post-copy migration resumes");
  Result<migration::PostcopyDestinationStats> s = impl_->postcopy->Resume(*impl_->listener);
  if (!s.has_value()) return s.error();
  impl_->state.store(2);
  return FromPostcopy(*s);
}

void IncomingMigration::Cancel() {
  if (impl_->precopy) impl_->precopy->Cancel();
  if (impl_->postcopy) impl_->postcopy->Cancel();
}

MigrationProgress IncomingMigration::progress() const {
  MigrationProgress p;
  if (impl_->postcopy) {
    const migration::PostcopyPhase phase = impl_->postcopy->phase();
    p.pass = impl_->postcopy->stats().passes;
    p.phase = PhaseName(phase);
    return p;
  }
  static constexpr const char* kPhases[] = {"setup", "precopy", "completed", "failed"};
  p.phase = kPhases[impl_->state.load()];
  return p;
}

}  // namespace faultline
