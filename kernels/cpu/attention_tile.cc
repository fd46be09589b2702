// The tiled attention path's inner loop on AVX-512 (see attention_tile.h). Per tile of 64
// tokens and up to 4 query rows of one query: scores as broadcast-FMAs over the transposed
// keys (16 tokens per register, no horizontal sums), an online-softmax step with a vectorized
// exp, then the values as broadcast-FMAs over value rows. Both loops keep 4-16 independent
// accumulators, so they run at FMA throughput instead of the scalar loop's one dot at a time.
// GCC 12 flags the intrinsics' internal _mm512_undefined_* values as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "kernels/cpu/attention_tile.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "kernels/cpu/kv_codec_internal.h"
#include "kernels/cpu/simd_exp.h"

namespace quantkv::kernels::attention_internal {
namespace {

#define QKV_TILE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

constexpr int kMaxRows = 4;
constexpr int kChunks = kTileTokens / 16;  // 16-token score registers per row

__mmask16 Chunk(uint64_t bits, int c) { return static_cast<__mmask16>(bits >> (16 * c)); }

// s[j][c] = q_j . k_t for the 16 tokens t of chunk c, from transposed keys kt [d][64].
template <int NR>
QKV_TILE_AVX512 inline void Scores(const float* q, int64_t d, const float* kt,
                                   __m512 (&s)[NR][kChunks]) {
  for (int j = 0; j < NR; ++j) {
    for (int c = 0; c < kChunks; ++c) s[j][c] = _mm512_setzero_ps();
  }
  for (int64_t x = 0; x < d; ++x) {
    const float* row = kt + x * kTileTokens;
    __m512 k[kChunks];
    for (int c = 0; c < kChunks; ++c) k[c] = _mm512_loadu_ps(row + 16 * c);
    for (int j = 0; j < NR; ++j) {
      const __m512 b = _mm512_set1_ps(q[j * d + x]);
      for (int c = 0; c < kChunks; ++c) s[j][c] = _mm512_fmadd_ps(b, k[c], s[j][c]);
    }
  }
}

// acc[j][c0 .. c0 + 16 CW) += sum over tokens of p[j][t] * v_t, the value row of token t taken
// from v_exact or v_encoded per the span.
template <int NR, int CW>
QKV_TILE_AVX512 inline void Values(const float (*p)[kTileTokens], int64_t d, int64_t c0,
                                   const TileForms& tile, const TileSpan& span, float* acc) {
  __m512 a[NR][CW];
  for (int j = 0; j < NR; ++j) {
    for (int c = 0; c < CW; ++c) a[j][c] = _mm512_loadu_ps(acc + j * d + c0 + 16 * c);
  }
  auto run = [&](const float* v, int64_t t0, int64_t t1) QKV_TILE_AVX512 {
    for (int64_t t = t0; t < t1; ++t) {
      __m512 vr[CW];
      for (int c = 0; c < CW; ++c) vr[c] = _mm512_loadu_ps(v + t * d + c0 + 16 * c);
      for (int j = 0; j < NR; ++j) {
        const __m512 b = _mm512_set1_ps(p[j][t]);
        for (int c = 0; c < CW; ++c) a[j][c] = _mm512_fmadd_ps(b, vr[c], a[j][c]);
      }
    }
  };
  run(tile.v_exact, 0, span.enc_begin);
  run(tile.v_encoded, span.enc_begin, span.enc_end);
  run(tile.v_exact, span.enc_end, span.n);
  for (int j = 0; j < NR; ++j) {
    for (int c = 0; c < CW; ++c) _mm512_storeu_ps(acc + j * d + c0 + 16 * c, a[j][c]);
  }
}

template <int NR>
QKV_TILE_AVX512 void UpdateRows(const float* q, int64_t d, const TileForms& tile,
                                const TileSpan& span, float scale, float* m, float* l, float* acc) {
  const uint64_t valid = TileBits(0, span.n) & ~span.skip;
  if (valid == 0) return;
  const uint64_t encoded = TileBits(span.enc_begin, span.enc_end);
  __m512 s[NR][kChunks];
  if ((valid & ~encoded) == 0) {
    Scores<NR>(q, d, tile.k_encoded_t, s);
  } else {
    Scores<NR>(q, d, tile.k_exact_t, s);
    if ((valid & encoded) != 0) {
      __m512 se[NR][kChunks];
      Scores<NR>(q, d, tile.k_encoded_t, se);
      for (int j = 0; j < NR; ++j) {
        for (int c = 0; c < kChunks; ++c) {
          s[j][c] = _mm512_mask_blend_ps(Chunk(encoded, c), s[j][c], se[j][c]);
        }
      }
    }
  }
  alignas(64) float p[NR][kTileTokens];
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  for (int j = 0; j < NR; ++j) {
    __m512 mx = neg_inf;
    for (int c = 0; c < kChunks; ++c) {
      // Scaled scores; tokens not attended (past n, skipped) are -inf.
      s[j][c] = _mm512_mask_mul_ps(neg_inf, Chunk(valid, c), s[j][c], vscale);
      mx = _mm512_max_ps(mx, s[j][c]);
    }
    const float tile_max = _mm512_reduce_max_ps(mx);
    if (tile_max == -INFINITY) {
      std::fill(p[j], p[j] + kTileTokens, 0.0f);
      continue;
    }
    const float m_new = std::max(m[j], tile_max);
    const float correction = std::exp(m[j] - m_new);
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < kChunks; ++c) {
      const __m512 e = simd::Exp(_mm512_sub_ps(s[j][c], vm));
      _mm512_store_ps(p[j] + 16 * c, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (correction != 1.0f) {
      const __m512 vc = _mm512_set1_ps(correction);
      for (int64_t x = 0; x < d; x += 16) {
        _mm512_storeu_ps(acc + j * d + x, _mm512_mul_ps(_mm512_loadu_ps(acc + j * d + x), vc));
      }
    }
    l[j] = l[j] * correction + _mm512_reduce_add_ps(sum);
    m[j] = m_new;
  }
  for (int64_t c0 = 0; c0 < d; c0 += 64) {
    switch (std::min<int64_t>(4, (d - c0) / 16)) {
      case 4:
        Values<NR, 4>(p, d, c0, tile, span, acc);
        break;
      case 3:
        Values<NR, 3>(p, d, c0, tile, span, acc);
        break;
      case 2:
        Values<NR, 2>(p, d, c0, tile, span, acc);
        break;
      default:
        Values<NR, 1>(p, d, c0, tile, span, acc);
        break;
    }
  }
}

std::atomic<bool> g_tile_kernel_enabled{true};

}  // namespace

void SetTileKernelEnabledForTesting(bool enabled) { g_tile_kernel_enabled = enabled; }

bool TileKernelUsable(int64_t head_dim) {
  static const bool isa = [] {
    __builtin_cpu_init();
    return kv_codec_internal::KvCodecIsa() >= 2 && __builtin_cpu_supports("avx512dq");
  }();
  return isa && g_tile_kernel_enabled && head_dim % 16 == 0 && head_dim > 0 &&
         head_dim <= kTileMaxHeadDim;
}

void TransposeTile(const float* rows, int64_t t0, int64_t t1, int64_t d, float* out) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* r = rows + t * d;
    for (int64_t x = 0; x < d; ++x) out[x * kTileTokens + t] = r[x];
  }
}

void TileUpdate(const float* q, int64_t n_rows, int64_t d, const TileForms& tile,
                const TileSpan& span, float scale, float* m, float* l, float* acc) {
  // Rows go in passes of at most kMaxRows; each row's arithmetic is the same in every pass
  // size, so how a group is split does not change its bits.
  for (int64_t j = 0; j < n_rows; j += kMaxRows) {
    const float* qj = q + j * d;
    float* aj = acc + j * d;
    switch (std::min<int64_t>(kMaxRows, n_rows - j)) {
      case 4:
        UpdateRows<4>(qj, d, tile, span, scale, m + j, l + j, aj);
        break;
      case 3:
        UpdateRows<3>(qj, d, tile, span, scale, m + j, l + j, aj);
        break;
      case 2:
        UpdateRows<2>(qj, d, tile, span, scale, m + j, l + j, aj);
        break;
      default:
        UpdateRows<1>(qj, d, tile, span, scale, m + j, l + j, aj);
        break;
    }
  }
}

}  // namespace quantkv::kernels::attention_internal
