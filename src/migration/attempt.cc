#include "src/migration/attempt.h"

#include <cerrno>

namespace faultline::migration {
namespace {

// An error that follows from another one rather than explaining it: the
// peer closing a stream between messages, or a channel shut down here.
bool IsConsequence(const Status& status) {
  return status.code() == ECONNRESET || status.code() == ESHUTDOWN;
}

constexpr size_t Index(Milestone m) { return static_cast<size_t>(m); }

}  // namespace

Attempt::~Attempt() {
  Close();
  Join();
}

Status Attempt::Adopt(Session session, std::unique_ptr<Link> priority) {
  sys::MutexLock lock(mu_);
  session_ = std::move(session);
  priority_ = std::move(priority);
  barrier_.emplace(session_.pages.size());
  if (!Over()) return Status::Ok();
  ShutdownLinks();
  return error_ ? *error_ : Status(ECANCELED, "migration abandoned");
}

ChannelStats Attempt::stats() const {
  ChannelStats s = session_.stats();
  if (priority_) {
    const ChannelStats p = priority_->channel().stats();
    s.bytes_sent += p.bytes_sent;
    s.bytes_received += p.bytes_received;
    s.send_calls += p.send_calls;
    s.receive_calls += p.receive_calls;
  }
  return s;
}

bool Attempt::Over() const { return error_.has_value() || closed_; }

void Attempt::ShutdownLinks() {
  session_.Shutdown();
  if (priority_) priority_->channel().Shutdown();
  if (barrier_) barrier_->Cancel();
  cv_.notify_all();
}

void Attempt::Fail(Status why, ErrorCode code) { Record(std::move(why), code, true); }

Status Attempt::FailByPeer(const ErrorMessage& error, std::string_view where) {
  Status why = PeerError(error);
  if (!where.empty()) why = why.WithContext(where);
  Record(why, error.code, false);
  return why;
}

void Attempt::Record(Status why, ErrorCode code, bool report) {
  {
    sys::MutexLock lock(mu_);
    if (closed_) return;  // the attempt is over: threads only wind down
    if (error_) {
      // A consequence recorded first (the source closing the main channel
      // because a page channel broke, say): keep the error that says what
      // went wrong.
      if (IsConsequence(*error_) && !IsConsequence(why)) error_ = why;
      return;
    }
    error_ = why;
    // Error goes out before the links are shut down (or it could not), and
    // outside mu_: a send may block. StopReporting, under mu_, sees error_
    // set from here on, so no Error leaves once the guest may run.
    report = report && reporting_ && session_.main != nullptr;
    if (!report) ShutdownLinks();
  }
  if (!report) return;
  TellPeer(why, code);
  sys::MutexLock lock(mu_);
  ShutdownLinks();
}

bool Attempt::failed() const {
  sys::MutexLock lock(mu_);
  return error_.has_value();
}

Status Attempt::error() const {
  sys::MutexLock lock(mu_);
  return error_ ? *error_ : Status::Ok();
}

Status Attempt::failure() const {
  sys::MutexLock lock(mu_);
  return error_ ? *error_ : Status(ECANCELED, "migration abandoned");
}

Status Attempt::StopReporting() {
  sys::MutexLock lock(mu_);
  reporting_ = false;
  return error_ ? *error_ : Status::Ok();
}

void Attempt::TellPeer(const Status& why, ErrorCode code) {
  sys::MutexLock lock(write_mu_);
  (void)session_.main->writer().Send(ErrorMessage{code, why.ToString()});
}

Status Attempt::SendMain(const Message& message) {
  sys::MutexLock lock(write_mu_);
  return session_.main->writer().Send(message);
}

void Attempt::Close() {
  sys::MutexLock lock(mu_);
  closed_ = true;
  ShutdownLinks();
}

void Attempt::Spawn(std::string what, std::function<Status()> body) {
  threads_.emplace_back([this, what = std::move(what), body = std::move(body)] {
    Status status = body();
    if (!status.ok()) Fail(std::move(status).WithContext(what));
  });
}

void Attempt::StartChannels(std::function<Status(size_t)> body) {
  const size_t n = page_channels();
  for (size_t c = 0; c < n; ++c) {
    threads_.emplace_back([this, c, body] {
      Status status = body(c);
      if (!status.ok() && IsConsequence(status)) {
        AwaitFor(Milestone::kMainEnded, 1, std::chrono::seconds(1));
      }
      if (!status.ok()) Fail(std::move(status).WithContext(fmt::format("page channel {}", c)));
      Reach(Milestone::kChannelEnded);
    });
  }
}

void Attempt::EndMain(Status status, ErrorCode code) {
  Reach(Milestone::kMainEnded);
  if (status.ok()) return;
  if (status.code() == ECONNRESET) {
    AwaitFor(Milestone::kChannelEnded, page_channels(), std::chrono::seconds(1));
  }
  Fail(std::move(status), code);
}

void Attempt::Join() {
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
}

void Attempt::Reach(Milestone milestone) {
  sys::MutexLock lock(mu_);
  ++reached_[Index(milestone)];
  cv_.notify_all();
}

bool Attempt::Await(Milestone milestone, size_t count) {
  sys::MutexLock lock(mu_);
  cv_.wait(lock.native(),
           [&]() REQUIRES(mu_) { return Over() || reached_[Index(milestone)] >= count; });
  return reached_[Index(milestone)] >= count && !Over();
}

bool Attempt::AwaitFor(Milestone milestone, size_t count, std::chrono::milliseconds timeout) {
  sys::MutexLock lock(mu_);
  cv_.wait_for(lock.native(), timeout,
               [&]() REQUIRES(mu_) { return Over() || reached_[Index(milestone)] >= count; });
  return reached_[Index(milestone)] >= count && !Over();
}

size_t Attempt::reached(Milestone milestone) const {
  sys::MutexLock lock(mu_);
  return reached_[Index(milestone)];
}

}  // namespace faultline::migration
