// Per-element GGML block decoding for the CUDA dequantizer (kernels/cuda/dequantize.cu).
// Written independently of the block-wise CPU reference (kernels/cpu/dequantize.cc) and compiled
// for both host and device, so that a CPU-only unit test can check every element of every type
// against the reference even on machines without a GPU; the device build differs only in the
// conversion intrinsics used.
//
// Arithmetic uses explicit round-to-nearest multiply/add on the device because nvcc would
// otherwise contract d * q + m into an FMA and break bit-exactness with the CPU.
#pragma once

#include <cstdint>

#include "kernels/fp16.h"
#include "kernels/ggml_types.h"

#include "kernels/host_device_math.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace quantkv::kernels::cuda::detail {

using hd::Add;
using hd::BitsFromFloat;
using hd::FloatFromBits;
using hd::Mul;
using hd::Sub;

QKV_HD uint32_t Byte(const uint8_t* p, int i) { return p[i]; }

// Block fields are only guaranteed byte-aligned (e.g. Q5_0's qh at offset 2 of a 22-byte block).
QKV_HD uint32_t LoadU16(const uint8_t* p) { return p[0] | (static_cast<uint32_t>(p[1]) << 8); }

QKV_HD float HalfToFloat(uint32_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
#else
  return Fp16ToFp32(static_cast<uint16_t>(h));
#endif
}

// Same rounding and NaN handling as Fp32ToBf16 in kernels/fp16.h.
QKV_HD uint16_t FloatToBf16Bits(float f) {
  const uint32_t x = BitsFromFloat(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Sub-block j's 6-bit scale (min when `want_min`) from the 12 packed K-quant scale bytes.
QKV_HD uint32_t ScaleMinK4(int j, const uint8_t* q, bool want_min) {
  if (j < 4) return want_min ? (q[j + 4] & 63u) : (q[j] & 63u);
  return want_min ? ((q[j + 4] >> 4) | ((q[j] >> 6) << 4))
                  : ((q[j + 4] & 0x0fu) | ((q[j - 4] >> 6) << 4));
}

// Compile-time block geometry per type, matching the type table in kernels/ggml_types.cc.
template <GgmlType T>
struct Block;
template <>
struct Block<GgmlType::kF32> {
  static constexpr int kElems = 1, kBytes = 4;
};
template <>
struct Block<GgmlType::kF16> {
  static constexpr int kElems = 1, kBytes = 2;
};
template <>
struct Block<GgmlType::kBF16> {
  static constexpr int kElems = 1, kBytes = 2;
};
template <>
struct Block<GgmlType::kQ4_0> {
  static constexpr int kElems = 32, kBytes = 18;
};
template <>
struct Block<GgmlType::kQ4_1> {
  static constexpr int kElems = 32, kBytes = 20;
};
template <>
struct Block<GgmlType::kQ5_0> {
  static constexpr int kElems = 32, kBytes = 22;
};
template <>
struct Block<GgmlType::kQ5_1> {
  static constexpr int kElems = 32, kBytes = 24;
};
template <>
struct Block<GgmlType::kQ8_0> {
  static constexpr int kElems = 32, kBytes = 34;
};
template <>
struct Block<GgmlType::kQ4_K> {
  static constexpr int kElems = 256, kBytes = 144;
};
template <>
struct Block<GgmlType::kQ5_K> {
  static constexpr int kElems = 256, kBytes = 176;
};
template <>
struct Block<GgmlType::kQ6_K> {
  static constexpr int kElems = 256, kBytes = 210;
};

// Element j (0 <= j < Block<T>::kElems) of the block starting at b.
template <GgmlType T>
QKV_HD float DecodeElement(const uint8_t* b, int j) {
  if constexpr (T == GgmlType::kF32) {
    return FloatFromBits(LoadU16(b) | (LoadU16(b + 2) << 16));
  } else if constexpr (T == GgmlType::kF16) {
    return HalfToFloat(LoadU16(b));
  } else if constexpr (T == GgmlType::kBF16) {
    return FloatFromBits(LoadU16(b) << 16);
  } else if constexpr (T == GgmlType::kQ8_0) {
    return Mul(static_cast<float>(static_cast<int8_t>(b[2 + j])), HalfToFloat(LoadU16(b)));
  } else if constexpr (T == GgmlType::kQ4_0 || T == GgmlType::kQ4_1 || T == GgmlType::kQ5_0 ||
                       T == GgmlType::kQ5_1) {
    // Legacy 32-element blocks: byte j % 16 of qs, low nibble for j < 16, high for j >= 16;
    // the 5-bit types keep bit j of the little-endian 32-bit qh as the fifth bit.
    constexpr bool kHasMin = T == GgmlType::kQ4_1 || T == GgmlType::kQ5_1;
    constexpr bool kFiveBit = T == GgmlType::kQ5_0 || T == GgmlType::kQ5_1;
    constexpr int kQsOffset = 2 + (kHasMin ? 2 : 0) + (kFiveBit ? 4 : 0);
    const uint32_t byte = Byte(b + kQsOffset, j & 15);
    uint32_t q = j < 16 ? (byte & 0x0fu) : (byte >> 4);
    if constexpr (kFiveBit) {
      const uint8_t* qh = b + 2 + (kHasMin ? 2 : 0);
      q |= ((Byte(qh, j >> 3) >> (j & 7)) & 1u) << 4;
    }
    const float d = HalfToFloat(LoadU16(b));
    if constexpr (kHasMin) {
      return Add(Mul(static_cast<float>(q), d), HalfToFloat(LoadU16(b + 2)));
    } else {
      constexpr int kZero = kFiveBit ? 16 : 8;
      return Mul(static_cast<float>(static_cast<int>(q) - kZero), d);
    }
  } else if constexpr (T == GgmlType::kQ4_K || T == GgmlType::kQ5_K) {
    // 8 sub-blocks of 32; each 64 elements share 32 qs bytes (low nibbles first, then high).
    const int sub = j >> 5;
    const int l = j & 31;
    constexpr int kQsOffset = T == GgmlType::kQ5_K ? 48 : 16;
    const uint32_t byte = Byte(b + kQsOffset, (sub >> 1) * 32 + l);
    uint32_t q = (sub & 1) ? (byte >> 4) : (byte & 0x0fu);
    if constexpr (T == GgmlType::kQ5_K) q += ((Byte(b + 16, l) >> sub) & 1u) << 4;
    const float d = Mul(HalfToFloat(LoadU16(b)), static_cast<float>(ScaleMinK4(sub, b + 4, false)));
    const float m =
        Mul(HalfToFloat(LoadU16(b + 2)), static_cast<float>(ScaleMinK4(sub, b + 4, true)));
    return Sub(Mul(d, static_cast<float>(q)), m);
  } else if constexpr (T == GgmlType::kQ6_K) {
    // Two halves of 128; quarter k of a half takes nibble (k >> 1) of ql[l + 32 * (k & 1)] and
    // bits 2k..2k+1 of qh[l]; its 16-element groups use scales 8h + l / 16 + 2k.
    const int half = j >> 7;
    const int k = (j >> 5) & 3;
    const int l = j & 31;
    const uint32_t lo_byte = Byte(b, half * 64 + (k & 1) * 32 + l);
    const uint32_t lo = (k >> 1) ? (lo_byte >> 4) : (lo_byte & 0x0fu);
    const uint32_t hi = (Byte(b + 128, half * 32 + l) >> (2 * k)) & 3u;
    const int q = static_cast<int>(lo | (hi << 4)) - 32;
    const int scale = static_cast<int8_t>(b[192 + half * 8 + l / 16 + 2 * k]);
    return Mul(Mul(HalfToFloat(LoadU16(b + 208)), static_cast<float>(scale)),
               static_cast<float>(q));
  } else {
    static_assert(T != T, "no element decoder for this ggml type");
  }
}

}  // namespace quantkv::kernels::cuda::detail
