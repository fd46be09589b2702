// PackedWeights and the AVX-512 VNNI kernels over them. Per group of 16 weight rows and
// per 32-column block the packed bytes are, for Q4_0/Q4_1 (int8 activations):
//   [0, 256)    four 64-byte vectors; vector t, 32-bit lane r = code bytes 4t..4t+3 of row
//               r's block (ggml's nibble order: the low nibble of byte j is column j, the
//               high nibble column j + 16), so `and 0x0f` gives columns 4t..4t+3 of all 16
//               rows and `>> 4` columns 16+4t..16+4t+3;
//   [256, 288)  the 16 rows' fp16 scales d;
//   [288, 320)  Q4_1 only: the 16 rows' fp16 minimums m;
// and for Q8_0 (int16 activations):
//   [0, 512)    eight vectors; vector t, lane r = int8 codes 4t..4t+3 of row r;
//   [512, 544)  the fp16 scales.
// A Q4 block then costs, for 16 rows and one activation row, 8 dpbusd with a broadcast
// activation word, one int->float conversion and two FMAs; the ggml-layout kernel pays a
// conversion, a permute and an FMA per 64 products of a single row.
#include "kernels/cpu/matmul_packed.h"

#include <immintrin.h>

// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_*); nothing of ours.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cstring>
#include <functional>
#include <string_view>
#include <vector>

#include "absl/strings/str_format.h"
#include "kernels/cpu/unaligned.h"

namespace quantkv::kernels {
namespace {

constexpr int kGroupRows = 16;
constexpr int kCodesBytes = 256;  // per group and block

struct Q4Layout {
  int ggml_bytes;    // one ggml block
  int qs_offset;     // where its 16 code bytes start
  bool has_min;      // Q4_1
  int packed_bytes;  // one block of a 16-row group
};

constexpr Q4Layout kQ4_0Layout{18, 2, false, kCodesBytes + 32};
constexpr Q4Layout kQ4_1Layout{20, 4, true, kCodesBytes + 64};

constexpr int kQ8_0GgmlBytes = 34;
constexpr int kQ8_0CodesBytes = 512;
constexpr int kQ8_0PackedBytes = kQ8_0CodesBytes + 32;

const Q4Layout* Q4LayoutOf(GgmlType type) {
  switch (type) {
    case GgmlType::kQ4_0:
      return &kQ4_0Layout;
    case GgmlType::kQ4_1:
      return &kQ4_1Layout;
    default:
      return nullptr;
  }
}

const char* ActivationName(ActivationPrecision act) {
  switch (act) {
    case ActivationPrecision::kInt8:
      return "int8";
    case ActivationPrecision::kInt16:
      return "int16";
    case ActivationPrecision::kFloat32:
      return "fp32";
  }
  return "?";
}

}  // namespace

bool CanPackWeights(GgmlType type, ActivationPrecision act) {
  const bool kernel = (act == ActivationPrecision::kInt8 && Q4LayoutOf(type) != nullptr) ||
                      (act == ActivationPrecision::kInt16 && type == GgmlType::kQ8_0);
  return kernel && std::string_view(internal::QuantDotIsa()) == "avx512vnni";
}

absl::StatusOr<std::unique_ptr<PackedWeights>> PackWeights(const WeightMatrix& w,
                                                           ActivationPrecision act) {
  if (!CanPackWeights(w.type, act)) {
    return absl::UnimplementedError(absl::StrFormat(
        "PackWeights: no packed kernel for %s weights with %s activations on this CPU (%s)",
        GgmlTypeInfoOf(w.type).name, ActivationName(act), internal::QuantDotIsa()));
  }
  if (w.rows <= 0 || w.cols <= 0 || w.cols % internal::kQ8Block != 0 || w.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PackWeights: a %d x %d matrix cannot be packed (columns must be a positive multiple "
        "of 32)",
        w.rows, w.cols));
  }
  auto p = std::make_unique<PackedWeights>();
  p->type_ = w.type;
  p->activations_ = act;
  p->rows_ = w.rows;
  p->cols_ = w.cols;
  const int64_t nb = w.cols / internal::kQ8Block;
  if (w.type == GgmlType::kQ8_0) {
    p->group_bytes_ = nb * kQ8_0PackedBytes;
    p->bytes_.assign(static_cast<size_t>(p->groups() * p->group_bytes_), 0);
    for (int64_t row = 0; row < w.rows; ++row) {
      const int64_t r = row % kGroupRows;
      uint8_t* group = p->bytes_.data() + (row / kGroupRows) * p->group_bytes_;
      const uint8_t* src = w.data + row * nb * kQ8_0GgmlBytes;
      for (int64_t b = 0; b < nb; ++b, src += kQ8_0GgmlBytes) {
        uint8_t* dst = group + b * kQ8_0PackedBytes;
        for (int t = 0; t < 8; ++t) std::memcpy(dst + t * 64 + r * 4, src + 2 + 4 * t, 4);
        std::memcpy(dst + kQ8_0CodesBytes + 2 * r, src, 2);
      }
    }
    return p;
  }
  const Q4Layout& l = *Q4LayoutOf(w.type);
  p->group_bytes_ = nb * l.packed_bytes;
  p->bytes_.assign(static_cast<size_t>(p->groups() * p->group_bytes_), 0);
  for (int64_t row = 0; row < w.rows; ++row) {
    const int64_t r = row % kGroupRows;
    uint8_t* group = p->bytes_.data() + (row / kGroupRows) * p->group_bytes_;
    const uint8_t* src = w.data + row * nb * l.ggml_bytes;
    for (int64_t b = 0; b < nb; ++b, src += l.ggml_bytes) {
      uint8_t* dst = group + b * l.packed_bytes;
      for (int t = 0; t < 4; ++t) std::memcpy(dst + t * 64 + r * 4, src + l.qs_offset + 4 * t, 4);
      std::memcpy(dst + kCodesBytes + 2 * r, src, 2);                          // d
      if (l.has_min) std::memcpy(dst + kCodesBytes + 32 + 2 * r, src + 2, 2);  // m
    }
  }
  return p;
}

namespace internal {
namespace {

#define QKV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

// M activation rows against one 16-row group; lanes of the results are weight rows.
template <bool kHasMin, int M>
QKV_AVX512 void PackedQ4Group(const uint8_t* group, const ActQ8Row* a, int64_t nb, float* y,
                              int64_t y_stride, __mmask16 rows) {
  constexpr int kBlockBytes = kHasMin ? kQ4_1Layout.packed_bytes : kQ4_0Layout.packed_bytes;
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  __m512 acc[M], acc_min[M];
  for (int i = 0; i < M; ++i) acc[i] = acc_min[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = group + b * kBlockBytes;
    __m512i lo[4], hi[4];
    for (int t = 0; t < 4; ++t) {
      const __m512i z = _mm512_loadu_si512(blk + 64 * t);
      lo[t] = _mm512_and_si512(z, low4);
      hi[t] = _mm512_and_si512(_mm512_srli_epi16(z, 4), low4);
    }
    const __m512 d =
        _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 256)));
    const __m512 mins =
        kHasMin ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 288)))
                : d;
    for (int i = 0; i < M; ++i) {
      const ActQ8Block& ab = a[i].blocks[b];
      const uint8_t* q = reinterpret_cast<const uint8_t*>(ab.q);
      // Two chains so consecutive dpbusd do not wait on each other.
      __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
      for (int t = 0; t < 4; ++t) {
        s0 =
            _mm512_dpbusd_epi32(s0, lo[t], _mm512_set1_epi32(static_cast<int>(LoadU32(q + 4 * t))));
        s1 = _mm512_dpbusd_epi32(s1, hi[t],
                                 _mm512_set1_epi32(static_cast<int>(LoadU32(q + 16 + 4 * t))));
      }
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
      acc[i] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(ab.d)), acc[i]);
      acc_min[i] = _mm512_fmadd_ps(mins, _mm512_set1_ps(ab.ds), acc_min[i]);
    }
  }
  for (int i = 0; i < M; ++i) {
    // Q4_1: d*q + m per weight; Q4_0: d*(q - 8), the -8 folded through Σ activations.
    const __m512 out = kHasMin ? _mm512_add_ps(acc[i], acc_min[i])
                               : _mm512_fmadd_ps(acc_min[i], _mm512_set1_ps(-8.0f), acc[i]);
    _mm512_mask_storeu_ps(y + i * y_stride, rows, out);
  }
}

template <bool kHasMin>
void PackedQ4Rows(const uint8_t* group, const ActQ8Row* a, int64_t m, int64_t nb, float* y,
                  int64_t y_stride, __mmask16 rows) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    PackedQ4Group<kHasMin, 4>(group, a + i, nb, y + i * y_stride, y_stride, rows);
  }
  switch (m - i) {
    case 3:
      PackedQ4Group<kHasMin, 3>(group, a + i, nb, y + i * y_stride, y_stride, rows);
      break;
    case 2:
      PackedQ4Group<kHasMin, 2>(group, a + i, nb, y + i * y_stride, y_stride, rows);
      break;
    case 1:
      PackedQ4Group<kHasMin, 1>(group, a + i, nb, y + i * y_stride, y_stride, rows);
      break;
    default:
      break;
  }
}

// M int16 activation rows against one 16-row Q8_0 group. `a[i]` holds row i's codes per
// block with each quad reordered (q0, q2, q1, q3), the order the sign-extended weight
// pairs come out of a packed word in.
template <int M>
QKV_AVX512 void PackedQ8Int16Group(const uint8_t* group, const int16_t* const* a,
                                   const float* const* da, int64_t nb, float* y, int64_t y_stride,
                                   __mmask16 rows) {
  __m512 acc[M];
  for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = group + b * kQ8_0PackedBytes;
    __m512i s0[M], s1[M];
    for (int i = 0; i < M; ++i) s0[i] = s1[i] = _mm512_setzero_si512();
    for (int t = 0; t < 8; ++t) {
      const __m512i z = _mm512_loadu_si512(blk + 64 * t);
      // Per 32-bit lane: (w0, w2) and (w1, w3) as int16 pairs. |w| <= 127 and |a| <= 32767,
      // so 32 products stay far inside int32.
      const __m512i even = _mm512_srai_epi16(_mm512_slli_epi16(z, 8), 8);
      const __m512i odd = _mm512_srai_epi16(z, 8);
      for (int i = 0; i < M; ++i) {
        const uint8_t* q = reinterpret_cast<const uint8_t*>(a[i] + b * 32 + 4 * t);
        s0[i] = _mm512_dpwssd_epi32(s0[i], even, _mm512_set1_epi32(static_cast<int>(LoadU32(q))));
        s1[i] =
            _mm512_dpwssd_epi32(s1[i], odd, _mm512_set1_epi32(static_cast<int>(LoadU32(q + 4))));
      }
    }
    const __m512 d = _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQ8_0CodesBytes)));
    for (int i = 0; i < M; ++i) {
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0[i], s1[i]));
      acc[i] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(da[i][b])), acc[i]);
    }
  }
  for (int i = 0; i < M; ++i) _mm512_mask_storeu_ps(y + i * y_stride, rows, acc[i]);
}

void PackedQ8Int16Rows(const uint8_t* group, const int16_t* const* a, const float* const* da,
                       int64_t m, int64_t nb, float* y, int64_t y_stride, __mmask16 rows) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    PackedQ8Int16Group<4>(group, a + i, da + i, nb, y + i * y_stride, y_stride, rows);
  }
  switch (m - i) {
    case 3:
      PackedQ8Int16Group<3>(group, a + i, da + i, nb, y + i * y_stride, y_stride, rows);
      break;
    case 2:
      PackedQ8Int16Group<2>(group, a + i, da + i, nb, y + i * y_stride, y_stride, rows);
      break;
    case 1:
      PackedQ8Int16Group<1>(group, a + i, da + i, nb, y + i * y_stride, y_stride, rows);
      break;
    default:
      break;
  }
}

__mmask16 GroupRows(const PackedWeights& p, int64_t g) {
  const int64_t left = p.rows() - g * kGroupRows;
  return left >= kGroupRows ? static_cast<__mmask16>(0xffff)
                            : static_cast<__mmask16>((1u << left) - 1);
}

void ForEachGroup(const PackedWeights& p, ThreadPool* pool,
                  const std::function<void(int64_t, int64_t, int)>& run) {
  if (pool == nullptr) {
    run(0, p.groups(), 0);
  } else {
    pool->ParallelFor(p.groups(), run, 1);
  }
}

}  // namespace

void PackedMatMulInt16(const PackedWeights& p, const ActQ16Block* a, int64_t m, float* y,
                       int64_t y_stride, ThreadPool* pool) {
  const int64_t nb = p.cols() / kQ8Block;
  // Reorder each quad to (q0, q2, q1, q3) once per call, not once per weight group.
  std::vector<int16_t> codes(static_cast<size_t>(m * nb * 32));
  std::vector<float> scales(static_cast<size_t>(m * nb));
  std::vector<const int16_t*> rows(m);
  std::vector<const float*> row_scales(m);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t b = 0; b < nb; ++b) {
      const int16_t* q = a[i * nb + b].q;
      int16_t* dst = codes.data() + (i * nb + b) * 32;
      for (int t = 0; t < 8; ++t) {
        dst[4 * t] = q[4 * t];
        dst[4 * t + 1] = q[4 * t + 2];
        dst[4 * t + 2] = q[4 * t + 1];
        dst[4 * t + 3] = q[4 * t + 3];
      }
      scales[i * nb + b] = a[i * nb + b].d;
    }
    rows[i] = codes.data() + i * nb * 32;
    row_scales[i] = scales.data() + i * nb;
  }
  ForEachGroup(p, pool, [&](int64_t g0, int64_t g1, int) {
    for (int64_t g = g0; g < g1; ++g) {
      PackedQ8Int16Rows(p.group(g), rows.data(), row_scales.data(), m, nb, y + g * kGroupRows,
                        y_stride, GroupRows(p, g));
    }
  });
}

void PackedMatMulInt8(const PackedWeights& p, const ActQ8Row* a, int64_t m, float* y,
                      int64_t y_stride, ThreadPool* pool) {
  const int64_t nb = p.cols() / kQ8Block;
  const bool has_min = p.type() == GgmlType::kQ4_1;
  ForEachGroup(p, pool, [&](int64_t g0, int64_t g1, int) {
    for (int64_t g = g0; g < g1; ++g) {
      const __mmask16 rows = GroupRows(p, g);
      float* out = y + g * kGroupRows;
      if (has_min) {
        PackedQ4Rows<true>(p.group(g), a, m, nb, out, y_stride, rows);
      } else {
        PackedQ4Rows<false>(p.group(g), a, m, nb, out, y_stride, rows);
      }
    }
  });
}

}  // namespace internal
}  // namespace quantkv::kernels
