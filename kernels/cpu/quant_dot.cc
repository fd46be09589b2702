#include "kernels/cpu/quant_dot.h"

#include <immintrin.h>

// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_*); nothing of ours.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/fp16.h"

namespace quantkv::kernels::internal {
namespace {

// ggml block layouts (little-endian, packed).
constexpr int kQ4_0Bytes = 18;  // fp16 d, 16 bytes of nibbles
constexpr int kQ4_1Bytes = 20;  // fp16 d, fp16 m, 16 bytes of nibbles
constexpr int kQ8_0Bytes = 34;  // fp16 d, 32 int8

inline uint16_t LoadU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

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
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign_mask, x0),
                                            _mm256_andnot_ps(sign_mask, x1)),
                              _mm256_max_ps(_mm256_andnot_ps(sign_mask, x2),
                                            _mm256_andnot_ps(sign_mask, x3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float d = amax / 127.0f;
    const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(x0, id), _MM_FROUND_TO_NEAREST_INT));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(x1, id), _MM_FROUND_TO_NEAREST_INT));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(x2, id), _MM_FROUND_TO_NEAREST_INT));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(x3, id), _MM_FROUND_TO_NEAREST_INT));
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

// Two consecutive blocks at once: 64 unsigned nibbles laid out [b0 lo, b0 hi, b1 lo, b1 hi].
QKV_AVX512 inline __m512i Nibbles512(const uint8_t* qs0, const uint8_t* qs1) {
  const __m256i r = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs1)),
                                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs0)));
  const __m256i lo = r;
  const __m256i hi = _mm256_srli_epi16(r, 4);
  // Interleave per 128-bit lane: [r0, r0>>4, r1, r1>>4].
  __m512i v = _mm512_castsi256_si512(_mm256_permute2x128_si256(lo, hi, 0x20));
  v = _mm512_inserti64x4(v, _mm256_permute2x128_si256(lo, hi, 0x31), 1);
  return _mm512_and_si512(v, _mm512_set1_epi8(0x0f));
}

QKV_AVX512 inline __m512i LoadAct2(const ActQ8Block* a) {
  __m512i v = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[0].q)));
  return _mm512_inserti64x4(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[1].q)), 1);
}

QKV_AVX512 inline __m512 Scale2(float s0, float s1) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(s0)),
                                             _mm256_castps_pd(_mm256_set1_ps(s1)), 1));
}

template <int kBytes, int kQsOffset, bool kHasMin>
QKV_AVX512 float DotQ4Avx512(const uint8_t* w, const ActQ8Block* a, int64_t nb) {
  __m512 acc = _mm512_setzero_ps();
  float extra = 0.0f;
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2, w += 2 * kBytes) {
    const float d0 = _cvtsh_ss(LoadU16(w)), d1 = _cvtsh_ss(LoadU16(w + kBytes));
    const __m512i q = Nibbles512(w + kQsOffset, w + kBytes + kQsOffset);
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, LoadAct2(a + b));
    acc = _mm512_fmadd_ps(Scale2(d0 * a[b].d, d1 * a[b + 1].d), _mm512_cvtepi32_ps(dot), acc);
    if constexpr (kHasMin) {
      extra += _cvtsh_ss(LoadU16(w + 2)) * a[b].ds + _cvtsh_ss(LoadU16(w + kBytes + 2)) * a[b + 1].ds;
    } else {
      extra -= 8.0f * (d0 * a[b].ds + d1 * a[b + 1].ds);
    }
  }
  float sum = _mm512_reduce_add_ps(acc) + extra;
  if (b < nb) {
    sum += kHasMin ? DotQ4_1Avx2(w, a + b, nb - b) : DotQ4_0Avx2(w, a + b, nb - b);
  }
  return sum;
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

QuantDotFn GetQuantDotScalar(GgmlType type) {
  switch (type) {
    case GgmlType::kQ4_0: return DotQ4_0Scalar;
    case GgmlType::kQ4_1: return DotQ4_1Scalar;
    case GgmlType::kQ8_0: return DotQ8_0Scalar;
    default: return nullptr;
  }
}

QuantDotFn GetQuantDot(GgmlType type) {
  switch (DetectIsa()) {
    case Isa::kAvx512Vnni:
      switch (type) {
        case GgmlType::kQ4_0: return DotQ4Avx512<kQ4_0Bytes, 2, false>;
        case GgmlType::kQ4_1: return DotQ4Avx512<kQ4_1Bytes, 4, true>;
        case GgmlType::kQ8_0: return DotQ8_0Avx512;
        default: return nullptr;
      }
    case Isa::kAvx2:
      switch (type) {
        case GgmlType::kQ4_0: return DotQ4_0Avx2;
        case GgmlType::kQ4_1: return DotQ4_1Avx2;
        case GgmlType::kQ8_0: return DotQ8_0Avx2;
        default: return nullptr;
      }
    case Isa::kScalar:
      return GetQuantDotScalar(type);
  }
  return nullptr;
}

const char* QuantDotIsa() {
  switch (DetectIsa()) {
    case Isa::kAvx512Vnni: return "avx512vnni";
    case Isa::kAvx2: return "avx2";
    case Isa::kScalar: return "scalar";
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
