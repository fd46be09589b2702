// RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, row by row.
#pragma once

#include <cstdint>

#include "absl/status/status.h"

namespace quantkv::kernels {

// CPU (reference). x and y may alias.
void RmsNorm(const float* x, const float* weight, float* y, int64_t rows, int64_t n, float eps);

// Fused residual add: residual += delta, then y = RmsNorm(residual). Used between blocks.
void AddRmsNorm(float* residual, const float* delta, const float* weight, float* y,
                int64_t rows, int64_t n, float eps);

namespace cuda {
// Device pointers; `stream` is a cudaStream_t (nullptr: default stream).
absl::Status RmsNorm(const float* x, const float* weight, float* y, int64_t rows, int64_t n,
                     float eps, void* stream);
absl::Status AddRmsNorm(float* residual, const float* delta, const float* weight, float* y,
                        int64_t rows, int64_t n, float eps, void* stream);
}  // namespace cuda

}  // namespace quantkv::kernels
