// Decode attention kernels: few queries per KV head (one token of one sequence, the GQA group
// of query heads sharing a KV head), where the tiled path's decode-to-floats dominates. Per
// chunk of up to 64 tokens: scores for every query row, an online-softmax update with a
// vectorized exp, then the value accumulation.
//
// Uniform per-token-group codecs (int8/int4/int2, group size a multiple of 16) are read code
// by code, following the slab layout of kv_codec_uniform.cc (codes rows, fp16 scales
// [token][group], fp16 mins when asymmetric). Per group, x = scale * code + min, so
//   q.k = sum_g scale_g * (q_g . codes_g) + min_g * sum(q_g)
//   sum_t p_t v_t = sum_t (p_t * scale_t) * codes_t + sum_t p_t * min_t.
// Keys: q is split into three int8 terms per group, q ~= s * (a + b / 254 + c / 254^2), which
// keeps about 24 bits of it (two terms, 16 bits, already cost ~1.5e-5 relative error on the
// attention test's outlier keys), and the integer dots run on VNNI
// (vpdpbusd, unsigned codes x signed q) 16 tokens at a time: the code rows of 16 tokens are
// transposed so that each 32-bit lane holds one token's 4 bytes, the same 4 q bytes are
// broadcast to all lanes, and no horizontal sums are needed. The integer sums are exact
// (and exact in fp32: < 2^24), so the scores carry only the q rounding.
// Values: codes are widened to fp32 lanes (in a channel order that suits the unpacking,
// undone at the end) and accumulated with FMAs, the per-token weight being p_t * scale_t.
// Everything else (fp16/fp32/bf16/fp8 codecs, per-channel/per-block/static scales, int3,
// pre-RoPE keys, and the protected sink/ring rows) is decoded to a float tile first.
// GCC 12 flags the intrinsics' internal _mm512_undefined_* values as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/attention_internal.h"
#include "kernels/cpu/kv_codec_internal.h"
#include "kernels/cpu/simd_exp.h"
#include "kernels/cpu/unaligned.h"
#include "kernels/fp16.h"

namespace quantkv::kernels::attention_internal {
namespace {

using simd::Exp;

#define QKV_ATTN_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

constexpr int64_t kChunk = 128;           // tokens per online-softmax step
constexpr int64_t kStride = kChunk + 16;  // score rows: a 16-token group may overhang
constexpr int kMaxRows = 4;               // query rows per pass (accumulators stay in registers)
constexpr int64_t kMaxGroups = kDecodeMaxHeadDim / 16;
constexpr int64_t kMaxInputs = kDecodeMaxHeadDim / 4;  // 4-channel inputs of a key row

// A uniform per-token-group codec read code by code (bits == 0: decode to a tile instead).
struct Uniform {
  int bits = 0;
  bool sym = false;
  float offset = 0.0f;  // 2^(bits-1) when symmetric: x = scale * (code - offset)
  int64_t gs = 0, ng = 0, row_bytes = 0, codes_bytes = 0, n_meta = 0;
};

// values: the value kernel also needs every fp32 lane group of 16 channels it unpacks from
// 16 code bytes to lie in one scale group, and works on 64 channels at a time.
Uniform ReadableLayout(const KvCodec& c, bool values) {
  Uniform u;
  const KvCodecSpec& s = c.spec();
  const int64_t d = c.head_dim();
  if (s.type != KvCodecType::kUniform || s.granularity != KvGranularity::kPerTokenGroup ||
      s.outlier_pct > 0.0f || s.rank > 0 || s.mean_residual || s.keep_rows > 0) {
    return u;
  }
  if (s.bits != 8 && s.bits != 4 && s.bits != 2) return u;
  const int64_t gs = s.group_size;
  const int64_t rb = d * s.bits / 8;
  // gs <= 512 keeps the per-group integer sums (< 255 * 127 * gs) exact in fp32.
  if (gs % 16 != 0 || gs > 512 || d % gs != 0 || rb % 16 != 0) return u;
  if (values && (gs % (128 / s.bits) != 0 || d % 64 != 0)) return u;
  u.bits = s.bits;
  u.sym = s.symmetric;
  u.offset = u.sym ? static_cast<float>(1 << (s.bits - 1)) : 0.0f;
  u.gs = gs;
  u.ng = d / gs;
  u.row_bytes = rb;
  u.codes_bytes = c.block_tokens() * rb;
  u.n_meta = c.block_tokens() * u.ng;
  return u;
}

// One query row prepared for the key kernel. Input i (4 channels: the 4 bytes of code dword
// i / (8 / bits), bit field i % (8 / bits) of each) pairs with the 4 signed bytes a[i], b[i].
struct QuantQuery {
  int32_t a[kMaxInputs], b[kMaxInputs], c[kMaxInputs];
  float s[kMaxGroups], s2[kMaxGroups], s3[kMaxGroups];
  float sum[kMaxGroups];  // of the rounded q' per group
};

void QuantizeQuery(const float* q, const Uniform& u, int64_t d, QuantQuery* out) {
  int8_t qa[kDecodeMaxHeadDim], qb[kDecodeMaxHeadDim], qc[kDecodeMaxHeadDim];
  for (int64_t g = 0; g < u.ng; ++g) {
    const float* qg = q + g * u.gs;
    float amax = 0.0f;
    for (int64_t c = 0; c < u.gs; ++c) amax = std::max(amax, std::fabs(qg[c]));
    const float s = amax / 127.0f;
    const float s2 = s / 254.0f, s3 = s2 / 254.0f;
    const double inv = s > 0.0f ? 1.0 / s : 0.0;
    const double inv2 = s2 > 0.0f ? 1.0 / s2 : 0.0;
    const double inv3 = s3 > 0.0f ? 1.0 / s3 : 0.0;
    int64_t sa = 0, sb = 0, sc = 0;
    for (int64_t c = 0; c < u.gs; ++c) {
      // The residuals in double: the third term sits at fp32's last bits of q.
      const double x = qg[c];
      const double a = std::clamp(std::nearbyint(x * inv), -127.0, 127.0);
      const double r = x - a * s;
      const double b = std::clamp(std::nearbyint(r * inv2), -127.0, 127.0);
      const double cc = std::clamp(std::nearbyint((r - b * s2) * inv3), -127.0, 127.0);
      qa[g * u.gs + c] = static_cast<int8_t>(a);
      qb[g * u.gs + c] = static_cast<int8_t>(b);
      qc[g * u.gs + c] = static_cast<int8_t>(cc);
      sa += static_cast<int64_t>(a);
      sb += static_cast<int64_t>(b);
      sc += static_cast<int64_t>(cc);
    }
    out->s[g] = s;
    out->s2[g] = s2;
    out->s3[g] = s3;
    out->sum[g] = static_cast<float>(static_cast<double>(s) * static_cast<double>(sa) +
                                     static_cast<double>(s2) * static_cast<double>(sb) +
                                     static_cast<double>(s3) * static_cast<double>(sc));
  }
  const int per = 8 / u.bits;
  for (int64_t i = 0; i < d / 4; ++i) {
    const int64_t dw = i / per, k = i % per;
    uint32_t wa = 0, wb = 0, wc = 0;
    for (int64_t j = 0; j < 4; ++j) {
      const int64_t c = (4 * dw + j) * per + k;
      wa |= static_cast<uint32_t>(static_cast<uint8_t>(qa[c])) << (8 * j);
      wb |= static_cast<uint32_t>(static_cast<uint8_t>(qb[c])) << (8 * j);
      wc |= static_cast<uint32_t>(static_cast<uint8_t>(qc[c])) << (8 * j);
    }
    out->a[i] = static_cast<int32_t>(wa);
    out->b[i] = static_cast<int32_t>(wb);
    out->c[i] = static_cast<int32_t>(wc);
  }
}

// Scales and minima (x = scale * code + min) of tokens [lt, lt + n) of a slab as fp32,
// sc[g * stride + t - lt].
QKV_ATTN_AVX512 void LoadMeta(const uint8_t* slab, const Uniform& u, int64_t lt, int64_t n,
                              float* sc, float* mn, int64_t stride) {
  const uint8_t* scales = slab + u.codes_bytes;
  const uint8_t* mins = scales + 2 * u.n_meta;
  if (u.ng == 1) {
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - i)) - 1);
      const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, scales + 2 * (lt + i)));
      const __m512 b = u.sym ? _mm512_mul_ps(s, _mm512_set1_ps(-u.offset))
                             : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mins + 2 * (lt + i)));
      _mm512_mask_storeu_ps(sc + i, k, s);
      _mm512_mask_storeu_ps(mn + i, k, b);
    }
    return;
  }
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t g = 0; g < u.ng; ++g) {
      const int64_t m = (lt + t) * u.ng + g;
      const float s = _cvtsh_ss(internal::LoadU16(scales + 2 * m));
      sc[g * stride + t] = s;
      mn[g * stride + t] = u.sym ? -u.offset * s : _cvtsh_ss(internal::LoadU16(mins + 2 * m));
    }
  }
}

// Lane t of the result is the sum of the 16 lanes of v[t] (a transpose-and-add tree).
QKV_ATTN_AVX512 inline __m512 Sum16(const __m512* v) {
  __m512 u[8], w[4];
  for (int k = 0; k < 8; ++k) {
    u[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                         _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  }
  for (int k = 0; k < 4; ++k) {
    w[k] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * k], u[2 * k + 1], 0x44),
                         _mm512_shuffle_ps(u[2 * k], u[2 * k + 1], 0xee));
  }
  const __m512 z01 =
      _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xdd));
  const __m512 z23 =
      _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88), _mm512_shuffle_f32x4(w[2], w[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, 0x88), _mm512_shuffle_f32x4(z01, z23, 0xdd));
}

// ---------------------------------------------------------------- float tiles
// out[j * kStride + t] = q_j . rows[t] for t < n.
template <int NR>
QKV_ATTN_AVX512 void FloatScores(const float* rows, int64_t n, int64_t d, const float* q,
                                 float* out) {
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    const int64_t nt = std::min<int64_t>(16, n - t0);
    for (int j = 0; j < NR; ++j) {
      const float* qj = q + j * d;
      __m512 v[16];
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) {
        __m512 a = _mm512_setzero_ps();
        if (t < nt) {
          const float* r = rows + (t0 + t) * d;
          for (int64_t c = 0; c < d; c += 16) {
            a = _mm512_fmadd_ps(_mm512_loadu_ps(r + c), _mm512_loadu_ps(qj + c), a);
          }
        }
        v[t] = a;
      }
      _mm512_mask_storeu_ps(out + j * kStride + t0, static_cast<__mmask16>((1u << nt) - 1),
                            Sum16(v));
    }
  }
}

// acc[j * d + c] += sum_t p[j * kStride + t] * rows[t * d + c].
template <int NR>
QKV_ATTN_AVX512 void FloatValues(const float* rows, int64_t n, int64_t d, const float* p,
                                 float* acc) {
  for (int64_t c = 0; c < d; c += 16) {
    __m512 a[NR];
    for (int j = 0; j < NR; ++j) a[j] = _mm512_loadu_ps(acc + j * d + c);
    for (int64_t t = 0; t < n; ++t) {
      const __m512 v = _mm512_loadu_ps(rows + t * d + c);
      for (int j = 0; j < NR; ++j) {
        a[j] = _mm512_fmadd_ps(v, _mm512_set1_ps(p[j * kStride + t]), a[j]);
      }
    }
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(acc + j * d + c, a[j]);
  }
}

// ---------------------------------------------------------------- uniform codes
// Lane l of the key kernel's vectors holds token P(l) = 4 * (l % 4) + l / 4 of its 16 (the
// order its transposes leave them in); P is its own inverse.
QKV_ATTN_AVX512 inline __m512i LaneTokens() {
  return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
}

// z[k] = 16 code bytes at offset c of rows 4k .. 4k+3, one row per 128-bit lane.
QKV_ATTN_AVX512 inline void LoadCodeLanes(const uint8_t* rows, int64_t rb, int64_t c, __m512i* z) {
  if (rb == 16) {  // 4 rows are one 64-byte line
    for (int k = 0; k < 4; ++k) z[k] = _mm512_loadu_si512(rows + 64 * k);
  } else if (rb == 32) {                      // 2 rows per line: pick their halves c / 16
    const int imm_lo = c == 0 ? 0x88 : 0xdd;  // lanes (0, 2) or (1, 3) of each line
    for (int k = 0; k < 4; ++k) {
      const __m512i x = _mm512_loadu_si512(rows + 128 * k);
      const __m512i y = _mm512_loadu_si512(rows + 128 * k + 64);
      z[k] = imm_lo == 0x88 ? _mm512_shuffle_i32x4(x, y, 0x88) : _mm512_shuffle_i32x4(x, y, 0xdd);
    }
  } else {
    for (int k = 0; k < 4; ++k) {
      const uint8_t* p = rows + 4 * k * rb + c;
      __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + rb)), 1);
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * rb)), 2);
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 3 * rb)), 3);
      z[k] = v;
    }
  }
}

// Raw scores (before the softmax scale) of 16 tokens whose code rows start at `rows`
// (row_bytes apart), out[j * kStride + t]. sc, mn: fp32 metadata of the tokens, group g's at
// sc[g * kChunk + t].
template <int B, int NR>
QKV_ATTN_AVX512 void UniformScores16(const uint8_t* rows, const Uniform& u, const QuantQuery* qq,
                                     const float* sc, const float* mn, float* out) {
  constexpr int kPer = 8 / B;  // inputs per code dword
  const int64_t rb = u.row_bytes;
  const int64_t dw_per_group = u.gs * B / 32;
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << B) - 1));
  const __m512i perm = LaneTokens();
  __m512 score[NR];
  __m512i hi[NR], mid[NR], lo[NR];
  for (int j = 0; j < NR; ++j) {
    score[j] = _mm512_setzero_ps();
    hi[j] = mid[j] = lo[j] = _mm512_setzero_si512();
  }
  int64_t dw = 0, g = 0, flush_at = dw_per_group;
  for (int64_t c = 0; c < rb; c += 16) {
    // The 4x4 dword transposes within the 128-bit lanes leave tr[m] lane l = dword m of
    // the chunk's 16 bytes of row P(l).
    __m512i z[4];
    LoadCodeLanes(rows, rb, c, z);
    const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
    const __m512i tr[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                           _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
#pragma GCC unroll 4
    for (int m = 0; m < 4; ++m) {
#pragma GCC unroll 4
      for (int k = 0; k < kPer; ++k) {
        __m512i x = tr[m];
        if constexpr (B != 8) x = _mm512_and_si512(_mm512_srli_epi32(x, B * k), mask);
        const int64_t in = dw * kPer + k;
        for (int j = 0; j < NR; ++j) {
          hi[j] = _mm512_dpbusd_epi32(hi[j], x, _mm512_set1_epi32(qq[j].a[in]));
          mid[j] = _mm512_dpbusd_epi32(mid[j], x, _mm512_set1_epi32(qq[j].b[in]));
          lo[j] = _mm512_dpbusd_epi32(lo[j], x, _mm512_set1_epi32(qq[j].c[in]));
        }
      }
      if (++dw == flush_at) {
        flush_at += dw_per_group;
        const __m512 s = _mm512_permutexvar_ps(perm, _mm512_loadu_ps(sc + kChunk * g));
        const __m512 b = _mm512_permutexvar_ps(perm, _mm512_loadu_ps(mn + kChunk * g));
        for (int j = 0; j < NR; ++j) {
          const __m512 fine = _mm512_fmadd_ps(
              _mm512_cvtepi32_ps(mid[j]), _mm512_set1_ps(qq[j].s2[g]),
              _mm512_mul_ps(_mm512_cvtepi32_ps(lo[j]), _mm512_set1_ps(qq[j].s3[g])));
          const __m512 dot =
              _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[j]), _mm512_set1_ps(qq[j].s[g]), fine);
          score[j] =
              _mm512_fmadd_ps(s, dot, _mm512_fmadd_ps(b, _mm512_set1_ps(qq[j].sum[g]), score[j]));
          hi[j] = mid[j] = lo[j] = _mm512_setzero_si512();
        }
        ++g;
      }
    }
  }
  for (int j = 0; j < NR; ++j) {
    _mm512_storeu_ps(out + j * kStride, _mm512_permutexvar_ps(perm, score[j]));
  }
}

// acc[j * d + 16 * z + l] += sum_t w[(j * ng + g) * kChunk + t] * code_t(channel of lane l of
// fp32 group z), g the scale group of those channels. The 16 code bytes u of a row widen to
// 8 / B lane groups z = u * 8 / B + k with lane l holding channel 128 / B * u + 8 / B * l + k.
// Each pass over the tokens covers 64 channels (head_dim % 64 == 0).
template <int B, int NR>
QKV_ATTN_AVX512 void UniformValues(const uint8_t* rows, const Uniform& u, int64_t n, const float* w,
                                   float* acc, int64_t d) {
  constexpr int kZ = 8 / B;    // lane groups per 16 code bytes
  constexpr int kUB = 4 / kZ;  // 16-byte code blocks per pass
  const int64_t rb = u.row_bytes;
  const int64_t wj_stride = u.ng * kChunk;
  // Code -> fp32 by table: vpermps reads only the low 4 index bits, so a code field needs no
  // masking when the table repeats the code's values over the bits above it.
  const __m512 table = B == 4 ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                              : _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
  for (int64_t ub0 = 0; ub0 < rb / 16; ub0 += kUB) {
    const float* wg[kUB];
    for (int i = 0; i < kUB; ++i) wg[i] = w + (ub0 + i) * (128 / B) / u.gs * kChunk;
    __m512 a[NR][4];
    for (int j = 0; j < NR; ++j) {
      for (int z = 0; z < 4; ++z) a[j][z] = _mm512_loadu_ps(acc + j * d + (ub0 * kZ + z) * 16);
    }
    const uint8_t* r = rows + 16 * ub0;
    for (int64_t t = 0; t < n; ++t, r += rb) {
      __m512 v[4];
#pragma GCC unroll 4
      for (int i = 0; i < kUB; ++i) {
        const __m512i x =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 16 * i)));
        if constexpr (B == 8) {
          v[i] = _mm512_cvtepi32_ps(x);
        } else {
#pragma GCC unroll 4
          for (int k = 0; k < kZ; ++k) {
            v[i * kZ + k] = _mm512_permutexvar_ps(k == 0 ? x : _mm512_srli_epi32(x, B * k), table);
          }
        }
      }
      for (int j = 0; j < NR; ++j) {
#pragma GCC unroll 4
        for (int i = 0; i < kUB; ++i) {
          const __m512 wj = _mm512_set1_ps(wg[i][j * wj_stride + t]);
#pragma GCC unroll 4
          for (int k = 0; k < kZ; ++k) {
            a[j][i * kZ + k] = _mm512_fmadd_ps(v[i * kZ + k], wj, a[j][i * kZ + k]);
          }
        }
      }
    }
    for (int j = 0; j < NR; ++j) {
      for (int z = 0; z < 4; ++z) _mm512_storeu_ps(acc + j * d + (ub0 * kZ + z) * 16, a[j][z]);
    }
  }
}

// accp[j * d + 16 * z + l] += bias[j * ng + g(z)], g(z) the scale group of lane group z.
QKV_ATTN_AVX512 void AddValueBias(const Uniform& u, int nr, int64_t d, const float* bias,
                                  float* accp) {
  // Lane group z covers channels of 16-byte code block z / (8 / bits), i.e. of group
  // z * 16 / gs: gs / 16 consecutive lane groups per scale group.
  const int64_t zpg = u.gs / 16;
  for (int j = 0; j < nr; ++j) {
    for (int64_t g = 0; g < u.ng; ++g) {
      const __m512 b = _mm512_set1_ps(bias[j * u.ng + g]);
      for (int64_t z = g * zpg; z < (g + 1) * zpg; ++z) {
        float* a = accp + j * d + z * 16;
        _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), b));
      }
    }
  }
}

// Run-time row counts and bit widths to template instances.
template <int NR>
void UniformScores16For(int bits, const uint8_t* rows, const Uniform& u, const QuantQuery* qq,
                        const float* sc, const float* mn, float* out) {
  switch (bits) {
    case 8:
      return UniformScores16<8, NR>(rows, u, qq, sc, mn, out);
    case 4:
      return UniformScores16<4, NR>(rows, u, qq, sc, mn, out);
    default:
      return UniformScores16<2, NR>(rows, u, qq, sc, mn, out);
  }
}

template <int NR>
void UniformValuesFor(int bits, const uint8_t* rows, const Uniform& u, int64_t n, const float* w,
                      float* acc, int64_t d) {
  switch (bits) {
    case 8:
      return UniformValues<8, NR>(rows, u, n, w, acc, d);
    case 4:
      return UniformValues<4, NR>(rows, u, n, w, acc, d);
    default:
      return UniformValues<2, NR>(rows, u, n, w, acc, d);
  }
}

template <int NR>
struct Kernels {
  static constexpr auto float_scores = &FloatScores<NR>;
  static constexpr auto float_values = &FloatValues<NR>;
  static constexpr auto uniform_scores = &UniformScores16For<NR>;
  static constexpr auto uniform_values = &UniformValuesFor<NR>;
};

// Scratch reused across calls on a thread (tiles are too big for the stack).
struct Scratch {
  std::vector<float> ktile, vtile;        // [kChunk][head_dim]
  std::vector<float> ksc, kmn, vsc, vmn;  // [group][kChunk] (+16: a group may overhang)
  std::vector<float> w;                   // [kMaxRows][group][kChunk]
};

// Softmax step for rows [0, nr): s[j * kStride + t] (t < n) raw scores in, probabilities
// exp(scale * s - m_new) out; m, l and both accumulators rescaled to the new maxima.
QKV_ATTN_AVX512 void SoftmaxStep(float* s, int64_t n, int nr, float scale, float* m, float* l,
                                 float* acc, float* accp, int64_t d) {
  const __m512 vs = _mm512_set1_ps(scale);
  for (int j = 0; j < nr; ++j) {
    float* sj = s + j * kStride;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 k = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - t)) - 1);
      const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, sj + t), vs);
      mx = _mm512_mask_max_ps(mx, k, mx, x);
    }
    const float m_new = std::max(m[j], _mm512_reduce_max_ps(mx));
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 k = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - t)) - 1);
      const __m512 e =
          _mm512_maskz_mov_ps(k, Exp(_mm512_fmsub_ps(_mm512_loadu_ps(sj + t), vs, vm)));
      _mm512_storeu_ps(sj + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    const float corr = m[j] == -INFINITY ? 0.0f : std::exp(m[j] - m_new);
    l[j] = l[j] * corr + _mm512_reduce_add_ps(sum);
    m[j] = m_new;
    if (corr != 1.0f) {
      const __m512 vc = _mm512_set1_ps(corr);
      for (int64_t c = 0; c < d; c += 16) {
        _mm512_storeu_ps(acc + j * d + c, _mm512_mul_ps(_mm512_loadu_ps(acc + j * d + c), vc));
        _mm512_storeu_ps(accp + j * d + c, _mm512_mul_ps(_mm512_loadu_ps(accp + j * d + c), vc));
      }
    }
  }
}

// Value weights of a chunk: w[(j * ng + g) * kChunk + t] = p_j,t * scale_g,t, and the
// minima's share bias[j * ng + g] = sum_t p_j,t * min_g,t.
QKV_ATTN_AVX512 void ValueWeights(const float* p, int64_t n, int nr, int64_t ng, const float* sc,
                                  const float* mn, float* w, float* bias) {
  for (int j = 0; j < nr; ++j) {
    for (int64_t g = 0; g < ng; ++g) {
      __m512 b = _mm512_setzero_ps();
      for (int64_t t = 0; t < n; t += 16) {
        const __mmask16 k = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - t)) - 1);
        const __m512 pv = _mm512_maskz_loadu_ps(k, p + j * kStride + t);
        _mm512_storeu_ps(w + (j * ng + g) * kChunk + t,
                         _mm512_mul_ps(pv, _mm512_maskz_loadu_ps(k, sc + g * kChunk + t)));
        b = _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(k, mn + g * kChunk + t), b);
      }
      bias[j * ng + g] = _mm512_reduce_add_ps(b);
    }
  }
}

// Fetches the fp32 metadata of chunk tokens [c0, c1) of head h (split at block ends).
void ChunkMeta(const KvLayerView& kv, const KvSlabs& slabs, int64_t h, const Uniform& u, int64_t c0,
               int64_t c1, float* sc, float* mn) {
  const int64_t bt = kv.block_tokens;
  for (int64_t t = c0; t < c1;) {
    const int64_t b = t / bt, lt = t - b * bt;
    const int64_t n = std::min(c1 - t, (b + 1) * bt - t);
    LoadMeta(slabs.Slab(kv.block_table[b], h), u, lt, n, sc + (t - c0), mn + (t - c0), kChunk);
    t += n;
  }
}

// Blocks are block_bytes apart, and a head's slab of one rarely shares a page with the
// next block's: the hardware prefetchers, which stop at page ends, miss the start of every
// slab. Software prefetches of the whole slabs of the blocks holding [t0, t1) cover them.
void PrefetchSlabs(const KvLayerView& kv, const KvSlabs& slabs, int64_t h, int64_t t0, int64_t t1) {
  if (t0 >= t1) return;
  const int64_t bytes = slabs.codecs[h]->slab_bytes();
  for (int64_t b = t0 / kv.block_tokens; b <= (t1 - 1) / kv.block_tokens; ++b) {
    const char* slab = reinterpret_cast<const char*>(slabs.Slab(kv.block_table[b], h));
    for (int64_t x = 0; x < bytes; x += 64) _mm_prefetch(slab + x, _MM_HINT_T0);
  }
}

template <int NR>
void RowPass(const KvLayerView& kv, int64_t h, const float* q, float scale, int64_t p, int64_t t0,
             int64_t t1, const Uniform& ku, const Uniform& vu, float* m, float* l, float* acc,
             Scratch& scratch) {
  using K = Kernels<NR>;
  const int64_t d = kv.head_dim, bt = kv.block_tokens;
  const int64_t sk = std::min(kv.sink_tokens, p + 1);
  const int64_t ring = std::max(RingStart(kv, p), sk);
  const RowSource keys(kv, 0, h), values(kv, 1, h);
  QuantQuery qq[NR];
  if (ku.bits != 0) {
    for (int j = 0; j < NR; ++j) QuantizeQuery(q + j * d, ku, d, &qq[j]);
  }
  alignas(64) float s[NR * kStride];
  alignas(64) float accp[NR * kDecodeMaxHeadDim] = {};  // value accumulators, codes' order
  alignas(64) uint8_t pad[16 * kDecodeMaxHeadDim];
  float bias[NR * kMaxGroups];
  float* kt = scratch.ktile.data();
  float* vt = scratch.vtile.data();
  float* ksc = scratch.ksc.data();
  float* kmn = scratch.kmn.data();
  float* vsc = scratch.vsc.data();
  float* vmn = scratch.vmn.data();
  float* w = scratch.w.data();
  const int64_t enc0 = std::max(t0, sk), enc1 = std::min(t1, ring);  // encoded tokens
  PrefetchSlabs(kv, kv.k, h, enc0, std::min(enc1, enc0 + kChunk));
  for (int64_t c0 = t0; c0 < t1;) {
    const bool encoded = c0 >= sk && c0 < ring;
    const int64_t seg_end = c0 < sk ? sk : encoded ? ring : t1;
    const int64_t c1 = std::min({t1, seg_end, c0 + kChunk});
    const int64_t n = c1 - c0;
    if (encoded) {  // this chunk's values (read after its scores) and the next one's keys
      PrefetchSlabs(kv, kv.v, h, c0, c1);
      PrefetchSlabs(kv, kv.k, h, c1, std::min(enc1, c1 + kChunk));
    }
    // Scores.
    if (!encoded) {
      keys.Exact(c0, c1, kt);
      K::float_scores(kt, n, d, q, s);
    } else if (ku.bits == 0) {
      keys.Encoded(c0, c1, kt);
      K::float_scores(kt, n, d, q, s);
    } else {
      ChunkMeta(kv, kv.k, h, ku, c0, c1, ksc, kmn);
      for (int64_t g0 = c0; g0 < c1;) {
        const int64_t b = g0 / bt, lt = g0 - b * bt;
        const int64_t ng = std::min({int64_t{16}, c1 - g0, (b + 1) * bt - g0});
        const uint8_t* rows = kv.k.Slab(kv.block_table[b], h) + lt * ku.row_bytes;
        if (ng < 16) {  // a partial group: zero codes in the unused rows, scores dropped
          std::memcpy(pad, rows, static_cast<size_t>(ng * ku.row_bytes));
          std::memset(pad + ng * ku.row_bytes, 0, static_cast<size_t>((16 - ng) * ku.row_bytes));
          rows = pad;
        }
        K::uniform_scores(ku.bits, rows, ku, qq, ksc + (g0 - c0), kmn + (g0 - c0), s + (g0 - c0));
        g0 += ng;
      }
    }
    SoftmaxStep(s, n, NR, scale, m, l, acc, accp, d);
    // Values.
    if (!encoded) {
      values.Exact(c0, c1, vt);
      K::float_values(vt, n, d, s, acc);
    } else if (vu.bits == 0) {
      values.Encoded(c0, c1, vt);
      K::float_values(vt, n, d, s, acc);
    } else {
      ChunkMeta(kv, kv.v, h, vu, c0, c1, vsc, vmn);
      ValueWeights(s, n, NR, vu.ng, vsc, vmn, w, bias);
      for (int64_t b0 = c0; b0 < c1;) {
        const int64_t b = b0 / bt, lt = b0 - b * bt;
        const int64_t nb = std::min(c1 - b0, (b + 1) * bt - b0);
        const uint8_t* rows = kv.v.Slab(kv.block_table[b], h) + lt * vu.row_bytes;
        K::uniform_values(vu.bits, rows, vu, nb, w + (b0 - c0), accp, d);
        b0 += nb;
      }
      AddValueBias(vu, NR, d, bias, accp);
    }
    c0 = c1;
  }
  if (vu.bits != 0) {
    const int64_t kz = 8 / vu.bits;
    for (int j = 0; j < NR; ++j) {
      for (int64_t z = 0; z < d / 16; ++z) {
        const int64_t c = 128 / vu.bits * (z / kz) + z % kz;
        for (int64_t x = 0; x < 16; ++x) acc[j * d + c + kz * x] += accp[j * d + z * 16 + x];
      }
    }
  }
}

}  // namespace

bool DecodeKernelsUsable(int64_t n_q, int64_t head_dim) {
  static const bool isa = [] {
    __builtin_cpu_init();
    return kv_codec_internal::KvCodecIsa() >= 2 && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("avx512dq");
  }();
  return isa && n_q <= kDecodeMaxQueries && head_dim % 16 == 0 && head_dim <= kDecodeMaxHeadDim;
}

void DecodeRange(const KvLayerView& kv, int64_t h, const float* q, int64_t n_rows, float scale,
                 int64_t p, int64_t t0, int64_t t1, float* m, float* l, float* acc) {
  t1 = std::min(t1, p + 1);
  if (t0 >= t1) return;
  const int64_t d = kv.head_dim;
  // Keys stored pre-RoPE or rotated, and rotated values, are decoded to a tile and fixed up
  // there (RowSource::Encoded).
  const Uniform ku = kv.k_pre_rope != nullptr || kv.k_rotation != nullptr
                         ? Uniform{}
                         : ReadableLayout(*kv.k.codecs[h], /*values=*/false);
  const Uniform vu =
      kv.v_rotation != nullptr ? Uniform{} : ReadableLayout(*kv.v.codecs[h], /*values=*/true);
  thread_local Scratch scratch;
  if (scratch.w.empty()) {
    scratch.ktile.resize(kChunk * kDecodeMaxHeadDim);
    scratch.vtile.resize(kChunk * kDecodeMaxHeadDim);
    for (auto* v : {&scratch.ksc, &scratch.kmn, &scratch.vsc, &scratch.vmn}) {
      v->resize(kMaxGroups * kChunk + 16);
    }
    scratch.w.resize(kMaxRows * kMaxGroups * kChunk);
  }
  for (int64_t r = 0; r < n_rows; r += kMaxRows) {
    const int64_t nr = std::min<int64_t>(kMaxRows, n_rows - r);
    const float* qr = q + r * d;
    float *mr = m + r, *lr = l + r, *ar = acc + r * d;
    switch (nr) {
      case 1:
        RowPass<1>(kv, h, qr, scale, p, t0, t1, ku, vu, mr, lr, ar, scratch);
        break;
      case 2:
        RowPass<2>(kv, h, qr, scale, p, t0, t1, ku, vu, mr, lr, ar, scratch);
        break;
      case 3:
        RowPass<3>(kv, h, qr, scale, p, t0, t1, ku, vu, mr, lr, ar, scratch);
        break;
      default:
        RowPass<4>(kv, h, qr, scale, p, t0, t1, ku, vu, mr, lr, ar, scratch);
        break;
    }
  }
}

}  // namespace quantkv::kernels::attention_internal
