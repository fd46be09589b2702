// Floating-point KV codecs: fp32 / fp16 / bf16 element storage and OCP FP8 E4M3 with one
// fp16 scale per token per group of channels.
//
// Slab layouts (row-major [token][channel] codes first, metadata after):
//   fp32/fp16/bf16  block_tokens * head_dim elements
//   fp8             block_tokens * head_dim E4M3 codes, then block_tokens * (head_dim / group)
//                   fp16 scales ([token][group]); x = e4m3(code) * scale, scale = clip*amax/448
//                   rounded up to fp16 so that the group's largest value maps inside +-448.
// GCC 12 flags the intrinsics' internal _mm512_undefined_* values as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

#include "kernels/cpu/kv_codec_internal.h"
#include "kernels/cpu/unaligned.h"
#include "kernels/dequantize.h"
#include "kernels/fp16.h"
#include "kernels/kv_codec.h"

namespace quantkv::kernels {
namespace kv_codec_internal {
namespace {

using internal::LoadU16;
using internal::StoreU16;

// ---------------------------------------------------------------- fp32 / fp16 / bf16
class FloatCodec final : public KvCodec {
 public:
  FloatCodec(const KvCodecSpec& spec, int64_t head_dim, int64_t block_tokens)
      : KvCodec(spec, head_dim, block_tokens), elem_(spec.type == KvCodecType::kF32 ? 4 : 2) {}

  int64_t slab_bytes() const override { return block_tokens() * head_dim() * elem_; }

  void Encode(const float* x, uint8_t* slab) const override {
    const int64_t n = block_tokens() * head_dim();
    switch (spec().type) {
      case KvCodecType::kF32:
        std::memcpy(slab, x, static_cast<size_t>(n) * 4);
        break;
      case KvCodecType::kF16:
        if (reinterpret_cast<uintptr_t>(slab) % 2 == 0) {
          Fp32ToFp16Row(x, reinterpret_cast<uint16_t*>(slab), n);
        } else {
          for (int64_t i = 0; i < n; ++i) StoreU16(slab + 2 * i, Fp32ToFp16(x[i]));
        }
        break;
      default:
        for (int64_t i = 0; i < n; ++i) StoreU16(slab + 2 * i, Fp32ToBf16(x[i]));
        break;
    }
  }

  void Decode(const uint8_t* slab, int64_t t0, int64_t t1, float* out) const override {
    if (t1 <= t0) return;
    const int64_t d = head_dim();
    const int64_t n = (t1 - t0) * d;
    const uint8_t* p = slab + t0 * d * elem_;
    switch (spec().type) {
      case KvCodecType::kF32:
        std::memcpy(out, p, static_cast<size_t>(n) * 4);
        break;
      case KvCodecType::kF16:
        if (reinterpret_cast<uintptr_t>(p) % 2 == 0) {
          Fp16ToFp32Row(reinterpret_cast<const uint16_t*>(p), out, n);
        } else {
          for (int64_t i = 0; i < n; ++i) out[i] = Fp16ToFp32(LoadU16(p + 2 * i));
        }
        break;
      default:
        for (int64_t i = 0; i < n; ++i) {
          out[i] = Fp32FromBits(static_cast<uint32_t>(LoadU16(p + 2 * i)) << 16);
        }
        break;
    }
  }

 private:
  int64_t elem_;
};

// ---------------------------------------------------------------- fp8 e4m3
constexpr float kE4M3Max = 448.0f;

// OCP E4M3: bias 7, 3 mantissa bits, no infinities, NaN = S.1111.111. Round to nearest
// even; magnitudes beyond 448 (and infinities) saturate to 448.
uint8_t Fp32ToE4M3(float v) {
  const uint32_t bits = BitsFromFp32(v);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint8_t>(sign | 0x7f);  // NaN
  const float a = Fp32FromBits(abs);
  if (a >= kE4M3Max) return static_cast<uint8_t>(sign | 0x7e);
  if (a < 0.015625f) {  // below 2^-6: subnormal steps of 2^-9 (code 8 is 2^-6, the first normal)
    return static_cast<uint8_t>(sign | static_cast<uint8_t>(std::nearbyint(a * 512.0f)));
  }
  const uint32_t r = (abs + 0x7ffffu + ((abs >> 20) & 1u)) >> 20;  // exp:mant3, rounded
  const uint32_t code = std::min<uint32_t>(r - (120u << 3), 0x7eu);
  return static_cast<uint8_t>(sign | code);
}

// E4M3 magnitudes as fp32, built exactly through fp16 (code << 7 is the fp16 with the same
// exponent field and mantissa, 2^8 too small).
std::array<float, 256> MakeE4M3Table() {
  std::array<float, 256> t{};
  for (int c = 0; c < 256; ++c) {
    const uint16_t h = static_cast<uint16_t>(((c & 0x80) << 8) | ((c & 0x7f) << 7));
    t[c] = (c & 0x7f) == 0x7f ? std::numeric_limits<float>::quiet_NaN() : Fp16ToFp32(h) * 256.0f;
  }
  return t;
}
const std::array<float, 256>& E4M3Table() {
  static const std::array<float, 256> t = MakeE4M3Table();
  return t;
}

#define QKV_CODEC_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QKV_CODEC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

// 16 codes -> 16 floats times `scale256` (= scale * 256).
QKV_CODEC_AVX512 inline __m512 E4M3x16(const uint8_t* p, __m512 scale256) {
  const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i mag = _mm256_and_si256(c, _mm256_set1_epi16(0x7f));
  const __m256i h =
      _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x80)), 8),
                      _mm256_slli_epi16(mag, 7));
  const __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(h), scale256);
  const __mmask16 nan = _mm256_cmpeq_epi16_mask(mag, _mm256_set1_epi16(0x7f));
  return _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
}

QKV_CODEC_AVX2 inline __m256 E4M3x8(const uint8_t* p, __m256 scale256) {
  const __m128i c = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i mag = _mm_and_si128(c, _mm_set1_epi16(0x7f));
  const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x80)), 8),
                                 _mm_slli_epi16(mag, 7));
  const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h), scale256);
  const __m256 nan =
      _mm256_castsi256_ps(_mm256_cvtepi16_epi32(_mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7f))));
  return _mm256_blendv_ps(v, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), nan);
}

struct Fp8Geometry {
  int64_t d, gs, ng;
  const uint8_t* codes;
  const uint8_t* scales;
};

QKV_CODEC_AVX512 void DecodeFp8Avx512(const Fp8Geometry& g, int64_t t0, int64_t t1, float* out) {
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* row = g.codes + t * g.d;
    float* o = out + (t - t0) * g.d;
    for (int64_t k = 0; k < g.ng; ++k) {
      const __m512 s = _mm512_set1_ps(_cvtsh_ss(LoadU16(g.scales + 2 * (t * g.ng + k))) * 256.0f);
      for (int64_t c = k * g.gs; c < (k + 1) * g.gs; c += 16) {
        _mm512_storeu_ps(o + c, E4M3x16(row + c, s));
      }
    }
  }
}

QKV_CODEC_AVX2 void DecodeFp8Avx2(const Fp8Geometry& g, int64_t t0, int64_t t1, float* out) {
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* row = g.codes + t * g.d;
    float* o = out + (t - t0) * g.d;
    for (int64_t k = 0; k < g.ng; ++k) {
      const __m256 s = _mm256_set1_ps(_cvtsh_ss(LoadU16(g.scales + 2 * (t * g.ng + k))) * 256.0f);
      for (int64_t c = k * g.gs; c < (k + 1) * g.gs; c += 8) {
        _mm256_storeu_ps(o + c, E4M3x8(row + c, s));
      }
    }
  }
}

void DecodeFp8Scalar(const Fp8Geometry& g, int64_t t0, int64_t t1, float* out) {
  const std::array<float, 256>& lut = E4M3Table();
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* row = g.codes + t * g.d;
    float* o = out + (t - t0) * g.d;
    for (int64_t k = 0; k < g.ng; ++k) {
      const float s = Fp16ToFp32(LoadU16(g.scales + 2 * (t * g.ng + k)));
      for (int64_t c = k * g.gs; c < (k + 1) * g.gs; ++c) o[c] = lut[row[c]] * s;
    }
  }
}

class Fp8Codec final : public KvCodec {
 public:
  Fp8Codec(const KvCodecSpec& spec, int64_t head_dim, int64_t block_tokens)
      : KvCodec(spec, head_dim, block_tokens),
        gs_(spec.group_size),
        ng_(head_dim / spec.group_size) {
    const int isa = KvCodecIsa();
    isa_ = isa >= 2 && gs_ % 16 == 0 ? 2 : isa >= 1 && gs_ % 8 == 0 ? 1 : 0;
  }

  int64_t slab_bytes() const override {
    return block_tokens() * head_dim() + 2 * block_tokens() * ng_;
  }

  void Encode(const float* x, uint8_t* slab) const override {
    const int64_t d = head_dim();
    uint8_t* scales = slab + block_tokens() * d;
    const float clip = spec().clip;
    for (int64_t t = 0; t < block_tokens(); ++t) {
      for (int64_t k = 0; k < ng_; ++k) {
        const float* v = x + t * d + k * gs_;
        float amax = 0.0f;
        for (int64_t c = 0; c < gs_; ++c) amax = std::max(amax, std::fabs(v[c]));  // NaN-blind
        const uint16_t sh = Fp16RoundUp(clip * amax / kE4M3Max);
        StoreU16(scales + 2 * (t * ng_ + k), sh);
        const float s = Fp16ToFp32(sh);
        const float inv = s > 0.0f ? 1.0f / s : 0.0f;
        uint8_t* q = slab + t * d + k * gs_;
        for (int64_t c = 0; c < gs_; ++c) q[c] = Fp32ToE4M3(v[c] * inv);
      }
    }
  }

  void Decode(const uint8_t* slab, int64_t t0, int64_t t1, float* out) const override {
    if (t1 <= t0) return;
    const Fp8Geometry g{head_dim(), gs_, ng_, slab, slab + block_tokens() * head_dim()};
    if (isa_ == 2) return DecodeFp8Avx512(g, t0, t1, out);
    if (isa_ == 1) return DecodeFp8Avx2(g, t0, t1, out);
    DecodeFp8Scalar(g, t0, t1, out);
  }

 private:
  int64_t gs_, ng_;
  int isa_ = 0;
};

}  // namespace

std::unique_ptr<KvCodec> MakeFloatCodec(const KvCodecSpec& spec, int64_t head_dim,
                                        int64_t block_tokens) {
  return std::make_unique<FloatCodec>(spec, head_dim, block_tokens);
}

std::unique_ptr<KvCodec> MakeFp8Codec(const KvCodecSpec& spec, int64_t head_dim,
                                      int64_t block_tokens) {
  return std::make_unique<Fp8Codec>(spec, head_dim, block_tokens);
}

}  // namespace kv_codec_internal
}  // namespace quantkv::kernels
