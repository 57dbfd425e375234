// The test guest's structured reporting channel (guest/abi.h): reports read
// from guest memory on a 32-bit OUT to FL_PORT_REPORT, commands returned on
// IN from FL_PORT_COMMAND, and the final exit code on FL_PORT_EXIT.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <span>

#include "faultline/status.h"
#include "faultline/types.h"
#include "src/sys/mutex.h"
#include "src/vmm/guest_report.h"

namespace faultline::vmm {

class TestPort {
 public:
  using ReadMemory = std::function<Status(Gpa, std::span<uint8_t>)>;
  // Called on the reporting vCPU's thread while that vCPU is out of KVM_RUN;
  // an observer may touch guest memory the vCPU is not using.
  using Observer = std::function<void(const GuestEvent&)>;

  TestPort(uint32_t vcpus, uint32_t tsc_khz, ReadMemory read, Observer observer);

  static bool Handles(uint16_t port);

  // A 32-bit OUT of a report's GPA. Bad reports are errors: the guest is ours.
  Status Report(uint32_t vcpu, uint32_t gpa);
  uint32_t Command() const { return command_.load(std::memory_order_acquire); }
  void SetCommand(uint32_t command) { command_.store(command, std::memory_order_release); }
  void Exit(uint32_t vcpu, uint8_t code);

  GuestReport Snapshot() const;

 private:
  Status HandleReport(uint32_t vcpu, std::span<const uint8_t> bytes);

  ReadMemory read_;
  Observer observer_;
  std::atomic<uint32_t> command_{0};
  mutable sys::Mutex mu_;
  GuestReport report_ GUARDED_BY(mu_);
};

}  // namespace faultline::vmm
