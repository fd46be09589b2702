// llama.cpp's KV cache types as codecs (KvCodecType::kGgml), so that `--cache-type-k q4_0`
// style caches are compared with ours inside one binary at equal bits. Each row of a head
// slab (one token's head_dim values) is a run of ggml blocks of 32 values in ggml's own
// byte layout:
//   q8_0:   fp16 d, 32 x int8 q;                x = d * q           (8.5 bits/element)
//   q4_0:   fp16 d, 16 bytes of nibbles;        x = d * (q - 8)     (4.5)
//   q4_1:   fp16 d, fp16 m, 16 bytes of nibbles; x = d * q + m      (5.0)
//   iq4_nl: fp16 d, 16 bytes of nibbles;        x = d * kIq4nl[q]   (4.5)
// with byte j holding value j in its low nibble and value j + 16 in its high one. Encoders
// follow ggml's reference quantizers (quantize_row_*_ref: the same scale choice and
// rounding); q8_0 / q4_0 / q4_1 decode through DequantizeRow, bit-exact with ggml.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "kernels/cpu/ggml_block_encode.h"
#include "kernels/cpu/kv_codec_internal.h"
#include "kernels/cpu/unaligned.h"
#include "kernels/dequantize.h"
#include "kernels/fp16.h"

namespace quantkv::kernels::kv_codec_internal {
namespace {

using ggml_encode::EncodeQ4_0;
using ggml_encode::EncodeQ4_1;
using ggml_encode::EncodeQ8_0;
using internal::LoadU16;
using internal::StoreU16;

constexpr int kQK = 32;
// IQ4_NL's 16 levels (ggml's kvalues_iq4nl): denser near zero, where most values are.
constexpr int8_t kIq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                               1,    13,   25,  38,  53,  69,  89,  113};

int64_t BlockBytes(GgmlKvFormat f) {
  switch (f) {
    case GgmlKvFormat::kQ8_0:
      return 2 + kQK;
    case GgmlKvFormat::kQ4_1:
      return 4 + kQK / 2;
    case GgmlKvFormat::kQ4_0:
    case GgmlKvFormat::kIQ4_NL:
      return 2 + kQK / 2;
  }
  return 0;
}

int NearestIq4nl(float v) {
  int best = 0;
  for (int k = 1; k < 16; ++k) {
    if (std::fabs(v - kIq4nl[k]) < std::fabs(v - kIq4nl[best])) best = k;
  }
  return best;
}

// ggml's iq4_nl reference: weights x^2, the scale from the largest value, then a search
// over 15 nearby inverse scales for the weighted least-squares best one.
void EncodeIq4nl(const float* x, uint8_t* b) {
  constexpr int kTries = 7;
  float amax = 0, max = 0;
  for (int j = 0; j < kQK; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  int q[kQK] = {};
  if (amax < 1e-30f) {
    StoreU16(b, 0);
  } else {
    float w[kQK];
    for (int j = 0; j < kQK; ++j) w[j] = x[j] * x[j];
    auto fit = [&](float id, int* out, float* sumqx, float* sumq2) {
      *sumqx = 0;
      *sumq2 = 0;
      for (int j = 0; j < kQK; ++j) {
        out[j] = NearestIq4nl(id * x[j]);
        const float lv = kIq4nl[out[j]];
        *sumqx += w[j] * lv * x[j];
        *sumq2 += w[j] * lv * lv;
      }
    };
    float sumqx, sumq2;
    fit(kIq4nl[0] / max, q, &sumqx, &sumq2);
    float d = sumq2 > 0 ? sumqx / sumq2 : 0.0f;
    float best = d * sumqx;
    for (int t = -kTries; t <= kTries; ++t) {
      int trial[kQK];
      fit((static_cast<float>(t) + kIq4nl[0]) / max, trial, &sumqx, &sumq2);
      if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
        d = sumqx / sumq2;
        best = d * sumqx;
        std::memcpy(q, trial, sizeof(q));
      }
    }
    StoreU16(b, Fp32ToFp16(d));
  }
  for (int j = 0; j < kQK / 2; ++j) b[2 + j] = static_cast<uint8_t>(q[j] | (q[j + kQK / 2] << 4));
}

void DecodeIq4nl(const uint8_t* b, float* y) {
  const float d = Fp16ToFp32(LoadU16(b));
  for (int j = 0; j < kQK / 2; ++j) {
    y[j] = d * kIq4nl[b[2 + j] & 0x0f];
    y[j + kQK / 2] = d * kIq4nl[b[2 + j] >> 4];
  }
}

class GgmlCodec final : public KvCodec {
 public:
  GgmlCodec(const KvCodecSpec& spec, int64_t head_dim, int64_t block_tokens)
      : KvCodec(spec, head_dim, block_tokens), row_bytes_(head_dim / kQK * BlockBytes(spec.ggml)) {}

  int64_t slab_bytes() const override { return row_bytes_ * block_tokens(); }

  void Encode(const float* x, uint8_t* slab) const override {
    const int64_t blocks = block_tokens() * head_dim() / kQK, bb = BlockBytes(spec().ggml);
    for (int64_t i = 0; i < blocks; ++i) {
      // NaN inputs are stored as 0 (ggml would poison the whole block's scale).
      float xs[kQK];
      for (int j = 0; j < kQK; ++j) {
        const float v = x[i * kQK + j];
        xs[j] = v == v ? v : 0.0f;
      }
      uint8_t* b = slab + i * bb;
      switch (spec().ggml) {
        case GgmlKvFormat::kQ8_0:
          EncodeQ8_0(xs, b);
          break;
        case GgmlKvFormat::kQ4_0:
          EncodeQ4_0(xs, b);
          break;
        case GgmlKvFormat::kQ4_1:
          EncodeQ4_1(xs, b);
          break;
        case GgmlKvFormat::kIQ4_NL:
          EncodeIq4nl(xs, b);
          break;
      }
    }
  }

  void Decode(const uint8_t* slab, int64_t t0, int64_t t1, float* out) const override {
    const uint8_t* rows = slab + t0 * row_bytes_;
    const int64_t n = (t1 - t0) * head_dim();
    switch (spec().ggml) {
      case GgmlKvFormat::kQ8_0:
        (void)DequantizeRow(GgmlType::kQ8_0, rows, out, n);  // n is a multiple of 32
        break;
      case GgmlKvFormat::kQ4_0:
        (void)DequantizeRow(GgmlType::kQ4_0, rows, out, n);
        break;
      case GgmlKvFormat::kQ4_1:
        (void)DequantizeRow(GgmlType::kQ4_1, rows, out, n);
        break;
      case GgmlKvFormat::kIQ4_NL:
        for (int64_t i = 0; i < n / kQK; ++i) DecodeIq4nl(rows + i * 18, out + i * kQK);
        break;
    }
  }

 private:
  int64_t row_bytes_;
};

}  // namespace

std::unique_ptr<KvCodec> MakeGgmlCodec(const KvCodecSpec& spec, int64_t head_dim,
                                       int64_t block_tokens) {
  return std::make_unique<GgmlCodec>(spec, head_dim, block_tokens);
}

}  // namespace quantkv::kernels::kv_codec_internal
