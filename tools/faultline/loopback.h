// Plain loopback TCP, the yardstick `faultline demo --tcp-baseline` holds a
// migration's bytes and CPU time against: measured in the same run, on the
// same machine, through the migration's own SocketChannel.
#pragma once

#include <cstdint>
#include <vector>

#include "faultline/status.h"

namespace faultline::cli {

// CPU time of this process, all threads, in ms: the cost of a transfer
// whatever else the machine is running (the shared 2-core machines here
// often have other jobs that take the CPU away from both measurements).
double ProcessCpuMs();

struct LoopbackRate {
  double bytes_per_sec = 0;
  double cpu_ms_per_gib = 0;
};

// `bytes` over one loopback connection, no protocol: 1 MiB sends into a
// 1 MiB receive buffer.
Result<LoopbackRate> MeasureLoopback(uint64_t bytes);

// The mean of two runs (before and after a migration).
LoopbackRate Mean(const std::vector<LoopbackRate>& runs);

}  // namespace faultline::cli
