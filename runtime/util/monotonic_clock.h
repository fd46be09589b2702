// Nanoseconds on the monotonic clock, for intervals (latencies, timeouts, step times) that
// must not jump when the wall clock is set.
#pragma once

#include <chrono>
#include <cstdint>

namespace quantkv {

inline int64_t MonotonicNowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace quantkv
