// Quantize-on-append on the device. KvWriteRows: one thread block per row (grid-stride),
// its threads over the row's n_kv_heads * head_dim elements, stored into the sequence's
// ring (and sinks) as KvCache::Write does. KvEncodeBlocks: one thread block per (job, head)
// slab, running the passes of kv_slab_format.h's slab::EncodeItem across its threads with a
// barrier after each pass; the rows are read from the ring (L1/L2 cached) where they are
// needed, so no geometry is limited by shared memory (per-block statistics take 2 * head_dim
// floats of it).
//
// Ring and sink rows must be aligned to their storage element (as cudaMalloc'd buffers and
// the row layout give); slabs may lie at any byte address. Positions and first tokens are
// device data and not checked: a write row with a negative position stores nothing, a job's
// first_token must be >= 0, and one batch must not hold two rows for the same ring slot.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_format.h"
#include "kernels/cuda/device.h"
#include "kernels/kv_encode.h"
#include "kernels/kv_slab_format.h"

namespace quantkv::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;  // beyond: grid-stride loops

unsigned Blocks(int64_t n) { return static_cast<unsigned>(std::min(n, kMaxBlocks)); }

// ---------------------------------------------------------------- rows
template <bool kF32>
__global__ void __launch_bounds__(kThreads)
    WriteRowsKernel(const float* __restrict__ x, const int32_t* __restrict__ positions,
                    const int32_t* __restrict__ row_seq, const KvProtectedRows* __restrict__ seqs,
                    int64_t rows, int64_t row_elems, int64_t ring_tokens, int64_t sink_tokens) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t pos = positions[r];
    if (pos < 0) continue;  // no position: nothing to store (uniform over the block)
    const KvProtectedRows p = seqs[row_seq[r]];
    const int64_t slot = (pos % ring_tokens) * row_elems;
    const bool sink = pos < sink_tokens && p.sinks != nullptr;
    const float* src = x + r * row_elems;
    for (int64_t e = threadIdx.x; e < row_elems; e += blockDim.x) {
      const float v = src[e];
      if constexpr (kF32) {
        // Bits, not arithmetic: the CPU cache memcpy's the row (NaN payloads included).
        const uint32_t b = __float_as_uint(v);
        reinterpret_cast<uint32_t*>(p.ring)[slot + e] = b;
        if (sink) reinterpret_cast<uint32_t*>(p.sinks)[pos * row_elems + e] = b;
      } else {
        const uint16_t h = slab::HalfFromFloat(v);
        reinterpret_cast<uint16_t*>(p.ring)[slot + e] = h;
        if (sink) reinterpret_cast<uint16_t*>(p.sinks)[pos * row_elems + e] = h;
      }
    }
  }
}

// ---------------------------------------------------------------- blocks
// Token t (of the block), channel c of one head, decoded from the ring as the CPU cache's
// EncodeBlock does (Fp16ToFp32Row is exact; fp32 rows are bits).
template <bool kF32>
struct RingRows {
  const uint8_t* ring;
  int64_t first_token, ring_tokens, row_elems, head_offset;
  QKV_HD float operator()(int t, int c) const {
    const int64_t i = ((first_token + t) % ring_tokens) * row_elems + head_offset + c;
    if constexpr (kF32) {
      return reinterpret_cast<const float*>(ring)[i];
    } else {
      return slab::HalfToFloat(reinterpret_cast<const uint16_t*>(ring)[i]);
    }
  }
};

template <bool kF32>
__global__ void __launch_bounds__(kThreads)
    EncodeBlocksKernel(const KvSlabFormat f, int64_t n_kv_heads, int64_t ring_tokens,
                       const KvEncodeJob* __restrict__ jobs, int64_t n_jobs) {
  extern __shared__ float scratch[];  // 2 * head_dim floats when per block, else none
  const int64_t row_elems = n_kv_heads * f.head_dim;
  for (int64_t b = blockIdx.x; b < n_jobs * n_kv_heads; b += gridDim.x) {
    const KvEncodeJob job = jobs[b / n_kv_heads];
    const int64_t h = b % n_kv_heads;
    const RingRows<kF32> rows{job.ring, job.first_token, ring_tokens, row_elems, h * f.head_dim};
    uint8_t* slab = job.dst + h * f.slab_bytes;
    for (int pass = 0; pass < slab::kEncodePasses; ++pass) {
      const int64_t n = slab::EncodeItems(f, pass);
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        slab::EncodeItem(f, rows, slab, scratch, pass, i);
      }
      // Pass 2 reads the metadata other threads stored in passes 0 and 1 (global memory,
      // visible within the block after the barrier); the next slab reuses `scratch`.
      __syncthreads();
    }
  }
}

}  // namespace

absl::Status KvWriteRows(const KvWriteBatch& batch, void* stream) {
  if (batch.rows < 0 || batch.n_kv_heads <= 0 || batch.head_dim <= 0 || batch.ring_tokens <= 0 ||
      batch.sink_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cuda KvWriteRows: rows %d, kv heads %d, head_dim %d, ring %d and sink %d tokens",
        batch.rows, batch.n_kv_heads, batch.head_dim, batch.ring_tokens, batch.sink_tokens));
  }
  if (batch.rows == 0) return absl::OkStatus();
  if (batch.x == nullptr || batch.positions == nullptr || batch.row_seq == nullptr ||
      batch.seqs == nullptr) {
    return absl::InvalidArgumentError("cuda KvWriteRows: null rows, positions or sequences");
  }
  const int64_t row_elems = batch.n_kv_heads * batch.head_dim;
  const auto s = static_cast<cudaStream_t>(stream);
  if (batch.storage == KvStorage::kF32) {
    WriteRowsKernel<true><<<Blocks(batch.rows), kThreads, 0, s>>>(
        batch.x, batch.positions, batch.row_seq, batch.seqs, batch.rows, row_elems,
        batch.ring_tokens, batch.sink_tokens);
  } else {
    WriteRowsKernel<false><<<Blocks(batch.rows), kThreads, 0, s>>>(
        batch.x, batch.positions, batch.row_seq, batch.seqs, batch.rows, row_elems,
        batch.ring_tokens, batch.sink_tokens);
  }
  return CudaCheck(cudaGetLastError(), "cuda KvWriteRows launch");
}

absl::Status KvEncodeBlocks(const KvSlabFormat& format, int64_t n_kv_heads, int64_t ring_tokens,
                            KvStorage storage, const KvEncodeJob* jobs, int64_t n_jobs,
                            void* stream) {
  const KvSlabFormat& f = format;
  if (n_kv_heads <= 0 || n_jobs < 0 || f.head_dim <= 0 || f.block_tokens <= 0 ||
      ring_tokens < f.block_tokens || f.slab_bytes <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cuda KvEncodeBlocks: kv heads %d, jobs %d, head_dim %d, block %d tokens, ring %d "
        "tokens, slab %d bytes",
        n_kv_heads, n_jobs, f.head_dim, f.block_tokens, ring_tokens, f.slab_bytes));
  }
  if (f.kind == KvSlabKind::kUniform && f.bits != 8 && f.bits != 4 && f.bits != 3 && f.bits != 2) {
    return absl::InvalidArgumentError(
        absl::StrFormat("cuda KvEncodeBlocks: uniform slab of %d bits", f.bits));
  }
  if (n_jobs == 0) return absl::OkStatus();
  if (jobs == nullptr) return absl::InvalidArgumentError("cuda KvEncodeBlocks: null jobs");
  const size_t shared =
      f.kind == KvSlabKind::kUniform && f.meta == KvSlabMeta::kBlock
          ? 2 * static_cast<size_t>(f.head_dim) * sizeof(float)
          : 0;  // head_dim <= 4096 (KvSlabFormatOf): at most 32 KiB, under the default limit
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = Blocks(n_jobs * n_kv_heads);
  if (storage == KvStorage::kF32) {
    EncodeBlocksKernel<true>
        <<<blocks, kThreads, shared, s>>>(f, n_kv_heads, ring_tokens, jobs, n_jobs);
  } else {
    EncodeBlocksKernel<false>
        <<<blocks, kThreads, shared, s>>>(f, n_kv_heads, ring_tokens, jobs, n_jobs);
  }
  return CudaCheck(cudaGetLastError(), "cuda KvEncodeBlocks launch");
}

}  // namespace quantkv::kernels::cuda
