#include "kernels/rmsnorm.h"

#include <cmath>

namespace quantkv::kernels {
namespace {
inline void NormRow(const float* x, const float* weight, float* y, int64_t n, float eps) {
  // Accumulate in double: the mean of squares of 576-2048 values is where fp32 error shows.
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * weight[i];
}
}  // namespace

void RmsNorm(const float* x, const float* weight, float* y, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) NormRow(x + r * n, weight, y + r * n, n, eps);
}

void AddRmsNorm(float* residual, const float* delta, const float* weight, float* y,
                int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    float* res = residual + r * n;
    const float* d = delta + r * n;
    for (int64_t i = 0; i < n; ++i) res[i] += d[i];
    NormRow(res, weight, y + r * n, n, eps);
  }
}

}  // namespace quantkv::kernels
