// The engines' figures are durations on the steady clock.
#pragma once

#include <chrono>

namespace faultline::migration {

inline std::chrono::microseconds Since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() -
                                                               t);
}

}  // namespace faultline::migration
