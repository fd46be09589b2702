// CUDA embedding gather: one thread block per output row (grid-stride over rows), its threads
// striding over the row. Rows whose id lies outside [0, vocab) are written as zeros, so a bad
// id never reads outside the table. With 16-byte aligned pointers and a row length that keeps
// every row aligned, each thread moves 16 bytes of the table per load.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_format.h"
#include "kernels/cuda/device.h"
#include "kernels/embedding.h"

namespace quantkv::kernels::cuda {
namespace {

constexpr int kMaxThreads = 256;
// Rows beyond this are covered by a grid-stride loop.
constexpr int64_t kMaxBlocks = 1 << 16;

__device__ __forceinline__ float Bf16ToFloat(uint32_t bits16) {
  return __uint_as_float(bits16 << 16);
}

// Scalar path: any dim, any alignment.
template <EmbeddingTable kType>
__global__ void GatherScalarKernel(const void* table, int64_t vocab, int64_t dim,
                                   const int32_t* tokens, int64_t n, float* out) {
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const int64_t id = tokens[r];
    float* dst = out + r * dim;
    if (id < 0 || id >= vocab) {
      for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = 0.0f;
      continue;
    }
    if constexpr (kType == EmbeddingTable::kF32) {
      const float* src = static_cast<const float*>(table) + id * dim;
      for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = src[i];
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(table) + id * dim;
      for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = Bf16ToFloat(src[i]);
    }
  }
}

// Vector path: f32 needs dim % 4 == 0 (one float4 per load), bf16 dim % 8 == 0 (eight values
// per 16-byte load, stored as two float4); table and out 16-byte aligned.
template <EmbeddingTable kType>
__global__ void GatherVectorKernel(const void* table, int64_t vocab, int64_t dim,
                                   const int32_t* tokens, int64_t n, float* out) {
  constexpr int64_t kPerLoad = kType == EmbeddingTable::kF32 ? 4 : 8;
  const int64_t loads = dim / kPerLoad;
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const int64_t id = tokens[r];
    float4* dst = reinterpret_cast<float4*>(out + r * dim);
    if (id < 0 || id >= vocab) {
      const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int64_t j = threadIdx.x; j < loads; j += blockDim.x) {
        if constexpr (kType == EmbeddingTable::kF32) {
          dst[j] = zero;
        } else {
          dst[2 * j] = zero;
          dst[2 * j + 1] = zero;
        }
      }
      continue;
    }
    if constexpr (kType == EmbeddingTable::kF32) {
      const float4* src =
          reinterpret_cast<const float4*>(static_cast<const float*>(table) + id * dim);
      for (int64_t j = threadIdx.x; j < loads; j += blockDim.x) dst[j] = src[j];
    } else {
      const uint4* src =
          reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(table) + id * dim);
      for (int64_t j = threadIdx.x; j < loads; j += blockDim.x) {
        const uint4 w = src[j];
        // Little-endian: the lower half of each 32-bit word is the earlier element.
        dst[2 * j] = make_float4(Bf16ToFloat(w.x & 0xffffu), Bf16ToFloat(w.x >> 16),
                                 Bf16ToFloat(w.y & 0xffffu), Bf16ToFloat(w.y >> 16));
        dst[2 * j + 1] = make_float4(Bf16ToFloat(w.z & 0xffffu), Bf16ToFloat(w.z >> 16),
                                     Bf16ToFloat(w.w & 0xffffu), Bf16ToFloat(w.w >> 16));
      }
    }
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Enough warps to cover a row's work items once, at most kMaxThreads.
int Threads(int64_t items) {
  const int64_t warps = std::max<int64_t>(1, (items + 31) / 32);
  return static_cast<int>(std::min<int64_t>(warps * 32, kMaxThreads));
}

template <EmbeddingTable kType>
void Launch(const void* table, int64_t vocab, int64_t dim, const int32_t* tokens, int64_t n,
            float* out, cudaStream_t stream) {
  constexpr int64_t kPerLoad = kType == EmbeddingTable::kF32 ? 4 : 8;
  const unsigned blocks = static_cast<unsigned>(std::min(n, kMaxBlocks));
  if (dim % kPerLoad == 0 && Aligned16(table) && Aligned16(out)) {
    GatherVectorKernel<kType>
        <<<blocks, Threads(dim / kPerLoad), 0, stream>>>(table, vocab, dim, tokens, n, out);
  } else {
    GatherScalarKernel<kType>
        <<<blocks, Threads(dim), 0, stream>>>(table, vocab, dim, tokens, n, out);
  }
}

}  // namespace

absl::Status EmbeddingGather(const void* table, EmbeddingTable type, int64_t vocab, int64_t dim,
                             const int32_t* tokens, int64_t n, float* out, void* stream) {
  if (vocab < 0 || dim < 0 || n < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cuda EmbeddingGather: negative shape vocab %d, dim %d, rows %d", vocab, dim, n));
  }
  if (type != EmbeddingTable::kF32 && type != EmbeddingTable::kBF16) {
    return absl::InvalidArgumentError("cuda EmbeddingGather: unknown table type");
  }
  if (n == 0 || dim == 0) return absl::OkStatus();
  if (tokens == nullptr || out == nullptr || (vocab > 0 && table == nullptr)) {
    return absl::InvalidArgumentError("cuda EmbeddingGather: null pointer");
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (type == EmbeddingTable::kF32) {
    Launch<EmbeddingTable::kF32>(table, vocab, dim, tokens, n, out, s);
  } else {
    Launch<EmbeddingTable::kBF16>(table, vocab, dim, tokens, n, out, s);
  }
  return CudaCheck(cudaGetLastError(), "cuda EmbeddingGather launch");
}

}  // namespace quantkv::kernels::cuda
