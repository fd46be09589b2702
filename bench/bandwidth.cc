#include "bench/bandwidth.h"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "kernels/thread_pool.h"

namespace quantkv::bench {
namespace {

__attribute__((target("avx2"))) double SumAvx2(const float* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
  }
  alignas(32) float out[8];
  _mm256_store_ps(out, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  double s = 0;
  for (float f : out) s += f;
  return s;
}

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

}  // namespace

Bandwidth MeasureBandwidth(int threads, int64_t bytes, int reps) {
  const int64_t n = bytes / sizeof(float);
  float* src = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
  float* dst = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
  std::fill(src, src + n, 1.0f);
  std::fill(dst, dst + n, 0.0f);
  kernels::ThreadPool pool(threads);
  Bandwidth bw;
  volatile double sink = 0;
  for (int r = 0; r < reps; ++r) {
    std::vector<double> sums(threads);
    auto t0 = std::chrono::steady_clock::now();
    pool.ParallelFor(n / 1024, [&](int64_t b, int64_t e, int t) {
      sums[t] += SumAvx2(src + b * 1024, (e - b) * 1024);
    });
    auto t1 = std::chrono::steady_clock::now();
    for (double s : sums) sink = sink + s;
    bw.read_gbps = std::max(bw.read_gbps, bytes / Seconds(t0, t1) / 1e9);
    t0 = std::chrono::steady_clock::now();
    pool.ParallelFor(n / 1024, [&](int64_t b, int64_t e, int) {
      std::memcpy(dst + b * 1024, src + b * 1024, (e - b) * 1024 * sizeof(float));
    });
    t1 = std::chrono::steady_clock::now();
    bw.copy_gbps = std::max(bw.copy_gbps, 2.0 * bytes / Seconds(t0, t1) / 1e9);
  }
  std::free(src);
  std::free(dst);
  return bw;
}

}  // namespace quantkv::bench
