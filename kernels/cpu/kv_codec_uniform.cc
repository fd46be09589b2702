// Uniform integer KV codecs: int8 / int4 / int3 / int2 codes with fp16 scales (and fp16
// minima when asymmetric), one set per token per group of channels or per channel over the
// block's tokens.
//
// Slab layout:
//   codes   block_tokens rows of row_bytes = head_dim * bits / 8, each token's channels packed
//           in order: 8 bits one per byte; 4 bits two per byte (channel 2j in the low nibble
//           of byte j); 2 bits four per byte (channel 4j+k at bits 2k); 3 bits eight channels
//           per 3 bytes (channel 8j+k at bits 3k of the little-endian 24-bit word j).
//   scales  n_meta fp16 values: [token][group] (per-token-group), [channel] (per-channel),
//           one (per-block), none (static: calibrated fp32 scales held by the codec)
//   mins    n_meta fp16 values, asymmetric only
// Asymmetric: code q in [0, 2^b - 1], x = scale * q + min.
// Symmetric:  code q in [1, 2^b - 1] holds q - 2^(b-1) in [-(2^(b-1) - 1), 2^(b-1) - 1],
//             x = scale * (q - 2^(b-1)).
// The encoder rounds min down and scale up to fp16 before quantizing, so the covered range
// [min, min + scale * qmax] contains the (clipped) data and |error| <= scale / 2 inside it.
// Metadata saturates at the fp16 range (|min| <= 65504, scale <= 65504); NaN inputs encode
// as the lowest code. All-equal groups get scale 0 (or one fp16 step) and decode exactly
// (or within half a step).
// GCC 12 flags the intrinsics' internal _mm512_undefined_* values as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "kernels/cpu/kv_codec_internal.h"
#include "kernels/cpu/unaligned.h"
#include "kernels/fp16.h"
#include "kernels/kv_clip_model.h"
#include "kernels/kv_codec.h"
#include "kernels/kv_slab_format.h"

namespace quantkv::kernels {
namespace kv_codec_internal {

constexpr float kFp16Max = 65504.0f;

// Smallest fp16 >= v (v >= 0; NaN -> 0), capped at the largest finite fp16.
uint16_t Fp16RoundUp(float v) {
  if (!(v > 0.0f)) return 0;
  if (v >= kFp16Max) return 0x7bff;
  uint16_t h = Fp32ToFp16(v);
  if (Fp16ToFp32(h) < v) ++h;
  return h;
}

// Largest fp16 <= v, v clamped to the finite fp16 range first (NaN -> 0).
uint16_t Fp16RoundDown(float v) {
  if (!(v == v)) return 0;
  v = std::clamp(v, -kFp16Max, kFp16Max);
  uint16_t h = Fp32ToFp16(v);
  if (Fp16ToFp32(h) > v) {
    if (h == 0) {
      h = 0x8001;  // v is a tiny negative rounded to +0
    } else if (h & 0x8000u) {
      ++h;  // larger negative magnitude
    } else {
      --h;
    }
  }
  return h;
}

namespace {

using internal::LoadU16;
using internal::LoadU32;
using internal::StoreU16;

inline uint64_t LoadU64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline uint32_t Load24(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
         static_cast<uint32_t>(p[2]) << 16;
}

// Where a slab's affine maps come from: one (scale, min) per token group, or one per channel
// for every token of the slab (per_channel below), read from the slab's per-channel or
// single per-block metadata, or fixed by calibration (static: the slab holds codes only).
enum class MetaKind { kTokenGroup, kChannel, kBlock, kStatic };

struct Layout {
  int bits;
  bool sym;
  MetaKind meta;
  bool per_channel;  // meta != kTokenGroup: the same affine map per channel for all tokens
  int64_t d, bt, gs, ng;
  int64_t row_bytes, codes_bytes, n_meta;
  float offset;               // 2^(bits-1) when symmetric, else 0
  const float* static_scale;  // kStatic: [d] owned by the codec
  const float* static_bias;   // kStatic: [d], x = q * scale + bias
};

// The per-channel affine map x = q * scale()[c] + bias()[c] of a per_channel slab: the
// codec's own arrays for static scales, else converted from the slab's metadata into a
// buffer that lives on the stack up to 512 channels.
class ChannelAffine {
 public:
  ChannelAffine(const Layout& L, const uint8_t* slab) {
    if (L.meta == MetaKind::kStatic) {
      sc_ = L.static_scale;
      bi_ = L.static_bias;
      return;
    }
    float* sc = stack_;
    if (L.d > kStack) {
      heap_.resize(static_cast<size_t>(2 * L.d));
      sc = heap_.data();
    }
    float* bi = sc + L.d;
    const uint8_t* scales = slab + L.codes_bytes;
    const uint8_t* mins = scales + 2 * L.n_meta;
    const bool block = L.meta == MetaKind::kBlock;  // one scale for every channel
    for (int64_t c = 0; c < L.d; ++c) {
      const int64_t m = block ? 0 : c;
      sc[c] = Fp16ToFp32(internal::LoadU16(scales + 2 * m));
      bi[c] = L.sym ? -L.offset * sc[c] : Fp16ToFp32(internal::LoadU16(mins + 2 * m));
    }
    sc_ = sc;
    bi_ = bi;
  }
  const float* scale() const { return sc_; }
  const float* bias() const { return bi_; }

 private:
  static constexpr int64_t kStack = 512;
  float stack_[2 * kStack];
  std::vector<float> heap_;
  const float* sc_ = nullptr;
  const float* bi_ = nullptr;
};

// Code of channel c in a packed row: the layout header's, which the CUDA kernels share.
using slab::CodeAt;

void PackRow(const uint8_t* q, int bits, int64_t d, uint8_t* row) {
  switch (bits) {
    case 8:
      std::memcpy(row, q, static_cast<size_t>(d));
      break;
    case 4:
      for (int64_t j = 0; j < d / 2; ++j)
        row[j] = static_cast<uint8_t>(q[2 * j] | q[2 * j + 1] << 4);
      break;
    case 2:
      for (int64_t j = 0; j < d / 4; ++j) {
        row[j] = static_cast<uint8_t>(q[4 * j] | q[4 * j + 1] << 2 | q[4 * j + 2] << 4 |
                                      q[4 * j + 3] << 6);
      }
      break;
    default:
      for (int64_t j = 0; j < d / 8; ++j) {
        uint32_t w = 0;
        for (int k = 0; k < 8; ++k) w |= static_cast<uint32_t>(q[8 * j + k]) << (3 * k);
        row[3 * j] = static_cast<uint8_t>(w);
        row[3 * j + 1] = static_cast<uint8_t>(w >> 8);
        row[3 * j + 2] = static_cast<uint8_t>(w >> 16);
      }
      break;
  }
}

// Scale/min (fp16 bits) for values with the given statistics.
struct Meta {
  uint16_t scale, min;
};

Meta ComputeMeta(const Layout& L, float clip, float lo, float hi) {
  const float levels = static_cast<float>((1 << L.bits) - 1);
  if (L.sym) {
    const float amax = std::max(std::fabs(lo), std::fabs(hi));
    const float qmax = static_cast<float>((1 << (L.bits - 1)) - 1);
    return {Fp16RoundUp(clip * amax / qmax), 0};
  }
  if (clip < 1.0f) {
    const float mid = lo + 0.5f * (hi - lo);
    const float half = 0.5f * clip * (hi - lo);
    lo = mid - half;
    hi = mid + half;
  }
  const uint16_t mh = Fp16RoundDown(lo);
  const float m = Fp16ToFp32(mh);
  return {Fp16RoundUp((hi - m) / levels), mh};
}

// Quantizer for one (scale, min): code = clamp(round((x - min) / scale)) (+offset if sym).
struct Quantizer {
  float inv, base, top, lo_code;
  Quantizer(const Layout& L, Meta m)
      : Quantizer(L, Fp16ToFp32(m.scale),
                  L.sym ? -L.offset * Fp16ToFp32(m.scale) : Fp16ToFp32(m.min)) {}
  // s: step; b: x value of code 0.
  Quantizer(const Layout& L, float s, float b) {
    inv = s > 0.0f ? 1.0f / s : 0.0f;
    base = b;
    top = static_cast<float>((1 << L.bits) - 1);
    lo_code = L.sym ? 1.0f : 0.0f;
  }
  uint8_t operator()(float x) const {
    // std::max(lo, v) with v NaN gives lo; clamp before the conversion.
    float v = (x - base) * inv;
    v = std::min(std::max(lo_code, v), top);
    return static_cast<uint8_t>(static_cast<int>(v + 0.5f));
  }
};

// ---------------------------------------------------------------- decoders
// Every decoder computes x = q * scale + bias with bias = min (asym) or -scale * 2^(b-1) (sym).

// Codes of one packed row as floats (plain loops the compiler vectorizes with SSE2).
template <int B>
void UnpackRow(const uint8_t* row, int64_t d, float* q) {
  if constexpr (B == 8) {
    for (int64_t c = 0; c < d; ++c) q[c] = static_cast<float>(row[c]);
  } else if constexpr (B == 4) {
    for (int64_t j = 0; j < d / 2; ++j) {
      q[2 * j] = static_cast<float>(row[j] & 0xf);
      q[2 * j + 1] = static_cast<float>(row[j] >> 4);
    }
  } else if constexpr (B == 2) {
    for (int64_t j = 0; j < d / 4; ++j) {
      const int v = row[j];
      q[4 * j] = static_cast<float>(v & 3);
      q[4 * j + 1] = static_cast<float>((v >> 2) & 3);
      q[4 * j + 2] = static_cast<float>((v >> 4) & 3);
      q[4 * j + 3] = static_cast<float>(v >> 6);
    }
  } else {
    for (int64_t j = 0; j < d / 8; ++j) {
      const uint32_t w = Load24(row + 3 * j);
      for (int k = 0; k < 8; ++k) q[8 * j + k] = static_cast<float>((w >> (3 * k)) & 7u);
    }
  }
}

template <int B>
void DecodeScalar(const Layout& L, const uint8_t* slab, int64_t t0, int64_t t1, float* out) {
  const uint8_t* scales = slab + L.codes_bytes;
  const uint8_t* mins = scales + 2 * L.n_meta;
  const int64_t d = L.d;
  constexpr int64_t kStack = 512;
  float stack_buf[kStack];
  std::vector<float> heap;
  float* q = stack_buf;
  if (d > kStack) {
    heap.resize(static_cast<size_t>(d));
    q = heap.data();
  }
  if (L.per_channel) {
    const ChannelAffine affine(L, slab);
    const float* sc = affine.scale();
    const float* bi = affine.bias();
    for (int64_t t = t0; t < t1; ++t) {
      UnpackRow<B>(slab + t * L.row_bytes, d, q);
      float* o = out + (t - t0) * d;
      for (int64_t c = 0; c < d; ++c) o[c] = q[c] * sc[c] + bi[c];
    }
    return;
  }
  for (int64_t t = t0; t < t1; ++t) {
    UnpackRow<B>(slab + t * L.row_bytes, d, q);
    float* o = out + (t - t0) * d;
    for (int64_t g = 0; g < L.ng; ++g) {
      const int64_t m = t * L.ng + g;
      const float s = Fp16ToFp32(LoadU16(scales + 2 * m));
      const float b = L.sym ? -L.offset * s : Fp16ToFp32(LoadU16(mins + 2 * m));
      const float* qg = q + g * L.gs;
      float* og = o + g * L.gs;
      for (int64_t c = 0; c < L.gs; ++c) og[c] = qg[c] * s + b;
    }
  }
}

#define QKV_CODEC_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QKV_CODEC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

// Codes of channels [c, c + 16) (c a multiple of 16) as int32 lanes.
template <int B>
QKV_CODEC_AVX512 inline __m512i Codes16(const uint8_t* row, int64_t c) {
  if constexpr (B == 8) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c)));
  } else if constexpr (B == 4) {
    const __m512i w =
        _mm512_castsi128_si512(_mm_cvtsi64_si128(static_cast<long long>(LoadU64(row + c / 2))));
    const __m512i v = _mm512_permutexvar_epi32(
        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), w);
    return _mm512_and_si512(_mm512_srlv_epi32(v, _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0,
                                                                   4, 8, 12, 16, 20, 24, 28)),
                            _mm512_set1_epi32(0xf));
  } else if constexpr (B == 2) {
    const __m512i v = _mm512_set1_epi32(static_cast<int>(LoadU32(row + c / 4)));
    return _mm512_and_si512(_mm512_srlv_epi32(v, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16,
                                                                   18, 20, 22, 24, 26, 28, 30)),
                            _mm512_set1_epi32(0x3));
  } else {
    // 6 code bytes; reading 8 stays inside the slab (metadata always follows the codes).
    const uint64_t raw = LoadU64(row + c / 8 * 3);
    const uint64_t w = (raw & 0xffffffu) | ((raw << 8) & 0xffffff00000000u);
    const __m512i v = _mm512_permutexvar_epi32(
        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
        _mm512_castsi128_si512(_mm_cvtsi64_si128(static_cast<long long>(w))));
    return _mm512_and_si512(_mm512_srlv_epi32(v, _mm512_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21, 0, 3,
                                                                   6, 9, 12, 15, 18, 21)),
                            _mm512_set1_epi32(0x7));
  }
}

template <int B>
QKV_CODEC_AVX512 void DecodeAvx512(const Layout& L, const uint8_t* slab, int64_t t0, int64_t t1,
                                   float* out) {
  const uint8_t* scales = slab + L.codes_bytes;
  const uint8_t* mins = scales + 2 * L.n_meta;
  const int64_t d = L.d;
  if (L.per_channel) {
    // Per-channel scale and bias for the whole call (codes per 16 channels, scalar tail).
    const ChannelAffine affine(L, slab);
    const float* sc = affine.scale();
    const float* bi = affine.bias();
    int64_t c = 0;
    const int64_t d16 = d / 16 * 16;
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* row = slab + t * L.row_bytes;
      float* o = out + (t - t0) * d;
      for (c = 0; c < d16; c += 16) {
        const __m512 q = _mm512_cvtepi32_ps(Codes16<B>(row, c));
        _mm512_storeu_ps(o + c,
                         _mm512_fmadd_ps(q, _mm512_loadu_ps(sc + c), _mm512_loadu_ps(bi + c)));
      }
      for (; c < d; ++c) o[c] = static_cast<float>(CodeAt(row, B, c)) * sc[c] + bi[c];
    }
    return;
  }
  // Per-token groups, group size a multiple of 16. The metadata of a run of tokens is
  // converted to fp32 first, 16 at a time.
  constexpr int64_t kMeta = 1024;
  alignas(64) float sbuf[kMeta + 16], bbuf[kMeta + 16];
  const int64_t ng = L.ng;
  const int64_t run = std::max<int64_t>(1, kMeta / ng);
  for (int64_t r0 = t0; r0 < t1; r0 += run) {
    const int64_t r1 = std::min(t1, r0 + run);
    const int64_t m0 = r0 * ng, nm = (r1 - r0) * ng;
    int64_t i = 0;
    for (; i + 16 <= nm; i += 16) {
      const __m512 sv = _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + 2 * (m0 + i))));
      _mm512_store_ps(sbuf + i, sv);
      _mm512_store_ps(bbuf + i, L.sym
                                    ? _mm512_mul_ps(sv, _mm512_set1_ps(-L.offset))
                                    : _mm512_cvtph_ps(_mm256_loadu_si256(
                                          reinterpret_cast<const __m256i*>(mins + 2 * (m0 + i)))));
    }
    for (; i < nm; ++i) {
      sbuf[i] = _cvtsh_ss(LoadU16(scales + 2 * (m0 + i)));
      bbuf[i] = L.sym ? -L.offset * sbuf[i] : _cvtsh_ss(LoadU16(mins + 2 * (m0 + i)));
    }
    for (int64_t t = r0; t < r1; ++t) {
      const uint8_t* row = slab + t * L.row_bytes;
      float* o = out + (t - t0) * d;
      const float* sm = sbuf + (t - r0) * ng;
      const float* bm = bbuf + (t - r0) * ng;
      for (int64_t g = 0; g < ng; ++g) {
        const __m512 s = _mm512_set1_ps(sm[g]);
        const __m512 b = _mm512_set1_ps(bm[g]);
        for (int64_t c = g * L.gs; c < (g + 1) * L.gs; c += 16) {
          const __m512 q = _mm512_cvtepi32_ps(Codes16<B>(row, c));
          _mm512_storeu_ps(o + c, _mm512_fmadd_ps(q, s, b));
        }
      }
    }
  }
}

// Codes of channels [c, c + 8) (c a multiple of 8) as int32 lanes.
template <int B>
QKV_CODEC_AVX2 inline __m256i Codes8(const uint8_t* row, int64_t c) {
  if constexpr (B == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c)));
  } else if constexpr (B == 4) {
    const __m256i v = _mm256_set1_epi32(static_cast<int>(LoadU32(row + c / 2)));
    return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                            _mm256_set1_epi32(0xf));
  } else if constexpr (B == 2) {
    const __m256i v = _mm256_set1_epi32(static_cast<int>(LoadU16(row + c / 4)));
    return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                            _mm256_set1_epi32(0x3));
  } else {
    const __m256i v = _mm256_set1_epi32(static_cast<int>(Load24(row + c / 8 * 3)));
    return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21)),
                            _mm256_set1_epi32(0x7));
  }
}

template <int B>
QKV_CODEC_AVX2 void DecodeAvx2(const Layout& L, const uint8_t* slab, int64_t t0, int64_t t1,
                               float* out) {
  const uint8_t* scales = slab + L.codes_bytes;
  const uint8_t* mins = scales + 2 * L.n_meta;
  const int64_t d = L.d;
  if (L.per_channel) {
    const ChannelAffine affine(L, slab);
    const float* sc = affine.scale();
    const float* bi = affine.bias();
    int64_t c = 0;
    const int64_t d8 = d / 8 * 8;
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* row = slab + t * L.row_bytes;
      float* o = out + (t - t0) * d;
      for (c = 0; c < d8; c += 8) {
        const __m256 q = _mm256_cvtepi32_ps(Codes8<B>(row, c));
        _mm256_storeu_ps(o + c,
                         _mm256_fmadd_ps(q, _mm256_loadu_ps(sc + c), _mm256_loadu_ps(bi + c)));
      }
      for (; c < d; ++c) o[c] = static_cast<float>(CodeAt(row, B, c)) * sc[c] + bi[c];
    }
    return;
  }
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* row = slab + t * L.row_bytes;
    float* o = out + (t - t0) * d;
    for (int64_t g = 0; g < L.ng; ++g) {
      const int64_t m = t * L.ng + g;
      const float sf = _cvtsh_ss(LoadU16(scales + 2 * m));
      const __m256 s = _mm256_set1_ps(sf);
      const __m256 b = _mm256_set1_ps(L.sym ? -L.offset * sf : _cvtsh_ss(LoadU16(mins + 2 * m)));
      for (int64_t c = g * L.gs; c < (g + 1) * L.gs; c += 8) {
        const __m256 q = _mm256_cvtepi32_ps(Codes8<B>(row, c));
        _mm256_storeu_ps(o + c, _mm256_fmadd_ps(q, s, b));
      }
    }
  }
}

using DecodeFn = void (*)(const Layout&, const uint8_t*, int64_t, int64_t, float*);

template <template <int> class Pick>
DecodeFn ForBits(int bits) {
  switch (bits) {
    case 8:
      return Pick<8>::fn;
    case 4:
      return Pick<4>::fn;
    case 3:
      return Pick<3>::fn;
    default:
      return Pick<2>::fn;
  }
}
template <int B>
struct PickScalar {
  static constexpr DecodeFn fn = &DecodeScalar<B>;
};
template <int B>
struct PickAvx512 {
  static constexpr DecodeFn fn = &DecodeAvx512<B>;
};
template <int B>
struct PickAvx2 {
  static constexpr DecodeFn fn = &DecodeAvx2<B>;
};

// ---------------------------------------------------------------- codec
class UniformCodec final : public KvCodec {
 public:
  explicit UniformCodec(const KvCodecConfig& config)
      : KvCodec(config.spec, config.head_dim, config.block_tokens) {
    const KvCodecSpec& spec = config.spec;
    const int64_t head_dim = config.head_dim;
    const int64_t block_tokens = config.block_tokens;
    L_.bits = spec.bits;
    L_.sym = spec.symmetric;
    switch (spec.granularity) {
      case KvGranularity::kPerChannel:
        L_.meta = MetaKind::kChannel;
        break;
      case KvGranularity::kPerBlock:
        L_.meta = MetaKind::kBlock;
        break;
      case KvGranularity::kStatic:
        L_.meta = MetaKind::kStatic;
        break;
      default:
        L_.meta = MetaKind::kTokenGroup;
    }
    L_.per_channel = L_.meta != MetaKind::kTokenGroup;
    L_.d = head_dim;
    L_.bt = block_tokens;
    L_.gs = L_.per_channel ? head_dim : spec.group_size;
    L_.ng = head_dim / L_.gs;
    L_.row_bytes = head_dim * spec.bits / 8;
    L_.codes_bytes = block_tokens * L_.row_bytes;
    L_.n_meta = L_.meta == MetaKind::kChannel  ? head_dim
                : L_.meta == MetaKind::kBlock  ? 1
                : L_.meta == MetaKind::kStatic ? 0
                                               : block_tokens * L_.ng;
    L_.offset = L_.sym ? static_cast<float>(1 << (spec.bits - 1)) : 0.0f;
    if (L_.meta == MetaKind::kStatic) {
      // Scales as calibrated (fp32: they are per model, not per token, so cost no bits).
      static_scale_ = config.static_scale;
      static_bias_.resize(static_cast<size_t>(head_dim));
      for (int64_t c = 0; c < head_dim; ++c) {
        static_bias_[c] = L_.sym ? -L_.offset * static_scale_[c] : config.static_min[c];
      }
      L_.static_scale = static_scale_.data();
      L_.static_bias = static_bias_.data();
    }
    clip_model_ = config.clip_model;
    const int isa = KvCodecIsa();
    decode_ = ForBits<PickScalar>(L_.bits);
    if (isa >= 2 && (L_.per_channel || L_.gs % 16 == 0)) {
      decode_ = ForBits<PickAvx512>(L_.bits);
    } else if (isa >= 1 && (L_.per_channel || L_.gs % 8 == 0)) {
      decode_ = ForBits<PickAvx2>(L_.bits);
    }
  }

  int64_t slab_bytes() const override { return L_.codes_bytes + (L_.sym ? 2 : 4) * L_.n_meta; }

  void Encode(const float* x, uint8_t* slab) const override {
    const int64_t d = L_.d;
    uint8_t* scales = slab + L_.codes_bytes;
    uint8_t* mins = scales + 2 * L_.n_meta;
    const float clip = spec().clip;
    std::vector<uint8_t> q(static_cast<size_t>(d));
    if (L_.per_channel) {
      std::vector<Quantizer> qz;
      qz.reserve(static_cast<size_t>(d));
      if (L_.meta == MetaKind::kStatic) {
        for (int64_t c = 0; c < d; ++c) qz.emplace_back(L_, static_scale_[c], static_bias_[c]);
      } else {
        // Column statistics (NaN-blind), then one quantizer per channel (or one for all).
        std::vector<float> lo(static_cast<size_t>(d), 0.0f), hi(static_cast<size_t>(d), 0.0f);
        std::vector<char> seen(static_cast<size_t>(d), 0);
        for (int64_t t = 0; t < L_.bt; ++t) {
          const float* r = x + t * d;
          for (int64_t c = 0; c < d; ++c) {
            if (!(r[c] == r[c])) continue;
            if (!seen[c]) {
              lo[c] = hi[c] = r[c];
              seen[c] = 1;
            }
            lo[c] = std::min(lo[c], r[c]);
            hi[c] = std::max(hi[c], r[c]);
          }
        }
        if (L_.meta == MetaKind::kBlock) {
          float blo = 0.0f, bhi = 0.0f;
          bool any = false;
          for (int64_t c = 0; c < d; ++c) {
            if (!seen[c]) continue;
            blo = any ? std::min(blo, lo[c]) : lo[c];
            bhi = any ? std::max(bhi, hi[c]) : hi[c];
            any = true;
          }
          const Meta m = ComputeMeta(L_, clip, blo, bhi);
          StoreU16(scales, m.scale);
          if (!L_.sym) StoreU16(mins, m.min);
          qz.assign(static_cast<size_t>(d), Quantizer(L_, m));
        } else {
          for (int64_t c = 0; c < d; ++c) {
            const Meta m = ComputeMeta(L_, clip, lo[c], hi[c]);
            StoreU16(scales + 2 * c, m.scale);
            if (!L_.sym) StoreU16(mins + 2 * c, m.min);
            qz.emplace_back(L_, m);
          }
        }
      }
      for (int64_t t = 0; t < L_.bt; ++t) {
        const float* r = x + t * d;
        for (int64_t c = 0; c < d; ++c) q[c] = qz[c](r[c]);
        PackRow(q.data(), L_.bits, d, slab + t * L_.row_bytes);
      }
      return;
    }
    for (int64_t t = 0; t < L_.bt; ++t) {
      const float* r = x + t * d;
      for (int64_t g = 0; g < L_.ng; ++g) {
        const float* v = r + g * L_.gs;
        float lo = 0.0f, hi = 0.0f;
        bool seen = false;
        for (int64_t c = 0; c < L_.gs; ++c) {
          if (!(v[c] == v[c])) continue;
          if (!seen) {
            lo = hi = v[c];
            seen = true;
          }
          lo = std::min(lo, v[c]);
          hi = std::max(hi, v[c]);
        }
        float group_clip = clip;
        if (!clip_model_.empty()) {
          float f[kClipFeatures];
          ClipFeatures(v, L_.gs, f);
          group_clip = PredictClip(clip_model_.data(), f);
        }
        const Meta m = ComputeMeta(L_, group_clip, lo, hi);
        const int64_t mi = t * L_.ng + g;
        StoreU16(scales + 2 * mi, m.scale);
        if (!L_.sym) StoreU16(mins + 2 * mi, m.min);
        const Quantizer qz(L_, m);
        for (int64_t c = 0; c < L_.gs; ++c) q[g * L_.gs + c] = qz(v[c]);
      }
      PackRow(q.data(), L_.bits, d, slab + t * L_.row_bytes);
    }
  }

  void Decode(const uint8_t* slab, int64_t t0, int64_t t1, float* out) const override {
    if (t1 <= t0) return;
    decode_(L_, slab, t0, t1, out);
  }

 private:
  Layout L_{};
  DecodeFn decode_ = nullptr;
  std::vector<float> static_scale_, static_bias_;
  std::vector<float> clip_model_;  // learnclip: per-group clip ratios from this model
};

}  // namespace

std::unique_ptr<KvCodec> MakeUniformCodec(const KvCodecConfig& config) {
  return std::make_unique<UniformCodec>(config);
}

}  // namespace kv_codec_internal
}  // namespace quantkv::kernels
