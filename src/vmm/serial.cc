#include "src/vmm/serial.h"

namespace faultline::vmm {
namespace {
constexpr uint16_t kLineStatus = 5;
constexpr uint8_t kTransmitterEmpty = 0x60;  // THRE | TEMT
constexpr size_t kMaxLine = 4096;
}  // namespace

void Serial::Out(uint32_t vcpu, uint16_t port, uint8_t value) {
  if (port != kBase || vcpu >= lines_.size()) return;  // control registers: ignored
  std::string& line = lines_[vcpu];
  if (value == '\r') return;
  if (value != '\n') {
    line.push_back(static_cast<char>(value));
    if (line.size() < kMaxLine) return;
  }
  sys::MutexLock lock(sink_mu_);
  if (sink_) sink_(line);
  line.clear();
}

uint8_t Serial::In(uint16_t port) const {
  return port == kBase + kLineStatus ? kTransmitterEmpty : 0;
}

void Serial::Flush() {
  sys::MutexLock lock(sink_mu_);
  for (std::string& line : lines_) {
    if (!line.empty() && sink_) sink_(line);
    line.clear();
  }
}

}  // namespace faultline::vmm
