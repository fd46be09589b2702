// CUDA RMSNorm: one thread block per row. Each thread accumulates the squares of a strided
// slice of the row, the block reduces them, and the same threads then scale the elements they
// read; because every element is read and written by the same thread, x and y may alias.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_format.h"
#include "kernels/cuda/device.h"
#include "kernels/rmsnorm.h"

namespace quantkv::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Rows beyond this are covered by a grid-stride loop.
constexpr int64_t kMaxBlocks = 1 << 16;

// Sum of `v` over the thread block, returned to every thread.
__device__ float BlockSum(float v, float* shared /* kWarps + 1 floats */) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) shared[kWarps] = v;
  }
  __syncthreads();
  const float total = shared[kWarps];
  // The next row's BlockSum reuses `shared`; nobody may overwrite it before all have read it.
  __syncthreads();
  return total;
}

// kAdd: residual += delta first (x is the residual, updated in place). No __restrict__: the
// callers allow x and y to alias.
template <bool kAdd>
__global__ void __launch_bounds__(kThreads)
    RmsNormKernel(float* x, const float* delta, const float* weight, float* y, int64_t rows,
                  int64_t n, float eps) {
  __shared__ float shared[kWarps + 1];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    float* xr = x + row * n;
    float* yr = y + row * n;
    float sum_sq = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      float v = xr[i];
      if constexpr (kAdd) {
        v += delta[row * n + i];
        xr[i] = v;
      }
      sum_sq += v * v;
    }
    const float total = BlockSum(sum_sq, shared);
    const float scale = 1.0f / sqrtf(total / static_cast<float>(n) + eps);
    for (int64_t i = threadIdx.x; i < n; i += kThreads) yr[i] = xr[i] * scale * weight[i];
  }
}

absl::Status CheckShape(const char* op, int64_t rows, int64_t n) {
  if (rows < 0 || n < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("cuda %s: negative shape %d x %d", op, rows, n));
  }
  return absl::OkStatus();
}

unsigned Blocks(int64_t rows) { return static_cast<unsigned>(std::min(rows, kMaxBlocks)); }

}  // namespace

absl::Status RmsNorm(const float* x, const float* weight, float* y, int64_t rows, int64_t n,
                     float eps, void* stream) {
  if (absl::Status s = CheckShape("RmsNorm", rows, n); !s.ok()) return s;
  if (rows == 0 || n == 0) return absl::OkStatus();
  // The kernel only writes through x when adding a residual, so dropping const is safe here.
  RmsNormKernel<false><<<Blocks(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      const_cast<float*>(x), nullptr, weight, y, rows, n, eps);
  return CudaCheck(cudaGetLastError(), "cuda RmsNorm launch");
}

absl::Status AddRmsNorm(float* residual, const float* delta, const float* weight, float* y,
                        int64_t rows, int64_t n, float eps, void* stream) {
  if (absl::Status s = CheckShape("AddRmsNorm", rows, n); !s.ok()) return s;
  if (rows == 0 || n == 0) return absl::OkStatus();
  RmsNormKernel<true><<<Blocks(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      residual, delta, weight, y, rows, n, eps);
  return CudaCheck(cudaGetLastError(), "cuda AddRmsNorm launch");
}

}  // namespace quantkv::kernels::cuda
