#include "src/paging/fault_queue.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>

#include "src/paging/paged_block.h"
#include "src/sys/sched.h"

namespace faultline::paging {

Result<std::unique_ptr<FaultQueue>> FaultQueue::Create(PagedBlock& owner, uint32_t index,
                                                       uint64_t offset, uint64_t length) {
  const UffdInstaller& installer = owner.installer();
  std::unique_ptr<FaultQueue> q(
      new FaultQueue(owner, index, installer.host(offset), installer.host(offset + length)));
  ASSIGN_OR_RETURN(q->uffd_, sys::Userfaultfd::Create(O_NONBLOCK, installer.features()));
  ASSIGN_OR_RETURN(q->registration_,
                   q->uffd_.Register(installer.host(offset), length, installer.modes()));
  RETURN_IF_ERROR(q->OpenStopFd());
  return q;
}

Result<std::unique_ptr<FaultQueue>> FaultQueue::Adopt(FaultSink& sink, uint32_t index,
                                                      sys::Userfaultfd uffd) {
  if (!uffd.valid()) return Error("fault queue {}: no userfaultfd to adopt", index);
  if (!uffd.non_blocking()) {
    // Several threads poll it; a blocking read would keep one from Stop().
    return Error("fault queue {}: the adopted userfaultfd must be non-blocking", index);
  }
  std::unique_ptr<FaultQueue> q(new FaultQueue(sink, index, Hva(uint64_t{0}), Hva(~uint64_t{0})));
  q->uffd_ = std::move(uffd);
  RETURN_IF_ERROR(q->OpenStopFd());
  return q;
}

Status FaultQueue::OpenStopFd() {
  stop_fd_ = sys::UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!stop_fd_.valid()) {
    const int err = errno;
    return ErrnoError(err, "fault queue {}: eventfd", index_);
  }
  return Status::Ok();
}

FaultQueue::~FaultQueue() { Stop(); }

Status FaultQueue::Start(uint32_t threads, int realtime_priority) {
  if (!threads_.empty()) return Error("fault queue {}: already started", index_);
  for (uint32_t i = 0; i < threads; ++i) {
    threads_.emplace_back([this, realtime_priority] {
      if (realtime_priority != 0 && sys::SetRealtime(realtime_priority).ok()) {
        owner_.ctx().metrics().realtime_threads.Add();
      }
      HandlerLoop();
    });
  }
  return Status::Ok();
}

void FaultQueue::Stop() {
  if (threads_.empty()) return;
  const uint64_t one = 1;
  // An eventfd write of 1 cannot fail short of a bad fd; the threads poll it.
  (void)!::write(stop_fd_.get(), &one, sizeof(one));
  for (std::thread& t : threads_) t.join();
  threads_.clear();
}

bool FaultQueue::SeenInBatch(std::span<const sys::UffdMessage> msgs, size_t i) const {
  const uint64_t unit = owner_.unit_at(msgs[i].fault_address());
  const uint64_t page = msgs[i].fault_address().value / unit;
  for (size_t j = 0; j < i; ++j) {
    if (msgs[j].type() == sys::UffdMessage::Type::kPagefault &&
        msgs[j].fault_address().value / unit == page) {
      return true;
    }
  }
  return false;
}

void FaultQueue::HandlerLoop() {
  std::array<sys::UffdMessage, 32> msgs;
  while (true) {
    std::array<pollfd, 2> fds = {{{uffd_.fd(), POLLIN, 0}, {stop_fd_.get(), POLLIN, 0}}};
    const int ready = ::poll(fds.data(), fds.size(), -1);
    if (ready < 0) {
      if (errno == EINTR) continue;
      owner_.RecordError(ErrnoError(errno, "fault queue {}: poll", index_));
      return;
    }
    if (fds[1].revents != 0) return;
    if ((fds[0].revents & (POLLERR | POLLNVAL)) != 0) {
      owner_.RecordError(
          Error("fault queue {}: userfaultfd revents {:#x}", index_, fds[0].revents));
      return;
    }
    size_t n = 0;
    {
      sys::WriterLock lock(event_mu_);
      auto read = uffd_.ReadEvents(msgs);
      if (!read.has_value()) {
        owner_.RecordError(read.error().WithContext(fmt::format("fault queue {}", index_)));
        return;
      }
      n = *read;
      // REMOVE first, still holding the lock: see event_mu().
      for (size_t i = 0; i < n; ++i) {
        if (msgs[i].type() == sys::UffdMessage::Type::kRemove) {
          owner_.HandleRemove(*this, msgs[i].range_start(), msgs[i].range_end());
        }
      }
    }
    const auto read_at = std::chrono::steady_clock::now();
    for (size_t i = 0; i < n; ++i) {
      if (msgs[i].type() != sys::UffdMessage::Type::kPagefault) continue;
      // Threads whose faults were read together are all waiting already,
      // so whatever resolves the first fault on a unit wakes the others:
      // handle each unit once per batch.
      if (SeenInBatch(msgs, i)) {
        owner_.JoinedFault(*this, msgs[i], read_at);
      } else {
        owner_.HandleFault(*this, msgs[i], read_at);
      }
    }
  }
}

}  // namespace faultline::paging
