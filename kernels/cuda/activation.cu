// CUDA element-wise activations: SwiGLU and the per-row bias add. Flat grid-stride loops; with
// 16-byte aligned pointers each thread moves a float4 (the unaligned tail element-wise). Every
// element is read and written by the same thread, so in-place use (out == gate) is safe.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_format.h"
#include "kernels/activation.h"
#include "kernels/cuda/device.h"

namespace quantkv::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;

unsigned Blocks(int64_t items) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min((items + kThreads - 1) / kThreads, kMaxBlocks)));
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The CPU's g / (1 + exp(-g)) * u. expf (not __expf) keeps the result within a few ulp of the
// CPU; for g < -88 exp overflows to inf and the result is a signed zero, as on the CPU.
__device__ __forceinline__ float SwiGluOne(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// No __restrict__: out may alias gate.
__global__ void __launch_bounds__(kThreads)
    SwiGluKernel(const float* gate, const float* up, float* out, int64_t n, bool vec4) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  int64_t scalar_from = 0;
  if (vec4) {
    const int64_t n4 = n / 4;
    const float4* g4 = reinterpret_cast<const float4*>(gate);
    const float4* u4 = reinterpret_cast<const float4*>(up);
    float4* o4 = reinterpret_cast<float4*>(out);
    for (int64_t j = first; j < n4; j += stride) {
      const float4 g = g4[j], u = u4[j];
      o4[j] = make_float4(SwiGluOne(g.x, u.x), SwiGluOne(g.y, u.y), SwiGluOne(g.z, u.z),
                          SwiGluOne(g.w, u.w));
    }
    scalar_from = n4 * 4;
  }
  for (int64_t i = scalar_from + first; i < n; i += stride) out[i] = SwiGluOne(gate[i], up[i]);
}

__global__ void __launch_bounds__(kThreads)
    AddRowBiasKernel(float* x, const float* bias, int64_t rows, int64_t n, bool vec4) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (vec4) {
    // n % 4 == 0: every float4 lies inside one row.
    const int64_t n4 = n / 4;
    const int64_t total4 = rows * n4;
    float4* x4 = reinterpret_cast<float4*>(x);
    const float4* b4 = reinterpret_cast<const float4*>(bias);
    for (int64_t j = first; j < total4; j += stride) {
      float4 v = x4[j];
      const float4 b = b4[j % n4];
      v.x += b.x;
      v.y += b.y;
      v.z += b.z;
      v.w += b.w;
      x4[j] = v;
    }
    return;
  }
  const int64_t total = rows * n;
  for (int64_t i = first; i < total; i += stride) x[i] += bias[i % n];
}

}  // namespace

absl::Status SwiGlu(const float* gate, const float* up, float* out, int64_t n, void* stream) {
  if (n < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("cuda SwiGlu: negative size %d", n));
  }
  if (n == 0) return absl::OkStatus();
  if (gate == nullptr || up == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("cuda SwiGlu: null pointer");
  }
  const bool vec4 = Aligned16(gate) && Aligned16(up) && Aligned16(out);
  SwiGluKernel<<<Blocks(vec4 ? (n + 3) / 4 : n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      gate, up, out, n, vec4);
  return CudaCheck(cudaGetLastError(), "cuda SwiGlu launch");
}

absl::Status AddRowBias(float* x, const float* bias, int64_t rows, int64_t n, void* stream) {
  if (rows < 0 || n < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("cuda AddRowBias: negative shape %d x %d", rows, n));
  }
  if (rows == 0 || n == 0) return absl::OkStatus();
  if (x == nullptr || bias == nullptr) {
    return absl::InvalidArgumentError("cuda AddRowBias: null pointer");
  }
  const bool vec4 = n % 4 == 0 && Aligned16(x) && Aligned16(bias);
  AddRowBiasKernel<<<Blocks(vec4 ? rows * (n / 4) : rows * n), kThreads, 0,
                     static_cast<cudaStream_t>(stream)>>>(x, bias, rows, n, vec4);
  return CudaCheck(cudaGetLastError(), "cuda AddRowBias launch");
}

}  // namespace quantkv::kernels::cuda
