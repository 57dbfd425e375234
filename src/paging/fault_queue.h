// FaultQueue: one userfaultfd over one part of a RAM block, with its own
// handler threads. A block is split into several parts, each with its own
// queue, so faults from different vCPUs (which mostly touch different
// memory) are read and served in parallel instead of waiting in one queue.
// An adopted queue reads a userfaultfd that another process registered over
// several blocks (AdoptedUffd routes its messages to them).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <thread>
#include <vector>

#include "faultline/status.h"
#include "src/sys/mutex.h"
#include "src/sys/unique_fd.h"
#include "src/sys/userfaultfd.h"

namespace faultline::paging {

class FaultQueue;
class PagedBlock;
class PagerContext;

class FaultSink;

class FaultQueue {
 public:
  // Opens a userfaultfd with the block installer's features and registers
  // block bytes [offset, offset + length) with its modes. `index` names the
  // queue in metrics.
  static Result<std::unique_ptr<FaultQueue>> Create(PagedBlock& owner, uint32_t index,
                                                    uint64_t offset, uint64_t length);
  // Reads `uffd`, which someone else registered: nothing is registered or
  // unregistered here, and the queue covers whatever it reports.
  static Result<std::unique_ptr<FaultQueue>> Adopt(FaultSink& sink, uint32_t index,
                                                   sys::Userfaultfd uffd);
  ~FaultQueue();  // Stop()
  FaultQueue(const FaultQueue&) = delete;
  FaultQueue& operator=(const FaultQueue&) = delete;

  // `realtime_priority` non-zero: the threads run SCHED_FIFO at it if they
  // may (each one that does is counted in FaultMetrics::realtime_threads).
  Status Start(uint32_t threads, int realtime_priority);
  // Ends the handler threads (after the message each is handling).
  void Stop();
  // Ends paging of this part: threads still blocked in a fault are woken
  // and find whatever the memory holds.
  Status Unregister() { return registration_.Unregister(); }

  uint32_t index() const { return index_; }
  // The addresses the queue's registration covers, [start, end): the whole
  // address space for an adopted queue.
  Hva start() const { return start_; }
  Hva end() const { return end_; }
  const sys::Userfaultfd& uffd() const { return uffd_; }

  // Serializes installs against reading events. An install holds it shared
  // from its last look at the unit's state to the end of its ioctl; a
  // handler holds it exclusively while it reads messages and records
  // REMOVE events. Reading a REMOVE message is what lets the kernel go on
  // to zap the range, so an install either ran before the zap (and is
  // zapped) or sees the unit marked discarded (and installs nothing).
  sys::SharedMutex& event_mu() RETURN_CAPABILITY(event_mu_) { return event_mu_; }

 private:
  FaultQueue(FaultSink& owner, uint32_t index, Hva start, Hva end)
      : owner_(owner), index_(index), start_(start), end_(end) {}
  Status OpenStopFd();
  void HandlerLoop();
  // Whether message i faults on the same unit as an earlier one of msgs.
  bool SeenInBatch(std::span<const sys::UffdMessage> msgs, size_t i) const;

  FaultSink& owner_;
  const uint32_t index_;
  const Hva start_;
  const Hva end_;
  sys::Userfaultfd uffd_;
  sys::UffdRegistration registration_;
  sys::UniqueFd stop_fd_;  // an eventfd; readable once Stop() was called
  std::vector<std::thread> threads_;
  sys::SharedMutex event_mu_;
};

// What a queue hands its messages to: the block it covers (PagedBlock), or
// a router over the blocks an adopted userfaultfd covers (AdoptedUffd).
class FaultSink {
 public:
  using Clock = std::chrono::steady_clock;
  virtual ~FaultSink() = default;

  virtual PagerContext& ctx() const = 0;
  // The install unit of the memory at `address` (faults on one unit in one
  // batch are handled once).
  virtual uint64_t unit_at(Hva address) const = 0;
  virtual void HandleFault(FaultQueue& queue, const sys::UffdMessage& msg,
                           Clock::time_point read_at) = 0;
  // A fault on a unit another fault of the same batch is resolving.
  virtual void JoinedFault(FaultQueue& queue, const sys::UffdMessage& msg,
                           Clock::time_point read_at) = 0;
  virtual void HandleRemove(FaultQueue& queue, Hva start, Hva end) REQUIRES(queue.event_mu()) = 0;
  virtual void RecordError(Status status) = 0;
};

}  // namespace faultline::paging
