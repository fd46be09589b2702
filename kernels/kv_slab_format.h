// The byte layout of one KV head slab (kernels/kv_codec.h) as plain data, for code that
// cannot hold a KvCodec object: CUDA kernels encode and read slabs through it, bit for bit
// the layouts of kernels/cpu/kv_codec_float.cc and kernels/cpu/kv_codec_uniform.cc. Covers
// fp32 / fp16 / bf16, fp8-e4m3 per token group and the uniform integer codecs (8/4/3/2
// bits, symmetric or asymmetric, per token group, per channel or per block) without
// promoted rows, outliers, residuals or learned clipping; KvSlabFormatOf names what else
// it refuses.
//
// The element decoders are inline and compile for host and device alike (QKV_HD), so the
// CPU tests check them against KvCodec::Decode on machines without a GPU.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "kernels/host_device_math.h"
#include "kernels/kv_codec.h"

namespace quantkv::kernels {

enum class KvSlabKind : uint8_t { kF32, kF16, kBF16, kFp8E4M3, kUniform };
enum class KvSlabMeta : uint8_t { kTokenGroup, kChannel, kBlock };

struct KvSlabFormat {
  KvSlabKind kind = KvSlabKind::kF16;
  KvSlabMeta meta = KvSlabMeta::kTokenGroup;  // kUniform; kFp8E4M3 is always per token group
  int bits = 16;                              // kUniform: 8, 4, 3 or 2
  bool symmetric = false;                     // kUniform
  float clip = 1.0f;                          // encoder's clip ratio (KvCodecSpec::clip)
  int head_dim = 0;
  int block_tokens = 0;
  int group_size = 0;   // channels per scale (head_dim for kChannel / kBlock)
  int n_groups = 0;     // head_dim / group_size
  int row_bytes = 0;    // code bytes of one token
  int codes_bytes = 0;  // block_tokens * row_bytes
  int n_meta = 0;       // fp16 scales (and as many minima when asymmetric) after the codes
  int slab_bytes = 0;   // everything
};

// The format of `spec` at this geometry; UNIMPLEMENTED naming the part of the spec that has
// no plain-data layout here (ggml types, codebooks, product quantization, static scales,
// promoted rows, outliers, low-rank or mean residuals, learned clipping, drop).
absl::StatusOr<KvSlabFormat> KvSlabFormatOf(const KvCodecSpec& spec, int64_t head_dim,
                                            int64_t block_tokens);

namespace slab {

using hd::Add;
using hd::Div;
using hd::Fma;
using hd::LoadU16;
using hd::Mul;
using hd::Sub;
QKV_HD float F32FromBits(uint32_t b) { return hd::FloatFromBits(b); }
QKV_HD uint32_t F32Bits(float f) { return hd::BitsFromFloat(f); }

// IEEE half -> float, exact (subnormals included).
QKV_HD float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Subnormal: mant * 2^-24, exact in float.
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exp == 0x1f) return F32FromBits(sign | 0x7f800000u | (mant << 13));
  return F32FromBits(sign | ((exp + 112u) << 23) | (mant << 13));
}

// OCP E4M3 code -> float (bias 7, no infinities, S.1111.111 is NaN).
QKV_HD float E4M3ToFloat(uint8_t c) {
  const uint32_t exp = (c >> 3) & 0xfu;
  const uint32_t mant = c & 0x7u;
  float v;
  if (exp == 0xf && mant == 0x7) {
    v = F32FromBits(0x7fc00000u);
  } else if (exp == 0) {
    v = static_cast<float>(mant) * 0.001953125f;  // mant / 8 * 2^-6
  } else {
    v = F32FromBits(((exp + 120u) << 23) | (mant << 20));
  }
  return (c & 0x80u) ? -v : v;
}

// Code of channel c in a packed row of `bits`-bit codes.
QKV_HD int CodeAt(const uint8_t* row, int bits, int c) {
  switch (bits) {
    case 8:
      return row[c];
    case 4:
      return (row[c >> 1] >> ((c & 1) * 4)) & 0xf;
    case 2:
      return (row[c >> 2] >> ((c & 3) * 2)) & 0x3;
    default: {
      const uint8_t* w = row + 3 * (c >> 3);
      const uint32_t word = static_cast<uint32_t>(w[0]) | static_cast<uint32_t>(w[1]) << 8 |
                            static_cast<uint32_t>(w[2]) << 16;
      return static_cast<int>((word >> (3 * (c & 7))) & 0x7u);
    }
  }
}

// x = scale * code + bias for a uniform slab's token t, channel c.
struct Affine {
  float scale, bias;
};
QKV_HD Affine AffineOf(const KvSlabFormat& f, const uint8_t* slab, int t, int c) {
  int m = 0;
  if (f.meta == KvSlabMeta::kTokenGroup) {
    m = t * f.n_groups + c / f.group_size;
  } else if (f.meta == KvSlabMeta::kChannel) {
    m = c;
  }
  const uint8_t* scales = slab + f.codes_bytes;
  const float s = HalfToFloat(LoadU16(scales + 2 * m));
  if (f.symmetric) return {s, -static_cast<float>(1 << (f.bits - 1)) * s};
  return {s, HalfToFloat(LoadU16(scales + 2 * f.n_meta + 2 * m))};
}

// Value of token t (0 <= t < block_tokens), channel c of a slab; what KvCodec::Decode gives.
QKV_HD float DecodeElement(const KvSlabFormat& f, const uint8_t* slab, int t, int c) {
  switch (f.kind) {
    case KvSlabKind::kF32:
      return F32FromBits(static_cast<uint32_t>(LoadU16(slab + 4 * (t * f.head_dim + c))) |
                         static_cast<uint32_t>(LoadU16(slab + 4 * (t * f.head_dim + c) + 2)) << 16);
    case KvSlabKind::kF16:
      return HalfToFloat(LoadU16(slab + 2 * (t * f.head_dim + c)));
    case KvSlabKind::kBF16:
      return F32FromBits(static_cast<uint32_t>(LoadU16(slab + 2 * (t * f.head_dim + c))) << 16);
    case KvSlabKind::kFp8E4M3: {
      const float s =
          HalfToFloat(LoadU16(slab + f.codes_bytes + 2 * (t * f.n_groups + c / f.group_size)));
      return E4M3ToFloat(slab[t * f.row_bytes + c]) * s;
    }
    case KvSlabKind::kUniform:
    default: {
      const Affine a = AffineOf(f, slab, t, c);
      return Fma(static_cast<float>(CodeAt(slab + t * f.row_bytes, f.bits, c)), a.scale, a.bias);
    }
  }
}

// ---------------------------------------------------------------- encoding
// What KvCodec::Encode computes, one rounded operation at a time: nvcc would contract
// a * b + c into an FMA (one rounding) where the CPU encoders round twice, so device code
// spells every operation as an _rn intrinsic. The CPU test runs the same functions on the
// host against the codecs.

// std::max / std::min exactly: NaN in `b` loses to `a`, and equal values (+0, -0) keep `a`.
QKV_HD float MaxOf(float a, float b) { return a < b ? b : a; }
QKV_HD float MinOf(float a, float b) { return b < a ? b : a; }
QKV_HD float AbsOf(float f) { return F32FromBits(F32Bits(f) & 0x7fffffffu); }

QKV_HD void StoreU16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}

// float -> IEEE half, round to nearest even, as Fp32ToFp16Row (F16C) gives it: overflow to
// infinity, NaN quietened with the top of its payload kept (Fp32ToFp16's 0x7e00 for the
// usual quiet NaN).
QKV_HD uint16_t HalfFromFloat(float f) {
  const uint32_t x = F32Bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // Inf, overflow
  if (abs < 0x38800000u) {
    // Half subnormal or zero: adding 0.5 rounds at the half subnormal step (2^-24).
    const float magic = F32FromBits(0x3f000000u);
    const float v = Add(F32FromBits(abs), magic);
    return static_cast<uint16_t>(sign | (F32Bits(v) - F32Bits(magic)));
  }
  const uint32_t mant_odd = (abs >> 13) & 1u;
  return static_cast<uint16_t>(sign | ((abs + 0xc8000fffu + mant_odd) >> 13));
}

// float -> bfloat16 as Fp32ToBf16.
QKV_HD uint16_t Bf16FromFloat(float f) {
  const uint32_t x = F32Bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Fp16RoundUp of kv_codec_uniform.cc: smallest half >= v (v >= 0; NaN -> 0), at most 65504.
QKV_HD uint16_t HalfRoundUp(float v) {
  if (!(v > 0.0f)) return 0;
  if (v >= 65504.0f) return 0x7bff;
  uint16_t h = HalfFromFloat(v);
  if (HalfToFloat(h) < v) ++h;
  return h;
}

// Fp16RoundDown: largest half <= v after clamping v to +-65504 (NaN -> 0).
QKV_HD uint16_t HalfRoundDown(float v) {
  if (!(v == v)) return 0;
  v = v < -65504.0f ? -65504.0f : 65504.0f < v ? 65504.0f : v;  // std::clamp
  uint16_t h = HalfFromFloat(v);
  if (HalfToFloat(h) > v) {
    if (h == 0) {
      h = 0x8001;  // a tiny negative rounded to +0
    } else if (h & 0x8000u) {
      ++h;
    } else {
      --h;
    }
  }
  return h;
}

// Fp32ToE4M3 of kv_codec_float.cc: round to nearest even, saturating at 448, NaN -> S.1111.111.
QKV_HD uint8_t E4M3FromFloat(float v) {
  const uint32_t bits = F32Bits(v);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint8_t>(sign | 0x7fu);
  const float a = F32FromBits(abs);
  if (a >= 448.0f) return static_cast<uint8_t>(sign | 0x7eu);
  if (a < 0.015625f) {  // subnormal steps of 2^-9; a * 512 is exact
#if defined(__CUDA_ARCH__)
    const int q = __float2int_rn(a * 512.0f);
#else
    const int q = static_cast<int>(__builtin_rintf(a * 512.0f));
#endif
    return static_cast<uint8_t>(sign | static_cast<uint32_t>(q));
  }
  const uint32_t r = (abs + 0x7ffffu + ((abs >> 20) & 1u)) >> 20;
  const uint32_t code = r - (120u << 3) < 0x7eu ? r - (120u << 3) : 0x7eu;
  return static_cast<uint8_t>(sign | code);
}

// Min and max of the non-NaN values seen, in the order seen (the CPU's loops; the order
// decides between +0 and -0).
struct Range {
  float lo = 0.0f, hi = 0.0f;
  bool seen = false;
  QKV_HD void Add(float x) {
    if (!(x == x)) return;
    if (!seen) {
      lo = hi = x;
      seen = true;
    }
    lo = MinOf(lo, x);
    hi = MaxOf(hi, x);
  }
};

// ComputeMeta of kv_codec_uniform.cc: fp16 scale (and minimum) for data in [lo, hi].
struct Meta16 {
  uint16_t scale, min;
};
QKV_HD Meta16 UniformMeta(const KvSlabFormat& f, float lo, float hi) {
  const float levels = static_cast<float>((1 << f.bits) - 1);
  const float clip = f.clip;
  if (f.symmetric) {
    const float amax = MaxOf(AbsOf(lo), AbsOf(hi));
    const float qmax = static_cast<float>((1 << (f.bits - 1)) - 1);
    return {HalfRoundUp(Div(Mul(clip, amax), qmax)), 0};
  }
  if (clip < 1.0f) {
    const float mid = Add(lo, Mul(0.5f, Sub(hi, lo)));
    const float half = Mul(Mul(0.5f, clip), Sub(hi, lo));
    lo = Sub(mid, half);
    hi = Add(mid, half);
  }
  const uint16_t mh = HalfRoundDown(lo);
  return {HalfRoundUp(Div(Sub(hi, HalfToFloat(mh)), levels)), mh};
}

// The Quantizer of kv_codec_uniform.cc for one stored (scale, min).
struct Quantizer {
  float inv, base, top, lo_code;
  QKV_HD Quantizer(const KvSlabFormat& f, uint16_t scale, uint16_t min) {
    const float s = HalfToFloat(scale);
    inv = s > 0.0f ? Div(1.0f, s) : 0.0f;
    base = f.symmetric ? Mul(-static_cast<float>(1 << (f.bits - 1)), s) : HalfToFloat(min);
    top = static_cast<float>((1 << f.bits) - 1);
    lo_code = f.symmetric ? 1.0f : 0.0f;
  }
  QKV_HD uint32_t operator()(float x) const {
    const float v = MinOf(MaxOf(lo_code, Mul(Sub(x, base), inv)), top);  // NaN -> lo_code
    return static_cast<uint32_t>(static_cast<int>(Add(v, 0.5f)));
  }
};

// Encoding a slab as passes of independent items: a CUDA thread block spreads each pass's
// items over its threads with a barrier after each pass; the CPU test runs them in order.
//   pass 0  float kinds: one element each (bt * d); fp8: one token group each, scale and
//           codes (bt * n_groups); uniform: the metadata of one token group (bt * n_groups)
//           or one channel (d); per block: one channel's range into `scratch`
//   pass 1  per block only: the block's metadata from `scratch` (one item)
//   pass 2  uniform: one packed unit of codes (1, 2, 4 or 8 channels) of one token, read
//           against the metadata the slab holds after pass 0 / 1
// `scratch` holds 2 * head_dim floats (per block only). x(t, c) is the block's token t,
// channel c. The slab may be at any byte address.
constexpr int kEncodePasses = 3;

QKV_HD int UnitChannels(int bits) { return bits == 3 ? 8 : 8 / bits; }

QKV_HD int64_t EncodeItems(const KvSlabFormat& f, int pass) {
  const int64_t bt = f.block_tokens, d = f.head_dim;
  if (f.kind != KvSlabKind::kUniform) {
    if (pass != 0) return 0;
    return f.kind == KvSlabKind::kFp8E4M3 ? bt * f.n_groups : bt * d;
  }
  switch (pass) {
    case 0:
      return f.meta == KvSlabMeta::kTokenGroup ? bt * f.n_groups : d;
    case 1:
      return f.meta == KvSlabMeta::kBlock ? 1 : 0;
    default:
      return bt * (d / UnitChannels(f.bits));
  }
}

template <class Rows>
QKV_HD void EncodeItem(const KvSlabFormat& f, const Rows& x, uint8_t* slab, float* scratch,
                       int pass, int64_t item) {
  const int d = f.head_dim;
  uint8_t* scales = slab + f.codes_bytes;
  uint8_t* mins = scales + 2 * f.n_meta;
  switch (f.kind) {
    case KvSlabKind::kF32:
    case KvSlabKind::kF16:
    case KvSlabKind::kBF16: {
      const int t = static_cast<int>(item / d), c = static_cast<int>(item % d);
      const float v = x(t, c);
      if (f.kind == KvSlabKind::kF32) {
        const uint32_t b = F32Bits(v);
        StoreU16(slab + 4 * item, static_cast<uint16_t>(b));
        StoreU16(slab + 4 * item + 2, static_cast<uint16_t>(b >> 16));
      } else {
        StoreU16(slab + 2 * item, f.kind == KvSlabKind::kF16 ? HalfFromFloat(v) : Bf16FromFloat(v));
      }
      return;
    }
    case KvSlabKind::kFp8E4M3: {
      const int t = static_cast<int>(item / f.n_groups), k = static_cast<int>(item % f.n_groups);
      const int c0 = k * f.group_size;
      float amax = 0.0f;
      for (int c = c0; c < c0 + f.group_size; ++c) amax = MaxOf(amax, AbsOf(x(t, c)));
      const uint16_t sh = HalfRoundUp(Div(Mul(f.clip, amax), 448.0f));
      StoreU16(scales + 2 * item, sh);
      const float s = HalfToFloat(sh);
      const float inv = s > 0.0f ? Div(1.0f, s) : 0.0f;
      uint8_t* q = slab + t * f.row_bytes;
      for (int c = c0; c < c0 + f.group_size; ++c) q[c] = E4M3FromFloat(Mul(x(t, c), inv));
      return;
    }
    case KvSlabKind::kUniform:
    default:
      break;
  }
  if (pass == 0) {
    Range r;
    int64_t m = item;
    if (f.meta == KvSlabMeta::kTokenGroup) {
      const int t = static_cast<int>(item / f.n_groups);
      const int c0 = static_cast<int>(item % f.n_groups) * f.group_size;
      for (int c = c0; c < c0 + f.group_size; ++c) r.Add(x(t, c));
    } else {
      const int c = static_cast<int>(item);
      for (int t = 0; t < f.block_tokens; ++t) r.Add(x(t, c));
      if (f.meta == KvSlabMeta::kBlock) {
        // NaN marks a channel with no value (a seen channel's range is never NaN).
        scratch[2 * c] = r.seen ? r.lo : F32FromBits(0x7fc00000u);
        scratch[2 * c + 1] = r.hi;
        return;
      }
    }
    const Meta16 mt = UniformMeta(f, r.lo, r.hi);
    StoreU16(scales + 2 * m, mt.scale);
    if (!f.symmetric) StoreU16(mins + 2 * m, mt.min);
    return;
  }
  if (pass == 1) {
    float blo = 0.0f, bhi = 0.0f;
    bool any = false;
    for (int c = 0; c < d; ++c) {
      const float lo = scratch[2 * c], hi = scratch[2 * c + 1];
      if (!(lo == lo)) continue;
      blo = any ? MinOf(blo, lo) : lo;
      bhi = any ? MaxOf(bhi, hi) : hi;
      any = true;
    }
    const Meta16 mt = UniformMeta(f, blo, bhi);
    StoreU16(scales, mt.scale);
    if (!f.symmetric) StoreU16(mins, mt.min);
    return;
  }
  const int per_unit = UnitChannels(f.bits);
  const int units = d / per_unit;
  const int t = static_cast<int>(item / units), u = static_cast<int>(item % units);
  uint32_t w = 0;
  for (int k = 0; k < per_unit; ++k) {
    const int c = u * per_unit + k;
    const int m = f.meta == KvSlabMeta::kTokenGroup ? t * f.n_groups + c / f.group_size
                  : f.meta == KvSlabMeta::kChannel  ? c
                                                    : 0;
    const Quantizer qz(f, LoadU16(scales + 2 * m), f.symmetric ? 0 : LoadU16(mins + 2 * m));
    w |= qz(x(t, c)) << (f.bits * k);
  }
  uint8_t* out = slab + t * f.row_bytes + (f.bits == 3 ? 3 * u : u);
  out[0] = static_cast<uint8_t>(w);
  if (f.bits == 3) {
    out[1] = static_cast<uint8_t>(w >> 8);
    out[2] = static_cast<uint8_t>(w >> 16);
  }
}

}  // namespace slab
}  // namespace quantkv::kernels
