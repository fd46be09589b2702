#include "kernels/cpu/quant_dot.h"

#include <immintrin.h>

// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_*); nothing of ours.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/unaligned.h"
#include "kernels/fp16.h"

namespace quantkv::kernels::internal {
namespace {

// ggml block layouts (little-endian, packed).
constexpr int kQ4_0Bytes = 18;  // fp16 d, 16 bytes of nibbles
constexpr int kQ4_1Bytes = 20;  // fp16 d, fp16 m, 16 bytes of nibbles
constexpr int kQ8_0Bytes = 34;  // fp16 d, 32 int8

// ---------------------------------------------------------------- scalar reference
float DotQ4_0Scalar(const uint8_t* w, const ActQ8Block* a, int64_t nb) {
  float sum = 0.0f;
  for (int64_t b = 0; b < nb; ++b, w += kQ4_0Bytes) {
    const float d = Fp16ToFp32(LoadU16(w));
    const uint8_t* qs = w + 2;
    int32_t acc = 0;
    for (int j = 0; j < 16; ++j) {
      acc += (qs[j] & 0x0f) * a[b].q[j] + (qs[j] >> 4) * a[b].q[j + 16];
    }
    sum += d * (a[b].d * acc - 8.0f * a[b].ds);
  }
  return sum;
}

float DotQ4_1Scalar(const uint8_t* w, const ActQ8Block* a, int64_t nb) {
  float sum = 0.0f;
  for (int64_t b = 0; b < nb; ++b, w += kQ4_1Bytes) {
    const float d = Fp16ToFp32(LoadU16(w));
    const float m = Fp16ToFp32(LoadU16(w + 2));
    const uint8_t* qs = w + 4;
    int32_t acc = 0;
    for (int j = 0; j < 16; ++j) {
      acc += (qs[j] & 0x0f) * a[b].q[j] + (qs[j] >> 4) * a[b].q[j + 16];
    }
    sum += d * a[b].d * acc + m * a[b].ds;
  }
  return sum;
}

float DotQ8_0Scalar(const uint8_t* w, const ActQ8Block* a, int64_t nb) {
  float sum = 0.0f;
  for (int64_t b = 0; b < nb; ++b, w += kQ8_0Bytes) {
    const float d = Fp16ToFp32(LoadU16(w));
    const int8_t* qs = reinterpret_cast<const int8_t*>(w + 2);
    int32_t acc = 0;
    for (int j = 0; j < 32; ++j) acc += qs[j] * a[b].q[j];
    sum += d * a[b].d * acc;
  }
  return sum;
}

// ---------------------------------------------------------------- AVX2
#define QKV_AVX2 __attribute__((target("avx2,fma,f16c")))

QKV_AVX2 inline float HSum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 unsigned nibbles of a Q4 block in element order: low nibbles are elements 0..15,
// high nibbles 16..31.
QKV_AVX2 inline __m256i Nibbles256(const uint8_t* qs) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

QKV_AVX2 inline __m256i DotU8S8(__m256i u, __m256i s) {
  // |u| <= 15 (or 127 via sign trick) and |s| <= 127: the i16 pair sums cannot saturate.
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

QKV_AVX2 float DotQ4_0Avx2(const uint8_t* w, const ActQ8Block* a, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  float offset = 0.0f;
  for (int64_t b = 0; b < nb; ++b, w += kQ4_0Bytes) {
    const float d = _cvtsh_ss(LoadU16(w));
    const __m256i q = Nibbles256(w + 2);
    const __m256i aq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[b].q));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a[b].d), _mm256_cvtepi32_ps(DotU8S8(q, aq)), acc);
    offset += d * a[b].ds;
  }
  return HSum256(acc) - 8.0f * offset;
}

QKV_AVX2 float DotQ4_1Avx2(const uint8_t* w, const ActQ8Block* a, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  float mins = 0.0f;
  for (int64_t b = 0; b < nb; ++b, w += kQ4_1Bytes) {
    const float d = _cvtsh_ss(LoadU16(w));
    const float m = _cvtsh_ss(LoadU16(w + 2));
    const __m256i q = Nibbles256(w + 4);
    const __m256i aq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[b].q));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a[b].d), _mm256_cvtepi32_ps(DotU8S8(q, aq)), acc);
    mins += m * a[b].ds;
  }
  return HSum256(acc) + mins;
}

QKV_AVX2 float DotQ8_0Avx2(const uint8_t* w, const ActQ8Block* a, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, w += kQ8_0Bytes) {
    const float d = _cvtsh_ss(LoadU16(w));
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
    const __m256i aq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[b].q));
    // maddubs wants an unsigned operand: move the weight's sign onto the activation.
    const __m256i prod = DotU8S8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(aq, q));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a[b].d), _mm256_cvtepi32_ps(prod), acc);
  }
  return HSum256(acc);
}

QKV_AVX2 float DotF32Avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  float sum = HSum256(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

QKV_AVX2 void QuantizeQ8Avx2(const float* x, int64_t n, ActQ8Block* out) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < n / kQ8Block; ++b) {
    const float* v = x + b * kQ8Block;
    __m256 x0 = _mm256_loadu_ps(v), x1 = _mm256_loadu_ps(v + 8);
    __m256 x2 = _mm256_loadu_ps(v + 16), x3 = _mm256_loadu_ps(v + 24);
    __m256 mx = _mm256_max_ps(
        _mm256_max_ps(_mm256_andnot_ps(sign_mask, x0), _mm256_andnot_ps(sign_mask, x1)),
        _mm256_max_ps(_mm256_andnot_ps(sign_mask, x2), _mm256_andnot_ps(sign_mask, x3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float d = amax / 127.0f;
    const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
    __m256i i0 =
        _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(x0, id), _MM_FROUND_TO_NEAREST_INT));
    __m256i i1 =
        _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(x1, id), _MM_FROUND_TO_NEAREST_INT));
    __m256i i2 =
        _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(x2, id), _MM_FROUND_TO_NEAREST_INT));
    __m256i i3 =
        _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(x3, id), _MM_FROUND_TO_NEAREST_INT));
    const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    // Pack 32 x i32 -> 32 x i8; packs interleave 128-bit lanes, the permute restores order.
    __m256i p01 = _mm256_packs_epi32(i0, i1);
    __m256i p23 = _mm256_packs_epi32(i2, i3);
    __m256i p = _mm256_packs_epi16(p01, p23);
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[b].q), p);
    out[b].d = d;
    out[b].ds = d * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
}

// ---------------------------------------------------------------- AVX-512 VNNI
#define QKV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

QKV_AVX512 inline __m512i LoadAct2(const ActQ8Block* a) {
  __m512i v = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[0].q)));
  return _mm512_inserti64x4(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[1].q)), 1);
}

QKV_AVX512 inline __m512 Scale2(float s0, float s1) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(s0)),
                                             _mm256_castps_pd(_mm256_set1_ps(s1)), 1));
}

// Q4_0/Q4_1 weights against M activation rows, 16 blocks per step: the 16 scales come in
// with one gather (d, and m for Q4_1, are the first 4 bytes of a block), each block pair's
// 64 nibbles are unpacked once and meet every row's pre-interleaved activations in one
// dpbusd, and the pair's scales are a permute of the 16. The single-row dot is M = 1, so a
// row's arithmetic is the same however many rows share the call (batch invariance).
template <int kBytes, int kQsOffset, bool kHasMin, int M>
QKV_AVX512 void DotQ4Avx512Rows(const uint8_t* w, const ActQ8Row* a, int64_t nb, float* out,
                                int64_t out_stride) {
  const __m512i gather_idx =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(kBytes));
  const __m512i pair_idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
  const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const __m512i mask = _mm512_set1_epi8(0x0f);
  __m512 acc[M], acc_extra[M], scale[M];
  for (int i = 0; i < M; ++i) acc[i] = acc_extra[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b += 16) {
    const int64_t n = std::min<int64_t>(16, nb - b);
    const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1);
    const uint8_t* wb = w + b * kBytes;
    const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, gather_idx, wb, 1);
    const __m512 dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
    const __m512 m =
        kHasMin ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16))) : dw;
    for (int i = 0; i < M; ++i) {
      scale[i] = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(lanes, a[i].d + b));
      acc_extra[i] = _mm512_fmadd_ps(m, _mm512_maskz_loadu_ps(lanes, a[i].ds + b), acc_extra[i]);
    }
    for (int k = 0; 2 * k < n; ++k) {
      const uint8_t* p0 = wb + 2 * k * kBytes + kQsOffset;
      const __m128i hi_block = 2 * k + 1 < n
                                   ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + kBytes))
                                   : _mm_setzero_si128();
      const __m256i v = _mm256_inserti128_si256(
          _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0))), hi_block,
          1);
      const __m512i q = _mm512_and_si512(
          _mm512_srlv_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(v), v, 1), shifts), mask);
      const __m512i idx = _mm512_add_epi32(pair_idx, _mm512_set1_epi32(2 * k));
      for (int i = 0; i < M; ++i) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q,
                                                _mm512_loadu_si512(a[i].pairs + b * 32 + 64 * k));
        acc[i] =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, scale[i]), acc[i]);
      }
    }
  }
  for (int i = 0; i < M; ++i) {
    float sum = _mm512_reduce_add_ps(acc[i]);
    sum +=
        kHasMin ? _mm512_reduce_add_ps(acc_extra[i]) : -8.0f * _mm512_reduce_add_ps(acc_extra[i]);
    out[i * out_stride] = sum;
  }
}

template <int kBytes, int kQsOffset, bool kHasMin>
QKV_AVX512 float DotQ4Avx512(const uint8_t* w, const ActQ8Row& a, int64_t nb) {
  float out = 0.0f;
  DotQ4Avx512Rows<kBytes, kQsOffset, kHasMin, 1>(w, &a, nb, &out, 1);
  return out;
}

template <int kBytes, int kQsOffset, bool kHasMin>
void DotQ4Avx512Multi(const uint8_t* w, const ActQ8Row* a, int64_t m, int64_t nb, float* out,
                      int64_t out_stride) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    DotQ4Avx512Rows<kBytes, kQsOffset, kHasMin, 4>(w, a + i, nb, out + i * out_stride, out_stride);
  }
  switch (m - i) {
    case 3:
      DotQ4Avx512Rows<kBytes, kQsOffset, kHasMin, 3>(w, a + i, nb, out + i * out_stride,
                                                     out_stride);
      break;
    case 2:
      DotQ4Avx512Rows<kBytes, kQsOffset, kHasMin, 2>(w, a + i, nb, out + i * out_stride,
                                                     out_stride);
      break;
    case 1:
      DotQ4Avx512Rows<kBytes, kQsOffset, kHasMin, 1>(w, a + i, nb, out + i * out_stride,
                                                     out_stride);
      break;
    default:
      break;
  }
}

QKV_AVX512 float DotQ8_0Avx512(const uint8_t* w, const ActQ8Block* a, int64_t nb) {
  __m512 acc = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2, w += 2 * kQ8_0Bytes) {
    const float d0 = _cvtsh_ss(LoadU16(w)), d1 = _cvtsh_ss(LoadU16(w + kQ8_0Bytes));
    __m512i q = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2)));
    q = _mm512_inserti64x4(
        q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kQ8_0Bytes + 2)), 1);
    const __m512i aq = LoadAct2(a + b);
    // dpbusd is unsigned x signed: |w| against the activation carrying w's sign.
    const __m512i absq = _mm512_abs_epi8(q);
    const __mmask64 neg = _mm512_movepi8_mask(q);
    const __m512i sa = _mm512_mask_sub_epi8(aq, neg, _mm512_setzero_si512(), aq);
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), absq, sa);
    acc = _mm512_fmadd_ps(Scale2(d0 * a[b].d, d1 * a[b + 1].d), _mm512_cvtepi32_ps(dot), acc);
  }
  float sum = _mm512_reduce_add_ps(acc);
  if (b < nb) sum += DotQ8_0Avx2(w, a + b, nb - b);
  return sum;
}

// ---------------------------------------------------------------- fp32 activations
// Σ_b d_b * Σ_j q_bj x_bj (+ m_b * Σ_j x_bj for Q4_1): the weights are widened to fp32 in
// registers, so the activations keep full precision (used for the lm_head, whose argmax
// decides the next token, and for exact comparisons).
QKV_AVX512 inline __m512 Nibbles16Lo(__m128i raw) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, _mm_set1_epi8(0x0f))));
}
QKV_AVX512 inline __m512 Nibbles16Hi(__m128i raw) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0f))));
}

QKV_AVX512 float DotQ8_0F32Avx512(const uint8_t* w, const float* x, int64_t nb) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, w += kQ8_0Bytes, x += 32) {
    const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2));
    const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 18));
    __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), _mm512_loadu_ps(x));
    s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), _mm512_loadu_ps(x + 16), s);
    acc = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(LoadU16(w))), s, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

template <int kBytes, int kQsOffset, bool kHasMin>
QKV_AVX512 float DotQ4F32Avx512(const uint8_t* w, const float* x, int64_t nb) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 eight = _mm512_set1_ps(8.0f);
  for (int64_t b = 0; b < nb; ++b, w += kBytes, x += 32) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kQsOffset));
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    __m512 lo = Nibbles16Lo(raw), hi = Nibbles16Hi(raw);
    if constexpr (!kHasMin) {
      lo = _mm512_sub_ps(lo, eight);
      hi = _mm512_sub_ps(hi, eight);
    }
    const __m512 s = _mm512_fmadd_ps(hi, x1, _mm512_mul_ps(lo, x0));
    acc = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(LoadU16(w))), s, acc);
    if constexpr (kHasMin) {
      acc = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(LoadU16(w + 2))), _mm512_add_ps(x0, x1), acc);
    }
  }
  return _mm512_reduce_add_ps(acc);
}

QKV_AVX2 float DotQ8_0F32Avx2(const uint8_t* w, const float* x, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, w += kQ8_0Bytes, x += 32) {
    __m256 s = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 2 + 8 * k));
      s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_loadu_ps(x + 8 * k),
                          s);
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(LoadU16(w))), s, acc);
  }
  return HSum256(acc);
}

template <int kBytes, int kQsOffset, bool kHasMin>
QKV_AVX2 float DotQ4F32Avx2(const uint8_t* w, const float* x, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(0x0f);
  const __m256 offset = _mm256_set1_ps(kHasMin ? 0.0f : 8.0f);
  for (int64_t b = 0; b < nb; ++b, w += kBytes, x += 32) {
    __m256 s = _mm256_setzero_ps(), xs = _mm256_setzero_ps();
    for (int k = 0; k < 2; ++k) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + kQsOffset + 8 * k));
      const __m256i v = _mm256_cvtepu8_epi32(raw);
      const __m256 lo = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), offset);
      const __m256 hi = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), offset);
      const __m256 xl = _mm256_loadu_ps(x + 8 * k), xh = _mm256_loadu_ps(x + 16 + 8 * k);
      s = _mm256_fmadd_ps(hi, xh, _mm256_fmadd_ps(lo, xl, s));
      if constexpr (kHasMin) xs = _mm256_add_ps(xs, _mm256_add_ps(xl, xh));
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(LoadU16(w))), s, acc);
    if constexpr (kHasMin)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(LoadU16(w + 2))), xs, acc);
  }
  return HSum256(acc);
}

// ---------------------------------------------------------------- int16 activations
float DotQ8_0Q16Scalar(const uint8_t* w, const ActQ16Block* a, int64_t nb) {
  float sum = 0.0f;
  for (int64_t b = 0; b < nb; ++b, w += kQ8_0Bytes) {
    const int8_t* qs = reinterpret_cast<const int8_t*>(w + 2);
    int64_t acc = 0;
    for (int j = 0; j < 32; ++j) acc += qs[j] * a[b].q[j];
    sum += Fp16ToFp32(LoadU16(w)) * a[b].d * static_cast<float>(acc);
  }
  return sum;
}

QKV_AVX2 float DotQ8_0Q16Avx2(const uint8_t* w, const ActQ16Block* a, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, w += kQ8_0Bytes) {
    const __m256i w0 =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2)));
    const __m256i w1 =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 18)));
    const __m256i p = _mm256_add_epi32(
        _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[b].q))),
        _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[b].q + 16))));
    acc =
        _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(LoadU16(w)) * a[b].d), _mm256_cvtepi32_ps(p), acc);
  }
  return HSum256(acc);
}

QKV_AVX512 float DotQ8_0Q16Avx512(const uint8_t* w, const ActQ16Block* a, int64_t nb) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, w += kQ8_0Bytes) {
    const __m512i wq =
        _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2)));
    // |w| <= 127, |a| <= 32767: pair sums stay far inside int32.
    const __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wq, _mm512_loadu_si512(a[b].q));
    acc = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(LoadU16(w)) * a[b].d), _mm512_cvtepi32_ps(dot),
                          acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Row-signature adapters for the kernels that only read the blocks.
template <float (*F)(const uint8_t*, const ActQ8Block*, int64_t)>
float OnBlocks(const uint8_t* w, const ActQ8Row& a, int64_t nb) {
  return F(w, a.blocks, nb);
}

// ---------------------------------------------------------------- dispatch
enum class Isa { kScalar, kAvx2, kAvx512Vnni };

Isa DetectIsa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (const char* force = std::getenv("QUANTKV_ISA")) {
      if (std::strcmp(force, "scalar") == 0) return Isa::kScalar;
      if (std::strcmp(force, "avx2") == 0 && __builtin_cpu_supports("avx2")) return Isa::kAvx2;
    }
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")) {
      return Isa::kAvx512Vnni;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      return Isa::kAvx2;
    }
    return Isa::kScalar;
  }();
  return isa;
}

void QuantizeQ8Scalar(const float* x, int64_t n, ActQ8Block* out) {
  for (int64_t b = 0; b < n / kQ8Block; ++b) {
    const float* v = x + b * kQ8Block;
    float amax = 0.0f;
    for (int j = 0; j < kQ8Block; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int32_t sum = 0;
    for (int j = 0; j < kQ8Block; ++j) {
      const int q = static_cast<int>(std::nearbyint(v[j] * id));
      out[b].q[j] = static_cast<int8_t>(q);
      sum += q;
    }
    out[b].d = d;
    out[b].ds = d * static_cast<float>(sum);
  }
}

}  // namespace

void QuantizeActivationsQ8(const float* x, int64_t n, ActQ8Block* out) {
  if (DetectIsa() == Isa::kScalar) {
    QuantizeQ8Scalar(x, n, out);
  } else {
    QuantizeQ8Avx2(x, n, out);
  }
}

void ActQ8Buffer::Quantize(const float* x, int64_t m, int64_t n, ThreadPool* pool,
                           bool with_pairs) {
  nb_ = n / kQ8Block;
  const int64_t pairs_per_row = (nb_ + 1) / 2;
  blocks_.resize(m * nb_);
  // An odd block count leaves the last pair half empty: it must read as zeros.
  has_pairs_ = with_pairs;
  if (with_pairs) pairs_.assign(m * pairs_per_row * 64, 0);
  d_.resize(m * nb_);
  ds_.resize(m * nb_);
  auto rows = [&](int64_t i0, int64_t i1, int) {
    for (int64_t i = i0; i < i1; ++i) {
      ActQ8Block* blk = blocks_.data() + i * nb_;
      QuantizeActivationsQ8(x + i * n, n, blk);
      uint8_t* pr = with_pairs ? pairs_.data() + i * pairs_per_row * 64 : nullptr;
      for (int64_t b = 0; b < nb_; ++b) {
        d_[i * nb_ + b] = blk[b].d;
        ds_[i * nb_ + b] = blk[b].ds;
        if (pr == nullptr) continue;
        uint8_t* dst = pr + (b / 2) * 64 + (b % 2) * 16;
        std::memcpy(dst, blk[b].q, 16);
        std::memcpy(dst + 32, blk[b].q + 16, 16);
      }
    }
  };
  if (pool != nullptr && m >= 64) {  // below, a fork/join costs more than it saves
    pool->ParallelFor(m, rows, 8);
  } else {
    rows(0, m, 0);
  }
}

ActQ8Row ActQ8Buffer::row(int64_t i) const {
  const int64_t pairs_per_row = (nb_ + 1) / 2;
  return {blocks_.data() + i * nb_, has_pairs_ ? pairs_.data() + i * pairs_per_row * 64 : nullptr,
          d_.data() + i * nb_, ds_.data() + i * nb_};
}

void QuantizeActivationsQ16(const float* x, int64_t n, ActQ16Block* out) {
  for (int64_t b = 0; b < n / kQ8Block; ++b) {
    const float* v = x + b * kQ8Block;
    float amax = 0.0f;
    for (int j = 0; j < kQ8Block; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float d = amax / 32767.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < kQ8Block; ++j)
      out[b].q[j] = static_cast<int16_t>(std::nearbyint(v[j] * id));
    out[b].d = d;
  }
}

Int16DotFn GetInt16Dot(GgmlType type) {
  if (type != GgmlType::kQ8_0) return nullptr;
  switch (DetectIsa()) {
    case Isa::kAvx512Vnni:
      return DotQ8_0Q16Avx512;
    case Isa::kAvx2:
      return DotQ8_0Q16Avx2;
    case Isa::kScalar:
      return DotQ8_0Q16Scalar;
  }
  return nullptr;
}

QuantDotFn GetQuantDotScalar(GgmlType type) {
  switch (type) {
    case GgmlType::kQ4_0:
      return OnBlocks<DotQ4_0Scalar>;
    case GgmlType::kQ4_1:
      return OnBlocks<DotQ4_1Scalar>;
    case GgmlType::kQ8_0:
      return OnBlocks<DotQ8_0Scalar>;
    default:
      return nullptr;
  }
}

QuantDotFn GetQuantDot(GgmlType type) {
  switch (DetectIsa()) {
    case Isa::kAvx512Vnni:
      switch (type) {
        case GgmlType::kQ4_0:
          return DotQ4Avx512<kQ4_0Bytes, 2, false>;
        case GgmlType::kQ4_1:
          return DotQ4Avx512<kQ4_1Bytes, 4, true>;
        case GgmlType::kQ8_0:
          return OnBlocks<DotQ8_0Avx512>;
        default:
          return nullptr;
      }
    case Isa::kAvx2:
      switch (type) {
        case GgmlType::kQ4_0:
          return OnBlocks<DotQ4_0Avx2>;
        case GgmlType::kQ4_1:
          return OnBlocks<DotQ4_1Avx2>;
        case GgmlType::kQ8_0:
          return OnBlocks<DotQ8_0Avx2>;
        default:
          return nullptr;
      }
    case Isa::kScalar:
      return GetQuantDotScalar(type);
  }
  return nullptr;
}

QuantDotMultiFn GetQuantDotMulti(GgmlType type) {
  if (DetectIsa() != Isa::kAvx512Vnni) return nullptr;
  switch (type) {
    case GgmlType::kQ4_0:
      return DotQ4Avx512Multi<kQ4_0Bytes, 2, false>;
    case GgmlType::kQ4_1:
      return DotQ4Avx512Multi<kQ4_1Bytes, 4, true>;
    default:
      return nullptr;
  }
}

FloatDotFn GetFloatDot(GgmlType type) {
  switch (DetectIsa()) {
    case Isa::kAvx512Vnni:
      switch (type) {
        case GgmlType::kQ4_0:
          return DotQ4F32Avx512<kQ4_0Bytes, 2, false>;
        case GgmlType::kQ4_1:
          return DotQ4F32Avx512<kQ4_1Bytes, 4, true>;
        case GgmlType::kQ8_0:
          return DotQ8_0F32Avx512;
        default:
          return nullptr;
      }
    case Isa::kAvx2:
      switch (type) {
        case GgmlType::kQ4_0:
          return DotQ4F32Avx2<kQ4_0Bytes, 2, false>;
        case GgmlType::kQ4_1:
          return DotQ4F32Avx2<kQ4_1Bytes, 4, true>;
        case GgmlType::kQ8_0:
          return DotQ8_0F32Avx2;
        default:
          return nullptr;
      }
    case Isa::kScalar:
      return nullptr;
  }
  return nullptr;
}

const char* QuantDotIsa() {
  switch (DetectIsa()) {
    case Isa::kAvx512Vnni:
      return "avx512vnni";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kScalar:
      return "scalar";
  }
  return "scalar";
}

float DotF32(const float* a, const float* b, int64_t n) {
  if (DetectIsa() != Isa::kScalar) return DotF32Avx2(a, b, n);
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace quantkv::kernels::internal
