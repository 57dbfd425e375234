// The QEMU command line that boots the test guest on QEMU's TCG, for the
// tests and benchmarks that compare with QEMU: multiboot kernel, its
// command line, RAM, serial to a file, and the isa-debug-exit device at
// port 0xf4 that the guest's exit port writes (QEMU exits with
// (code << 1) | 1).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace faultline::vmm {

inline std::vector<std::string> QemuTcgCommand(const std::string& qemu, const std::string& guest,
                                               const std::string& append, uint64_t memory_mib,
                                               const std::string& serial_file) {
  return {qemu,
          "-kernel",
          guest,
          "-append",
          append,
          "-m",
          std::to_string(memory_mib),
          "-accel",
          "tcg",
          "-display",
          "none",
          "-monitor",
          "none",
          "-no-reboot",
          "-serial",
          "file:" + serial_file,
          "-device",
          "isa-debug-exit,iobase=0xf4,iosize=0x04"};
}

}  // namespace faultline::vmm
