// Attention over the quantized paged KV cache on the device (flash-decoding).
//
// Work split: one thread block per (row, KV head, head subgroup, context chunk). A block
// serves all query heads of its GQA group (up to kMaxGroup of them; larger groups are
// split into subgroups that each re-read the K/V), so every K/V element of a chunk is read
// once per group, not once per query head. The chunk is walked in tiles of kTile tokens:
//   1. scores: thread (token lane j, run lane r) decodes channels [8r, 8r + 8) of K for
//      tokens j, j + TL, ... of the tile straight from the codes into registers, takes
//      their partial dot products with the (shared-memory) queries, and the RL lanes of a
//      token sum them with warp shuffles;
//   2. online softmax per query head over the tile (one warp per head): running max m,
//      sum l and the correction of the accumulators;
//   3. values: the same threads decode V's channels of their tokens into registers and
//      accumulate p * v in fp32 registers ([group][8] per thread).
// At the chunk's end the per-thread accumulators are summed over token lanes (shuffles in
// a warp, then warp by warp in shared memory). A single chunk per row writes the
// normalized output directly; several write (m, l, unnormalized acc) to the workspace and
// a merge kernel combines them by exact log-sum-exp:
//   O = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c,  M = max_c m_c.
//
// Decoding: a run of 8 channels of one token is one load of its codes where the address
// allows (16 bytes for fp16 / bf16 / fp32 halves, 8 for int8 / fp8, 4 for int4, 2 for
// int2; int3 and misaligned runs by bytes), with the run's affine read once (one fp16 scale
// and minimum per token group, one 16-byte load of 8 scales per channel group). Runs that
// straddle token groups (group_size not a multiple of 8) or the end of head_dim fall back
// to slab::DecodeElement. Every element gets exactly slab::DecodeElement's value.
//
// Workspace (only when a row's context is split in more than one chunk), fp32:
//   acc [rows][n_heads][n_chunks][head_dim]   unnormalized sum of p * v of the chunk
//   m   [rows][n_heads][n_chunks]             max scaled score of the chunk (-inf: empty)
//   l   [rows][n_heads][n_chunks]             sum of e^(score - m) of the chunk
// The chunk count depends only on (rows, max_context) (PlanChunks below), so the caller can
// size the workspace before the positions are known on the device.
//
// Device data not checked: positions (a row with position p reads tokens 0..min(p,
// n_tokens - 1); p < 0 gives zeros), row_seq indices, block tables (ids must be >= 0:
// requantized floor blocks are CPU-only), and the ring holding every token a row reads from
// it. A context longer than max_context is still attended in full (its last chunk runs
// long).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_format.h"
#include "kernels/attention.h"
#include "kernels/cuda/device.h"
#include "kernels/kv_slab_format.h"

namespace quantkv::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kRun = 8;                  // channels one thread decodes at a time
constexpr int kTile = 128;               // tokens per softmax step
constexpr int kMaxGroup = 8;             // query heads per thread block
constexpr int kMaxHeadDim = 256;         // kRun * 32 lanes
constexpr int64_t kMaxRowChunks = 1024;  // rows x chunks: bounds the workspace for prefill
constexpr int kMergeThreads = 128;

struct ChunkPlan {
  int64_t n_chunks = 1;
  int64_t chunk_tokens = kTile;
};

// Chunks of whole tiles: as many as there are tiles (decode of one long row fills the GPU),
// but at most kMaxRowChunks / rows, so a large prefill batch needs no workspace at all.
ChunkPlan PlanChunks(int64_t rows, int64_t max_context) {
  const int64_t tiles = (std::max<int64_t>(1, max_context) + kTile - 1) / kTile;
  const int64_t cap = std::max<int64_t>(1, kMaxRowChunks / std::max<int64_t>(1, rows));
  const int64_t want = std::min(tiles, cap);
  const int64_t chunk_tiles = (tiles + want - 1) / want;
  ChunkPlan p;
  p.n_chunks = (tiles + chunk_tiles - 1) / chunk_tiles;  // no chunk empty at max_context
  p.chunk_tokens = chunk_tiles * kTile;
  return p;
}

int RunLanes(int64_t head_dim) {
  const int runs = static_cast<int>((head_dim + kRun - 1) / kRun);
  int rl = 1;
  while (rl < runs) rl *= 2;
  return rl;
}

struct Params {
  KvSlabFormat kf, vf;
  const uint8_t* k_base;
  const uint8_t* v_base;
  int64_t block_stride;
  int64_t ring_tokens, sink_tokens, window_tokens;
  int n_kv_heads, head_dim, dp, block_tokens;  // dp: head_dim rounded up to kRun
  bool f32_storage;
  const float* q;
  const int32_t* positions;
  const int32_t* row_seq;
  const DeviceSeqKv* seqs;
  int n_heads, group, n_sub;
  float scale;
  int64_t n_chunks, chunk_tokens;
  int run_lanes, token_lanes;
  float* out;
  float* ws_acc;
  float* ws_m;
  float* ws_l;
};

__device__ __forceinline__ bool Aligned(const void* p, uintptr_t a) {
  return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0;
}

// IEEE half -> float by the conversion instruction: slab::HalfToFloat's value for every
// half (NaN payloads aside).
__device__ __forceinline__ float H2F(uint16_t h) { return __half2float(__ushort_as_half(h)); }

__device__ __forceinline__ void Halves8(const uint4 w, float v[kRun]) {
  const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = H2F(static_cast<uint16_t>(u[i] & 0xffffu));
    v[2 * i + 1] = H2F(static_cast<uint16_t>(u[i] >> 16));
  }
}

// Channels [c0, c0 + nc) of a protected row at p (already offset to c0); the rest zero.
__device__ __forceinline__ void LoadProtected(const uint8_t* p, bool f32, int nc, float v[kRun]) {
  if (f32) {
    const float* f = reinterpret_cast<const float*>(p);
    if (nc == kRun && Aligned(p, 16)) {
      const float4 a = reinterpret_cast<const float4*>(f)[0];
      const float4 b = reinterpret_cast<const float4*>(f)[1];
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
      v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
      return;
    }
#pragma unroll
    for (int i = 0; i < kRun; ++i) v[i] = i < nc ? f[i] : 0.0f;
    return;
  }
  const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
  if (nc == kRun && Aligned(p, 16)) {
    Halves8(*reinterpret_cast<const uint4*>(p), v);
    return;
  }
#pragma unroll
  for (int i = 0; i < kRun; ++i) v[i] = i < nc ? H2F(h[i]) : 0.0f;
}

// The cold path (runs across token groups, the end of head_dim, misaligned codes): out of
// line and one element per call, so that its code does not cost the fast paths registers.
__device__ __noinline__ float DecodeOne(const KvSlabFormat f, const uint8_t* slab, int t, int c) {
  return slab::DecodeElement(f, slab, t, c);
}

__device__ __forceinline__ void DecodeGeneric(const KvSlabFormat& f, const uint8_t* slab, int t,
                                              int c0, int nc, float v[kRun]) {
#pragma unroll
  for (int i = 0; i < kRun; ++i) v[i] = i < nc ? DecodeOne(f, slab, t, c0 + i) : 0.0f;
}

// Channels [c0, c0 + nc) of token t (within the block) of a slab, as slab::DecodeElement.
__device__ __forceinline__ void DecodeRun(const KvSlabFormat& f, const uint8_t* slab, int t, int c0,
                                          int nc, float v[kRun]) {
  if (nc != kRun) {
    DecodeGeneric(f, slab, t, c0, nc, v);
    return;
  }
  switch (f.kind) {
    case KvSlabKind::kF32: {
      const uint8_t* p = slab + 4 * (t * f.head_dim + c0);
      if (!Aligned(p, 16)) break;
      const float4 a = reinterpret_cast<const float4*>(p)[0];
      const float4 b = reinterpret_cast<const float4*>(p)[1];
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
      v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
      return;
    }
    case KvSlabKind::kF16: {
      const uint8_t* p = slab + 2 * (t * f.head_dim + c0);
      if (!Aligned(p, 16)) break;
      Halves8(*reinterpret_cast<const uint4*>(p), v);
      return;
    }
    case KvSlabKind::kBF16: {
      const uint8_t* p = slab + 2 * (t * f.head_dim + c0);
      if (!Aligned(p, 16)) break;
      const uint4 w = *reinterpret_cast<const uint4*>(p);
      const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[2 * i] = slab::F32FromBits(u[i] << 16);
        v[2 * i + 1] = slab::F32FromBits(u[i] & 0xffff0000u);
      }
      return;
    }
    case KvSlabKind::kFp8E4M3: {
      if (f.group_size % kRun != 0) break;
      const uint8_t* p = slab + t * f.row_bytes + c0;
      if (!Aligned(p, 8)) break;
      const uint2 w = *reinterpret_cast<const uint2*>(p);
      const float s =
          H2F(slab::LoadU16(slab + f.codes_bytes + 2 * (t * f.n_groups + c0 / f.group_size)));
#pragma unroll
      for (int i = 0; i < kRun; ++i) {
        const uint32_t word = i < 4 ? w.x : w.y;
        v[i] = slab::E4M3ToFloat(static_cast<uint8_t>(word >> (8 * (i & 3)))) * s;
      }
      return;
    }
    case KvSlabKind::kUniform:
    default: {
      if (f.meta == KvSlabMeta::kTokenGroup && f.group_size % kRun != 0) break;
      // The run's codes: kRun * bits bits = `bits` bytes, little endian.
      const int bits = f.bits;
      const uint8_t* p = slab + t * f.row_bytes + (c0 / kRun) * bits;
      uint64_t word = 0;
      if (bits == 8 && Aligned(p, 8)) {
        const uint2 w = *reinterpret_cast<const uint2*>(p);
        word = static_cast<uint64_t>(w.x) | static_cast<uint64_t>(w.y) << 32;
      } else if (bits == 4 && Aligned(p, 4)) {
        word = *reinterpret_cast<const uint32_t*>(p);
      } else if (bits == 2 && Aligned(p, 2)) {
        word = *reinterpret_cast<const uint16_t*>(p);
      } else {
        for (int k = 0; k < bits; ++k) word |= static_cast<uint64_t>(p[k]) << (8 * k);
      }
      const uint32_t mask = (1u << bits) - 1u;
      if (f.meta == KvSlabMeta::kChannel) {
        const uint8_t* sp = slab + f.codes_bytes + 2 * c0;
        float s[kRun], b[kRun];
        if (Aligned(sp, 16)) {
          Halves8(*reinterpret_cast<const uint4*>(sp), s);
        } else {
#pragma unroll
          for (int i = 0; i < kRun; ++i) s[i] = H2F(slab::LoadU16(sp + 2 * i));
        }
        if (f.symmetric) {
          const float z = -static_cast<float>(1 << (bits - 1));
#pragma unroll
          for (int i = 0; i < kRun; ++i) b[i] = z * s[i];
        } else {
          const uint8_t* mp = sp + 2 * f.n_meta;
          if (Aligned(mp, 16)) {
            Halves8(*reinterpret_cast<const uint4*>(mp), b);
          } else {
#pragma unroll
            for (int i = 0; i < kRun; ++i) b[i] = H2F(slab::LoadU16(mp + 2 * i));
          }
        }
#pragma unroll
        for (int i = 0; i < kRun; ++i) {
          const uint32_t code = static_cast<uint32_t>(word >> (bits * i)) & mask;
          v[i] = slab::Fma(static_cast<float>(code), s[i], b[i]);
        }
        return;
      }
      // Per token group (the run lies in one group) or per block: one affine.
      const slab::Affine a = slab::AffineOf(f, slab, t, c0);
#pragma unroll
      for (int i = 0; i < kRun; ++i) {
        const uint32_t code = static_cast<uint32_t>(word >> (bits * i)) & mask;
        v[i] = slab::Fma(static_cast<float>(code), a.scale, a.bias);
      }
      return;
    }
  }
  DecodeGeneric(f, slab, t, c0, nc, v);
}

// Where the row reads its tokens (kernels/attention.h: RingStart).
struct TokenSource {
  const uint8_t* base;  // encoded slabs of this K or V
  const uint8_t* ring;
  const uint8_t* sinks;
  const int32_t* table;
  int64_t sk, ring_start;
};

__device__ __forceinline__ void LoadToken(const Params& P, const KvSlabFormat& f,
                                          const TokenSource& src, int h, int64_t t, int c0, int nc,
                                          float v[kRun]) {
  if (t < src.sk || t >= src.ring_start) {
    const bool sink = t < P.sink_tokens;
    const int64_t row = sink ? t : t % P.ring_tokens;
    const int64_t elem = P.f32_storage ? 4 : 2;
    const uint8_t* p =
        (sink ? src.sinks : src.ring) + ((row * P.n_kv_heads + h) * P.head_dim + c0) * elem;
    LoadProtected(p, P.f32_storage, nc, v);
    return;
  }
  const int64_t b = t / P.block_tokens;
  const int64_t phys = src.table[b];
  const uint8_t* slab = src.base + phys * P.block_stride + static_cast<int64_t>(h) * f.slab_bytes;
  DecodeRun(f, slab, static_cast<int>(t - b * P.block_tokens), c0, nc, v);
}

// Shared memory: queries qs [kG][dp], reduced accumulators red [kG][dp], the tile's scores
// and probabilities sc [kG][kTile], and per head the running max, sum and correction.
size_t SharedBytes(int groups, int dp) {
  return sizeof(float) *
         (2 * static_cast<size_t>(groups) * dp + static_cast<size_t>(groups) * kTile + 3 * groups);
}

template <int kG>
__global__ void __launch_bounds__(kThreads, kG >= 8 ? 3 : 4) AttendChunkKernel(const Params P) {
  extern __shared__ float4 smem4[];
  float* qs = reinterpret_cast<float*>(smem4);
  float* red = qs + kG * P.dp;
  float* sc = red + kG * P.dp;
  float* st_m = sc + kG * kTile;
  float* st_l = st_m + kG;
  float* st_c = st_l + kG;

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t row = blockIdx.x / P.n_chunks;
  const int64_t chunk = blockIdx.x % P.n_chunks;
  const int h = blockIdx.y / P.n_sub;
  const int g0 = (blockIdx.y % P.n_sub) * kMaxGroup;
  const int gs = min(kG, P.group - g0);  // query heads of this block
  const int head0 = h * P.group + g0;
  const int D = P.head_dim, dp = P.dp;

  const int64_t p = P.positions[row];
  const DeviceSeqKv seq = P.seqs[P.row_seq[row]];
  const int64_t ctx = min(p + 1, seq.n_tokens);
  const int64_t t_begin = chunk * P.chunk_tokens;
  const int64_t t_end = chunk == P.n_chunks - 1 ? ctx : min(ctx, t_begin + P.chunk_tokens);
  // RingStart(p), and the sinks a row at p reads.
  const int64_t full = min(seq.n_blocks, (p + 1) / P.block_tokens);
  const int64_t sk = min(P.sink_tokens, p + 1);
  const int64_t ring_start =
      max(min(full * P.block_tokens, max(int64_t{0}, p + 1 - P.window_tokens)), sk);
  const TokenSource ksrc{P.k_base, seq.k_ring, seq.k_sinks, seq.block_table, sk, ring_start};
  const TokenSource vsrc{P.v_base, seq.v_ring, seq.v_sinks, seq.block_table, sk, ring_start};

  const float* qrow = P.q + (row * P.n_heads + head0) * D;
  for (int i = tid; i < kG * dp; i += kThreads) {
    const int g = i / dp, c = i % dp;
    qs[i] = g < gs && c < D ? qrow[g * D + c] : 0.0f;
    red[i] = 0.0f;
  }
  if (tid < kG) {
    st_m[tid] = -INFINITY;
    st_l[tid] = 0.0f;
    st_c[tid] = 1.0f;
  }
  __syncthreads();

  const int RL = P.run_lanes, TL = P.token_lanes;
  const int r = tid % RL, j = tid / RL;
  const int c0 = r * kRun;
  const int nc = max(0, min(kRun, D - c0));
  const int per_thread = kTile / TL;

  float acc[kG][kRun];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
#pragma unroll
    for (int i = 0; i < kRun; ++i) acc[g][i] = 0.0f;
  }

  for (int64_t s = t_begin; s < t_end; s += kTile) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kTile), t_end - s));
    // 1. Scores of the tile.
    for (int k = 0; k < per_thread; ++k) {
      const int tt = j + k * TL;
      const bool valid = tt < n;
      float dot[kG];
#pragma unroll
      for (int g = 0; g < kG; ++g) dot[g] = 0.0f;
      if (valid && nc > 0) {
        float kv[kRun];
        LoadToken(P, P.kf, ksrc, h, s + tt, c0, nc, kv);
#pragma unroll
        for (int g = 0; g < kG; ++g) {
          if (g < gs) {
            const float4 qa = *reinterpret_cast<const float4*>(qs + g * dp + c0);
            const float4 qb = *reinterpret_cast<const float4*>(qs + g * dp + c0 + 4);
            float d = dot[g];
            d = fmaf(qa.x, kv[0], d);
            d = fmaf(qa.y, kv[1], d);
            d = fmaf(qa.z, kv[2], d);
            d = fmaf(qa.w, kv[3], d);
            d = fmaf(qb.x, kv[4], d);
            d = fmaf(qb.y, kv[5], d);
            d = fmaf(qb.z, kv[6], d);
            d = fmaf(qb.w, kv[7], d);
            dot[g] = d;
          }
        }
      }
      // The RL lanes of a token are adjacent lanes of one warp (RL is a power of 2 <= 32).
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        if (g < gs) {
          for (int off = RL / 2; off > 0; off /= 2) {
            dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], off);
          }
        }
      }
      if (valid && r == 0) {
#pragma unroll
        for (int g = 0; g < kG; ++g) {
          if (g < gs) sc[g * kTile + tt] = dot[g] * P.scale;
        }
      }
    }
    __syncthreads();
    // 2. Online softmax, one warp per query head.
    for (int g = warp; g < gs; g += kWarps) {
      float* row_sc = sc + g * kTile;
      float mx = -INFINITY;
      for (int tt = lane; tt < n; tt += 32) mx = fmaxf(mx, row_sc[tt]);
#pragma unroll
      for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_old = st_m[g];
      const float m_new = fmaxf(m_old, mx);
      const float corr = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
      float sum = 0.0f;
      for (int tt = lane; tt < n; tt += 32) {
        const float pr = expf(row_sc[tt] - m_new);
        row_sc[tt] = pr;
        sum += pr;
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (lane == 0) {
        st_m[g] = m_new;
        st_l[g] = st_l[g] * corr + sum;
        st_c[g] = corr;
      }
    }
    __syncthreads();
    // 3. p * V.
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      if (g < gs) {
        const float corr = st_c[g];
        if (corr != 1.0f) {
#pragma unroll
          for (int i = 0; i < kRun; ++i) acc[g][i] *= corr;
        }
      }
    }
    if (nc > 0) {
      for (int k = 0; k < per_thread; ++k) {
        const int tt = j + k * TL;
        if (tt >= n) break;
        float vv[kRun];
        LoadToken(P, P.vf, vsrc, h, s + tt, c0, nc, vv);
#pragma unroll
        for (int g = 0; g < kG; ++g) {
          if (g < gs) {
            const float pr = sc[g * kTile + tt];
#pragma unroll
            for (int i = 0; i < kRun; ++i) acc[g][i] = fmaf(pr, vv[i], acc[g][i]);
          }
        }
      }
    }
    __syncthreads();  // sc and st_c are rewritten by the next tile
  }

  // Sum the accumulators over token lanes: lanes r, r + RL, ... of a warp by shuffles, then
  // the warps one after another (a fixed order: the result does not vary between runs).
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    if (g < gs) {
#pragma unroll
      for (int i = 0; i < kRun; ++i) {
        for (int off = RL; off < 32; off *= 2) {
          acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], off);
        }
      }
    }
  }
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w && lane < RL && nc > 0) {
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        if (g < gs) {
#pragma unroll
          for (int i = 0; i < kRun; ++i) red[g * dp + c0 + i] += acc[g][i];
        }
      }
    }
    __syncthreads();
  }

  if (P.n_chunks == 1) {
    float* o = P.out + (row * P.n_heads + head0) * D;
    for (int i = tid; i < gs * D; i += kThreads) {
      const int g = i / D, c = i % D;
      const float l = st_l[g];
      o[i] = l > 0.0f ? red[g * dp + c] / l : 0.0f;
    }
    return;
  }
  for (int i = tid; i < gs * D; i += kThreads) {
    const int g = i / D, c = i % D;
    const int64_t idx = (row * P.n_heads + head0 + g) * P.n_chunks + chunk;
    P.ws_acc[idx * D + c] = red[g * dp + c];
    if (c == 0) {
      P.ws_m[idx] = st_m[g];
      P.ws_l[idx] = st_l[g];
    }
  }
}

// One thread block per (row, query head): the chunks' partials merged exactly.
__global__ void __launch_bounds__(kMergeThreads)
    MergeChunksKernel(const float* __restrict__ ws_acc, const float* __restrict__ ws_m,
                      const float* __restrict__ ws_l, int64_t n_rows_heads, int n_chunks, int D,
                      float* __restrict__ out) {
  __shared__ float w[kMaxRowChunks];
  for (int64_t idx = blockIdx.x; idx < n_rows_heads; idx += gridDim.x) {
    const int64_t base = idx * n_chunks;
    float mx = -INFINITY;
    for (int c = 0; c < n_chunks; ++c) mx = fmaxf(mx, ws_m[base + c]);
    for (int c = threadIdx.x; c < n_chunks; c += blockDim.x) {
      const float m = ws_m[base + c];
      w[c] = m == -INFINITY ? 0.0f : expf(m - mx);
    }
    __syncthreads();
    float lsum = 0.0f;
    for (int c = 0; c < n_chunks; ++c) lsum += w[c] * ws_l[base + c];
    const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
    for (int x = threadIdx.x; x < D; x += blockDim.x) {
      float o = 0.0f;
      for (int c = 0; c < n_chunks; ++c) {
        if (w[c] != 0.0f) o = fmaf(w[c], ws_acc[(base + c) * D + x], o);
      }
      out[idx * D + x] = o * inv;
    }
    __syncthreads();  // w is rewritten by the next (row, head)
  }
}

absl::Status CheckFormat(const KvSlabFormat& f, const char* which, int64_t head_dim,
                         int64_t block_tokens) {
  if (f.head_dim != head_dim || f.block_tokens != block_tokens) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cuda PagedAttention: %s format is for head_dim %d, block %d; the layer has %d, %d", which,
        f.head_dim, f.block_tokens, head_dim, block_tokens));
  }
  const bool uniform_ok =
      f.kind != KvSlabKind::kUniform ||
      ((f.bits == 8 || f.bits == 4 || f.bits == 3 || f.bits == 2) && f.row_bytes > 0);
  const bool groups_ok = (f.kind != KvSlabKind::kFp8E4M3 &&
                          !(f.kind == KvSlabKind::kUniform && f.meta == KvSlabMeta::kTokenGroup)) ||
                         (f.group_size > 0 && f.n_groups > 0);
  if (!uniform_ok || !groups_ok || f.slab_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("cuda PagedAttention: malformed %s slab format", which));
  }
  return absl::OkStatus();
}

}  // namespace

int64_t PagedAttentionWorkspaceBytes(int64_t rows, int64_t n_heads, int64_t head_dim,
                                     int64_t max_context) {
  if (rows <= 0 || n_heads <= 0 || head_dim <= 0) return 0;
  const ChunkPlan plan = PlanChunks(rows, max_context);
  if (plan.n_chunks <= 1) return 0;
  return rows * n_heads * plan.n_chunks * (head_dim + 2) * static_cast<int64_t>(sizeof(float));
}

absl::Status PagedAttention(const DeviceKvLayer& kv, const DeviceAttentionBatch& batch,
                            void* stream) {
  // Everything checkable on the host, before any CUDA call.
  if (batch.rows < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("cuda PagedAttention: %d rows", batch.rows));
  }
  if (kv.n_kv_heads <= 0 || batch.n_heads <= 0 || batch.n_heads % kv.n_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("cuda PagedAttention: %d query heads are not a multiple of %d KV heads",
                        batch.n_heads, kv.n_kv_heads));
  }
  if (kv.head_dim <= 0 || kv.head_dim > kMaxHeadDim) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cuda PagedAttention: head_dim %d outside [1, %d]", kv.head_dim, kMaxHeadDim));
  }
  if (kv.block_tokens <= 0 || kv.ring_tokens <= 0 || kv.sink_tokens < 0 || kv.window_tokens < 0 ||
      kv.block_stride <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cuda PagedAttention: bad geometry (block %d, ring %d, sinks %d, window %d, stride %d)",
        kv.block_tokens, kv.ring_tokens, kv.sink_tokens, kv.window_tokens, kv.block_stride));
  }
  if (kv.storage != KvStorage::kF16 && kv.storage != KvStorage::kF32) {
    return absl::InvalidArgumentError("cuda PagedAttention: unknown protected storage");
  }
  if (absl::Status s = CheckFormat(kv.k_format, "K", kv.head_dim, kv.block_tokens); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckFormat(kv.v_format, "V", kv.head_dim, kv.block_tokens); !s.ok()) {
    return s;
  }
  if (batch.max_context < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("cuda PagedAttention: max_context %d", batch.max_context));
  }
  if (batch.rows == 0) return absl::OkStatus();
  if (batch.q == nullptr || batch.positions == nullptr || batch.row_seq == nullptr ||
      batch.seqs == nullptr || batch.out == nullptr || kv.k_base == nullptr ||
      kv.v_base == nullptr) {
    return absl::InvalidArgumentError(
        "cuda PagedAttention: null queries, positions, row_seq, sequences, output or pool");
  }
  const ChunkPlan plan = PlanChunks(batch.rows, batch.max_context);
  const int64_t need =
      PagedAttentionWorkspaceBytes(batch.rows, batch.n_heads, kv.head_dim, batch.max_context);
  if (need > 0 && (batch.workspace == nullptr || batch.workspace_bytes < need)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cuda PagedAttention: workspace of %d bytes at %p; %d rows, %d heads, head_dim %d, "
        "context %d need %d",
        batch.workspace_bytes, batch.workspace, batch.rows, batch.n_heads, kv.head_dim,
        batch.max_context, need));
  }
  const int64_t group = batch.n_heads / kv.n_kv_heads;
  const int64_t n_sub = (group + kMaxGroup - 1) / kMaxGroup;
  const int64_t grid_x = batch.rows * plan.n_chunks;
  const int64_t grid_y = kv.n_kv_heads * n_sub;
  if (grid_x > 0x7fffffff || grid_y > 65535) {
    return absl::InvalidArgumentError(
        absl::StrFormat("cuda PagedAttention: %d rows x %d KV heads is too large a grid",
                        batch.rows, kv.n_kv_heads));
  }

  Params P;
  P.kf = kv.k_format;
  P.vf = kv.v_format;
  P.k_base = kv.k_base;
  P.v_base = kv.v_base;
  P.block_stride = kv.block_stride;
  P.ring_tokens = kv.ring_tokens;
  P.sink_tokens = kv.sink_tokens;
  P.window_tokens = kv.window_tokens;
  P.n_kv_heads = static_cast<int>(kv.n_kv_heads);
  P.head_dim = static_cast<int>(kv.head_dim);
  P.dp = static_cast<int>((kv.head_dim + kRun - 1) / kRun * kRun);
  P.block_tokens = static_cast<int>(kv.block_tokens);
  P.f32_storage = kv.storage == KvStorage::kF32;
  P.q = batch.q;
  P.positions = batch.positions;
  P.row_seq = batch.row_seq;
  P.seqs = batch.seqs;
  P.n_heads = static_cast<int>(batch.n_heads);
  P.group = static_cast<int>(group);
  P.n_sub = static_cast<int>(n_sub);
  P.scale = batch.scale;
  P.n_chunks = plan.n_chunks;
  P.chunk_tokens = plan.chunk_tokens;
  P.run_lanes = RunLanes(kv.head_dim);
  P.token_lanes = kThreads / P.run_lanes;
  P.out = batch.out;
  float* ws = static_cast<float*>(batch.workspace);
  const int64_t parts = batch.rows * batch.n_heads * plan.n_chunks;
  P.ws_acc = need > 0 ? ws : nullptr;
  P.ws_m = need > 0 ? ws + parts * kv.head_dim : nullptr;
  P.ws_l = need > 0 ? ws + parts * (kv.head_dim + 1) : nullptr;

  // Heads per block (the kernel's kG) must cover a whole subgroup: subgroups start every
  // kMaxGroup heads (g0 in the kernel), so a group of 5..7 needs kG = 8, not 4 (with 4 its
  // heads 4.. were never computed).
  const int groups = group > 4 ? 8 : group > 2 ? 4 : group == 2 ? 2 : 1;
  const size_t shared = SharedBytes(groups, P.dp);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  switch (groups) {
    case 1:
      AttendChunkKernel<1><<<grid, kThreads, shared, s>>>(P);
      break;
    case 2:
      AttendChunkKernel<2><<<grid, kThreads, shared, s>>>(P);
      break;
    case 4:
      AttendChunkKernel<4><<<grid, kThreads, shared, s>>>(P);
      break;
    default:
      AttendChunkKernel<8><<<grid, kThreads, shared, s>>>(P);
      break;
  }
  if (absl::Status st = CudaCheck(cudaGetLastError(), "cuda PagedAttention launch"); !st.ok()) {
    return st;
  }
  if (plan.n_chunks > 1) {
    const int64_t n = batch.rows * batch.n_heads;
    MergeChunksKernel<<<static_cast<unsigned>(std::min<int64_t>(n, 1 << 20)), kMergeThreads, 0,
                        s>>>(P.ws_acc, P.ws_m, P.ws_l, n, static_cast<int>(plan.n_chunks),
                             P.head_dim, batch.out);
    return CudaCheck(cudaGetLastError(), "cuda PagedAttention merge launch");
  }
  return absl::OkStatus();
}

}  // namespace quantkv::kernels::cuda
