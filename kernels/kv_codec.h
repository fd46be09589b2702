// KV cache codecs: how one KV head's slice of one cache block ("head slab": block_tokens
// rows of head_dim values) is stored. A codec owns its byte layout (codes and metadata:
// scales, zero points), its encoder and its decoder; attention decodes slab rows into a
// small tile right where it uses them, so no full-precision copy of the cache exists.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace quantkv::kernels {

enum class KvCodecType {
  kF32,
  kF16,
  kBF16,
  kFp8E4M3,  // OCP FP8 E4M3 (max 448), one fp16 scale per token group
  kUniform,  // integer codes of `bits` bits with a scale (and zero point when asymmetric)
};

enum class KvGranularity {
  kPerTokenGroup,  // one scale (+zero) per token per group of `group_size` channels
  kPerChannel,     // one scale (+zero) per channel over the block's tokens (KIVI's keys)
  kPerBlock,       // one scale (+zero) for the whole head slab (block-wise over tokens)
  kStatic,         // per-channel scales (+zeros) fixed by calibration; slabs hold codes only
};

struct KvCodecSpec {
  KvCodecType type = KvCodecType::kF16;
  int bits = 16;           // kUniform: 8, 4, 3 or 2
  bool symmetric = false;  // kUniform: zero point fixed at 0 (scale only)
  KvGranularity granularity = KvGranularity::kPerTokenGroup;
  int group_size = 64;     // kPerTokenGroup: channels per scale; must divide head_dim
  // Scales cover clip * max|x| (symmetric) or clip * (max - min) around the midpoint
  // (asymmetric); values beyond saturate. 1 = plain min-max. Set by calibration searches.
  float clip = 1.0f;
  // Dense-and-sparse: this percentage of a slab's values (largest |x|) is kept exactly in
  // fp16 beside the codes, the rest quantized without them. 0: off.
  float outlier_pct = 0.0f;

  // Canonical spelling, parseable by ParseKvCodecSpec: "fp16", "int4:g32:asym",
  // "int2:chan", "int4:block", "int4:static", "int8:g64:sym:clip0.95", "fp8:g64".
  std::string ToString() const;
};

// Grammar: NAME[:OPTION]* with NAME in fp32|fp16|bf16|fp8|int8|int4|int3|int2 and options
// gN (per-token groups of N channels), chan (per-channel over the block), block (one scale
// per head slab), static (calibrated per-channel scales, see KvCodecConfig), sym|asym,
// clipX (0 < X <= 1), outX (keep X% of values, 0 < X <= 10, as fp16 outliers). Defaults
// for intN: g64, asym, clip1, no outliers. Errors name the bad part.
absl::StatusOr<KvCodecSpec> ParseKvCodecSpec(std::string_view text);

// A codec for one KV head: its spec and geometry, and for kStatic its calibrated scales.
struct KvCodecConfig {
  KvCodecSpec spec;
  int64_t head_dim = 0;
  int64_t block_tokens = 0;
  // kStatic only, [head_dim] each: x = scale[c] * q + min[c] (asymmetric) or
  // x = scale[c] * (q - 2^(bits-1)) (symmetric; min unused). Per-tensor calibration repeats
  // one value. Made by `quantkv calibrate`, carried by the KV policy file.
  std::vector<float> static_scale;
  std::vector<float> static_min;
};

class KvCodec {
 public:
  // Validates the spec against the geometry (group divides head_dim, ...) and the scales.
  static absl::StatusOr<std::unique_ptr<KvCodec>> Create(const KvCodecConfig& config);
  static absl::StatusOr<std::unique_ptr<KvCodec>> Create(const KvCodecSpec& spec,
                                                         int64_t head_dim,
                                                         int64_t block_tokens) {
    return Create(KvCodecConfig{spec, head_dim, block_tokens, {}, {}});
  }
  virtual ~KvCodec() = default;

  const KvCodecSpec& spec() const { return spec_; }
  int64_t head_dim() const { return head_dim_; }
  int64_t block_tokens() const { return block_tokens_; }

  // Bytes of one head slab: all codes and all metadata for block_tokens tokens.
  virtual int64_t slab_bytes() const = 0;
  double bits_per_element() const {
    return 8.0 * static_cast<double>(slab_bytes()) / static_cast<double>(block_tokens_ * head_dim_);
  }

  // x: [block_tokens][head_dim], a full block (per-channel scales need every token).
  virtual void Encode(const float* x, uint8_t* slab) const = 0;
  // Decodes tokens [t0, t1) of the slab into out[(t - t0) * head_dim + e].
  virtual void Decode(const uint8_t* slab, int64_t t0, int64_t t1, float* out) const = 0;

 protected:
  KvCodec(const KvCodecSpec& spec, int64_t head_dim, int64_t block_tokens)
      : spec_(spec), head_dim_(head_dim), block_tokens_(block_tokens) {}

 private:
  KvCodecSpec spec_;
  int64_t head_dim_;
  int64_t block_tokens_;
};

}  // namespace quantkv::kernels
