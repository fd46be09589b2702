// CPU reference dequantizers. Each block decoder follows ggml's dequantize_row_* element order
// and arithmetic order (e.g. (d * scale) * q - (dmin * min), no fused multiply-add) so results
// are bit-identical to ggml / gguf-py; the library is built without -mfma and with
// -ffp-contract=off (ISO C++ mode), so the compiler does not fuse these either.
#include "kernels/dequantize.h"

#include <immintrin.h>

#include <cstring>

#include "absl/strings/str_format.h"
#include "kernels/fp16.h"
#include "runtime/util/status_macros.h"

namespace quantkv::kernels {
namespace {

constexpr int kQK = 32;     // elements per legacy (Q4_0 .. Q8_0) block
constexpr int kQK_K = 256;  // elements per K-quant super block

// Little-endian loads from packed blocks; block fields are not naturally aligned in general.
inline uint16_t LoadU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline uint32_t LoadU32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline float LoadHalf(const uint8_t* p) { return Fp16ToFp32(LoadU16(p)); }

// Q4_0: d (fp16), 16 bytes; element j < 16 is the low nibble of byte j, j + 16 the high nibble.
void DequantQ4_0(const uint8_t* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, b += 18, y += kQK) {
    const float d = LoadHalf(b);
    const uint8_t* qs = b + 2;
    for (int j = 0; j < kQK / 2; ++j) {
      y[j] = static_cast<float>((qs[j] & 0x0f) - 8) * d;
      y[j + kQK / 2] = static_cast<float>((qs[j] >> 4) - 8) * d;
    }
  }
}

// Q4_1: d, m (fp16), 16 bytes of nibbles; y = q * d + m.
void DequantQ4_1(const uint8_t* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, b += 20, y += kQK) {
    const float d = LoadHalf(b);
    const float m = LoadHalf(b + 2);
    const uint8_t* qs = b + 4;
    for (int j = 0; j < kQK / 2; ++j) {
      y[j] = static_cast<float>(qs[j] & 0x0f) * d + m;
      y[j + kQK / 2] = static_cast<float>(qs[j] >> 4) * d + m;
    }
  }
}

// Q5_0: d, qh (32 high bits, bit e for element e), 16 bytes of low nibbles; q - 16.
void DequantQ5_0(const uint8_t* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, b += 22, y += kQK) {
    const float d = LoadHalf(b);
    const uint32_t qh = LoadU32(b + 2);
    const uint8_t* qs = b + 6;
    for (int j = 0; j < kQK / 2; ++j) {
      const int h0 = ((qh >> j) << 4) & 0x10;
      const int h1 = (qh >> (j + 12)) & 0x10;
      y[j] = static_cast<float>(((qs[j] & 0x0f) | h0) - 16) * d;
      y[j + kQK / 2] = static_cast<float>(((qs[j] >> 4) | h1) - 16) * d;
    }
  }
}

// Q5_1: d, m, qh, 16 bytes; y = q * d + m.
void DequantQ5_1(const uint8_t* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, b += 24, y += kQK) {
    const float d = LoadHalf(b);
    const float m = LoadHalf(b + 2);
    const uint32_t qh = LoadU32(b + 4);
    const uint8_t* qs = b + 8;
    for (int j = 0; j < kQK / 2; ++j) {
      const int h0 = ((qh >> j) << 4) & 0x10;
      const int h1 = (qh >> (j + 12)) & 0x10;
      y[j] = static_cast<float>((qs[j] & 0x0f) | h0) * d + m;
      y[j + kQK / 2] = static_cast<float>((qs[j] >> 4) | h1) * d + m;
    }
  }
}

// Q8_0: d, 32 signed bytes.
void DequantQ8_0(const uint8_t* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, b += 34, y += kQK) {
    const float d = LoadHalf(b);
    const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
    for (int j = 0; j < kQK; ++j) y[j] = static_cast<float>(qs[j]) * d;
  }
}

// The 12 K-quant scale bytes hold eight 6-bit scales and eight 6-bit mins: sub-blocks 0-3 in
// the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 split into a low nibble
// in bytes 8-11 and the top two bits of bytes 0-7.
inline void ScaleMinK4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q4_K: d, dmin (fp16), scales[12], qs[128]. Each 64 elements use 32 bytes: low nibbles give
// sub-block 2k, high nibbles sub-block 2k+1.
void DequantQ4_K(const uint8_t* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, b += 144) {
    const float d = LoadHalf(b);
    const float dmin = LoadHalf(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* q = b + 16;
    for (int j = 0, is = 0; j < kQK_K; j += 64, is += 2, q += 32) {
      uint8_t sc, m;
      ScaleMinK4(is, scales, &sc, &m);
      const float d1 = d * sc;
      const float m1 = dmin * m;
      ScaleMinK4(is + 1, scales, &sc, &m);
      const float d2 = d * sc;
      const float m2 = dmin * m;
      for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0x0f) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
    }
  }
}

// Q5_K: d, dmin, scales[12], qh[32], qs[128]; bit `is` of qh[l] is the fifth bit of element l
// of sub-block `is`.
void DequantQ5_K(const uint8_t* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, b += 176) {
    const float d = LoadHalf(b);
    const float dmin = LoadHalf(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* qh = b + 16;
    const uint8_t* ql = b + 48;
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0, is = 0; j < kQK_K; j += 64, is += 2, ql += 32) {
      uint8_t sc, m;
      ScaleMinK4(is, scales, &sc, &m);
      const float d1 = d * sc;
      const float m1 = dmin * m;
      ScaleMinK4(is + 1, scales, &sc, &m);
      const float d2 = d * sc;
      const float m2 = dmin * m;
      for (int l = 0; l < 32; ++l) {
        *y++ = d1 * static_cast<float>((ql[l] & 0x0f) + (qh[l] & u1 ? 16 : 0)) - m1;
      }
      for (int l = 0; l < 32; ++l) {
        *y++ = d2 * static_cast<float>((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
      }
      u1 <<= 2;
      u2 <<= 2;
    }
  }
}

// Q6_K: ql[128] (low nibbles), qh[64] (2-bit high parts), int8 scales[16], d (fp16).
// Each half of 128 elements uses 64 ql bytes and 32 qh bytes, in four interleaved quarters.
void DequantQ6_K(const uint8_t* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, b += 210) {
    const float d = LoadHalf(b + 208);
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    for (int n = 0; n < kQK_K; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l] = d * sc[is] * q1;
        y[l + 32] = d * sc[is + 2] * q2;
        y[l + 64] = d * sc[is + 4] * q3;
        y[l + 96] = d * sc[is + 6] * q4;
      }
    }
  }
}

void DequantBf16(const uint8_t* b, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = Bf16ToFp32(LoadU16(b + 2 * i));
}

__attribute__((target("avx2,f16c"))) void Fp16ToFp32RowF16c(const uint16_t* src, float* dst,
                                                            int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = Fp16ToFp32(src[i]);
}

__attribute__((target("avx2,f16c"))) void Fp32ToFp16RowF16c(const float* src, uint16_t* dst,
                                                            int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h =
        _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = Fp32ToFp16(src[i]);
}

// Checked once: __builtin_cpu_supports also verifies that the OS saves the YMM state.
bool HasF16c() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  return has;
}

}  // namespace

void Fp16ToFp32Row(const uint16_t* src, float* dst, int64_t n) {
  if (HasF16c()) return Fp16ToFp32RowF16c(src, dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i] = Fp16ToFp32(src[i]);
}

void Fp32ToFp16Row(const float* src, uint16_t* dst, int64_t n) {
  if (HasF16c()) return Fp32ToFp16RowF16c(src, dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i] = Fp32ToFp16(src[i]);
}

absl::Status DequantizeRow(GgmlType type, const void* src, float* dst, int64_t n) {
  const GgmlTypeInfo* info = FindGgmlType(static_cast<uint32_t>(type));
  if (info == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrFormat("dequantize: unknown ggml type id %d", static_cast<uint32_t>(type)));
  }
  if (!info->dequantizable) {
    return absl::UnimplementedError(
        absl::StrFormat("dequantize: ggml type %s is not supported", info->name));
  }
  if (n < 0 || n % info->block_size != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("dequantize: row of %d elements is not a multiple of the %s block size %d",
                        n, info->name, info->block_size));
  }
  const auto* b = static_cast<const uint8_t*>(src);
  const int64_t nb = n / info->block_size;
  switch (type) {
    case GgmlType::kF32:
      if (n > 0) std::memcpy(dst, src, n * sizeof(float));
      break;
    case GgmlType::kF16:
      Fp16ToFp32Row(static_cast<const uint16_t*>(src), dst, n);
      break;
    case GgmlType::kBF16:
      DequantBf16(b, dst, n);
      break;
    case GgmlType::kQ4_0:
      DequantQ4_0(b, dst, nb);
      break;
    case GgmlType::kQ4_1:
      DequantQ4_1(b, dst, nb);
      break;
    case GgmlType::kQ5_0:
      DequantQ5_0(b, dst, nb);
      break;
    case GgmlType::kQ5_1:
      DequantQ5_1(b, dst, nb);
      break;
    case GgmlType::kQ8_0:
      DequantQ8_0(b, dst, nb);
      break;
    case GgmlType::kQ4_K:
      DequantQ4_K(b, dst, nb);
      break;
    case GgmlType::kQ5_K:
      DequantQ5_K(b, dst, nb);
      break;
    case GgmlType::kQ6_K:
      DequantQ6_K(b, dst, nb);
      break;
    default:
      // The table marks a type dequantizable that this switch lacks: a programming error, but
      // reported rather than leaving dst unwritten.
      return absl::InternalError(
          absl::StrFormat("dequantize: no decoder for ggml type %s", info->name));
  }
  return absl::OkStatus();
}

absl::Status DequantizeRows(GgmlType type, const void* src, float* dst, int64_t rows, int64_t n) {
  if (rows < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("dequantize: negative row count %d", rows));
  }
  // Validates the type and n once; every row then has the same byte size.
  if (rows == 0) return DequantizeRow(type, src, dst, 0);
  const auto* b = static_cast<const uint8_t*>(src);
  QKV_RETURN_IF_ERROR(DequantizeRow(type, b, dst, n));
  const int64_t row_bytes = n / GgmlTypeInfoOf(type).block_size * GgmlTypeInfoOf(type).type_size;
  for (int64_t r = 1; r < rows; ++r) {
    QKV_RETURN_IF_ERROR(DequantizeRow(type, b + r * row_bytes, dst + r * n, n));
  }
  return absl::OkStatus();
}

}  // namespace quantkv::kernels
