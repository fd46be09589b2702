// Memory bandwidth measured in the same run as a benchmark, the bound its speed is judged by.
#pragma once

#include <cstdint>

namespace quantkv::bench {

struct Bandwidth {
  double read_gbps = 0;  // streaming reads (sum of a buffer), GB/s
  double copy_gbps = 0;  // memcpy, bytes read + written per second, GB/s
};

// Buffers of `bytes` (well beyond the last-level cache), best of `reps`, on `threads` threads.
Bandwidth MeasureBandwidth(int threads, int64_t bytes = int64_t{512} << 20, int reps = 5);

}  // namespace quantkv::bench
