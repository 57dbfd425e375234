#include "src/migration/completion_watcher.h"

#include <cerrno>

namespace faultline::migration {

CompletionWatcher::CompletionWatcher(Attempt& attempt) : a_(attempt), thread_([this] { Run(); }) {}

CompletionWatcher::~CompletionWatcher() {
  bool ended;
  {
    sys::MutexLock lock(mu_);
    ended = verdict_.has_value();
  }
  if (!ended) a_.Close();
  thread_.join();
}

void CompletionWatcher::Run() {
  MessageReader& reader = a_.main().reader();
  Result<Message> m = reader.Read();
  // The destination is quiet until the end, which may be a long pre-copy.
  while (!m && m.error().code() == EAGAIN) m = reader.Read();
  Status end;
  bool refused = false;
  if (!m) {
    end = m.error().WithContext("main channel");
  } else if (std::holds_alternative<CompleteAck>(*m)) {
    end = Status::Ok();
  } else if (const auto* e = std::get_if<ErrorMessage>(&*m)) {
    end = a_.FailByPeer(*e, "the destination failed");
    refused = true;
  } else {
    end = Error("the destination sent {} on the main channel", MessageTypeName(TypeOf(*m)));
  }
  if (!end.ok()) a_.Fail(end);  // wakes every other thread (the first failure wins)
  sys::MutexLock lock(mu_);
  verdict_ = std::move(end);
  refused_ = refused;
  cv_.notify_all();
}

Status CompletionWatcher::Wait() {
  Status verdict;
  {
    sys::MutexLock lock(mu_);
    // A failure or close of the attempt shuts the main channel down, so the
    // read above always ends. The verdict is final: a CompleteAck read
    // before other channels closed wins.
    cv_.wait(lock.native(), [&]() REQUIRES(mu_) { return verdict_.has_value(); });
    if (verdict_->ok()) return Status::Ok();
    verdict = *verdict_;
  }
  Status first = a_.error();
  return first.ok() ? verdict : first;
}

Status CompletionWatcher::Explain(Status local, std::chrono::milliseconds timeout) {
  sys::MutexLock lock(mu_);
  cv_.wait_for(lock.native(), timeout, [&]() REQUIRES(mu_) { return verdict_.has_value(); });
  return refused_ ? *verdict_ : local;
}

bool CompletionWatcher::peer_refused() const {
  sys::MutexLock lock(mu_);
  return refused_;
}

}  // namespace faultline::migration
