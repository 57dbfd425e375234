// A write-only 16550 console at 0x3f8: enough for a guest that polls the
// line status register and writes bytes. Lines are assembled per vCPU so
// that text from several vCPUs never interleaves within a line.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "src/sys/mutex.h"

namespace faultline::vmm {

class Serial {
 public:
  using Sink = std::function<void(const std::string& line)>;

  Serial(uint32_t vcpus, Sink sink) : lines_(vcpus), sink_(std::move(sink)) {}
  ~Serial() { Flush(); }

  static bool Handles(uint16_t port) { return port >= kBase && port < kBase + 8; }
  void Out(uint32_t vcpu, uint16_t port, uint8_t value);
  uint8_t In(uint16_t port) const;
  // Emits any partial lines.
  void Flush();

  static constexpr uint16_t kBase = 0x3f8;

 private:
  std::vector<std::string> lines_;  // per vCPU; only that vCPU's thread appends
  sys::Mutex sink_mu_;
  Sink sink_ GUARDED_BY(sink_mu_);  // called under sink_mu_ only: one line at a time
};

}  // namespace faultline::vmm
