// CUDA RoPE: RopeTable::Apply with the cos/sin table RopeTable::CosSin computed on the host.
// One thread per rotated pair (grid-stride); a pair is read and written by one thread, so the
// in-place update has no races. The products and the difference/sum are rounded separately
// (__fmul_rn/__fsub_rn/__fadd_rn never fuse into an FMA), as the baseline x86-64 CPU build
// computes them, so results match RopeTable::Apply bit for bit.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_format.h"
#include "kernels/cuda/device.h"
#include "kernels/rope.h"

namespace quantkv::kernels::cuda {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill an H200 many times over; larger problems loop.
constexpr int64_t kMaxBlocks = 1 << 16;

template <bool kNeox>
__global__ void __launch_bounds__(kThreads)
    RopeKernel(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim,
               const int32_t* positions, const float* cos_table, const float* sin_table,
               int64_t n_positions) {
  const int64_t half = head_dim / 2;
  const int64_t pairs_per_token = n_heads * half;
  const int64_t total = n_tokens * pairs_per_token;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t t = idx / pairs_per_token;
    const int64_t rem = idx - t * pairs_per_token;
    const int64_t h = rem / half;
    const int64_t i = rem - h * half;
    const int64_t p = positions[t];
    // Positions outside the table are rejected by the caller on the host; should one slip
    // through, its rows are left unrotated rather than read outside the table.
    if (p < 0 || p >= n_positions) continue;
    const float c = cos_table[p * half + i];
    const float s = sin_table[p * half + i];
    float* v = x + (t * n_heads + h) * head_dim;
    float* pa = kNeox ? v + i : v + 2 * i;
    float* pb = kNeox ? v + i + half : v + 2 * i + 1;
    const float a = *pa, b = *pb;
    *pa = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    *pb = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
  }
}

}  // namespace

absl::Status RopeApply(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim,
                       const int32_t* positions, const float* cos, const float* sin,
                       int64_t n_positions, bool neox, void* stream) {
  if (n_tokens < 0 || n_heads < 0 || head_dim < 0 || n_positions < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cuda RopeApply: negative shape tokens %d, heads %d, head_dim %d, positions %d", n_tokens,
        n_heads, head_dim, n_positions));
  }
  const int64_t half = head_dim / 2;
  const int64_t total = n_tokens * n_heads * half;
  if (total == 0) return absl::OkStatus();
  if (x == nullptr || positions == nullptr ||
      (n_positions > 0 && (cos == nullptr || sin == nullptr))) {
    return absl::InvalidArgumentError("cuda RopeApply: null pointer");
  }
  const unsigned blocks =
      static_cast<unsigned>(std::min((total + kThreads - 1) / kThreads, kMaxBlocks));
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (neox) {
    RopeKernel<true><<<blocks, kThreads, 0, s>>>(x, n_tokens, n_heads, head_dim, positions, cos,
                                                 sin, n_positions);
  } else {
    RopeKernel<false><<<blocks, kThreads, 0, s>>>(x, n_tokens, n_heads, head_dim, positions, cos,
                                                  sin, n_positions);
  }
  return CudaCheck(cudaGetLastError(), "cuda RopeApply launch");
}

}  // namespace quantkv::kernels::cuda
