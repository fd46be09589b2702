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
  kFp8E4M3,   // OCP FP8 E4M3 (max 448), one fp16 scale per token group
  kUniform,   // integer codes of `bits` bits with a scale (and zero point when asymmetric)
  kGgml,      // one of llama.cpp's KV cache types, bit for bit its block layout (GgmlKvFormat)
  kCodebook,  // non-linear: `bits`-bit indices into 2^bits levels in [-1, 1], scaled per group
  kVector,    // product quantization: `bits`-bit indices of `vector_dims`-dim centroids
  // Nothing but the keepN promoted rows: the other tokens of a block are evicted (H2O's and
  // StreamingLLM's baseline, against which keeping them at low bits is measured). Attention
  // skips a token whose K slab does not hold it.
  kDrop,
};

// llama.cpp's --cache-type-k/-v formats: rows cut into blocks of 32 values, each with an
// fp16 scale (and q4_1's fp16 minimum); iq4_nl indexes a fixed non-uniform 16-level table.
enum class GgmlKvFormat { kQ8_0, kQ4_0, kQ4_1, kIQ4_NL };

// Where a kCodebook codec's levels come from (kernels/kv_codebook.h builds them).
enum class KvCodebookKind {
  kNormalFloat,  // "nf": quantiles of a normal distribution (QLoRA's NF4 idea)
  kPower,        // "powP": uniform in sign(u)|u|^P, i.e. a power transform before uniform codes
  kLog,          // "log": signed powers of two (logarithmic quantization)
  kCalibrated,   // "lloyd": Lloyd-Max levels fitted to calibration data (KvCodecConfig)
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
  int group_size = 64;  // kPerTokenGroup: channels per scale; must divide head_dim
  // Scales cover clip * max|x| (symmetric) or clip * (max - min) around the midpoint
  // (asymmetric); values beyond saturate. 1 = plain min-max. Set by calibration searches.
  float clip = 1.0f;
  // Promoted tokens: room in every head slab for this many token rows kept exactly (fp16)
  // beside the codes, filled after encoding by KvCodec::KeepRow with the rows the cache
  // is told matter most (KvCache::PromoteRows: router entropy, attention mass). 0: off;
  // 1..32. Decode returns a kept row exactly; attention takes the tiled path for it.
  int keep_rows = 0;
  // Dense-and-sparse: this percentage of a slab's values (largest |x|) is kept exactly in
  // fp16 beside the codes, the rest quantized without them. 0: off.
  float outlier_pct = 0.0f;
  // Low-rank residual (GEAR): the rank-R truncated SVD of each slab's quantization error is
  // kept in fp16 and added back on decode. 0: off; 1..16.
  int rank = 0;
  // Learned dynamic clipping (kernels/kv_clip_model.h): each token group's clip ratio comes
  // from a calibrated linear model of its statistics (KvCodecConfig::clip_model).
  bool learned_clip = false;
  // Score correction: the per-channel mean of each slab's quantization error is kept in fp16
  // and added back on decode (q . k gains q . mean residual).
  bool mean_residual = false;
  GgmlKvFormat ggml = GgmlKvFormat::kQ8_0;                 // kGgml
  KvCodebookKind codebook = KvCodebookKind::kNormalFloat;  // kCodebook
  float power = 0.5f;                                      // kCodebook, kPower: exponent P
  // kVector: channels per sub-vector (`bits` is the code width of one sub-vector).
  int vector_dims = 4;

  // Canonical spelling, parseable by ParseKvCodecSpec: "fp16", "int4:g32:asym",
  // "int2:chan", "int4:block", "int4:static", "int8:g64:sym:clip0.95", "fp8:g64", "q4_0",
  // "iq4_nl", "nl4:g32:asym:nf", "nl2:g64:sym:pow0.5", "nl3:g64:asym:lloyd".
  std::string ToString() const;
};

// Any integer, fp8 or codebook codec also takes keepN (1 <= N <= 32 promoted token rows per
// slab, see KvCodecSpec::keep_rows), written last.
// Grammar: NAME[:OPTION]* with NAME in fp32|fp16|bf16|fp8|int8|int4|int3|int2 and options
// gN (per-token groups of N channels), chan (per-channel over the block), block (one scale
// per head slab), static (calibrated per-channel scales, see KvCodecConfig), sym|asym,
// clipX (0 < X <= 1), outX (keep X% of values, 0 < X <= 10, as fp16 outliers), rankR
// (1 <= R <= 16, low-rank residual; also for nlN), learnclip (per-group clip ratios from a
// calibrated model; per-token groups only), meanres (per-channel mean residual added back;
// also for nlN). Defaults for intN: g64, asym, clip1, no outliers, no residual.
// llama.cpp's cache types q8_0|q4_0|q4_1|iq4_nl take no options. drop:keepN holds only the
// N promoted rows of each block (the others are evicted); keepN is its only option and is
// required, and K and V must then both be drop with the same N (KvPolicy checks).
// Non-linear codebooks nl4|nl3|nl2 take gN, sym|asym, clipX and one of nf|powP (0 < P <= 1;
// smaller P puts more levels near 0)|log|lloyd (levels from `quantkv calibrate`); defaults
// g64, asym, nf. Product quantization pqMxB (M channels per sub-vector, 2^B centroids:
// B/M bits per element plus a per-token fp16 scale) takes no options; its centroids come from
// `quantkv calibrate`. Errors name the bad part.
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
  // kCodebook with kCalibrated levels: 2^bits ascending levels in [-1, 1]; kVector: 2^bits
  // centroids of vector_dims values each, [centroid][dim]. `quantkv calibrate` fits them;
  // the KV policy file carries them.
  std::vector<float> codebook = {};
  // learned_clip: the kClipFeatures weights of the layer's clip model (`quantkv calibrate`).
  std::vector<float> clip_model = {};
};

// True when the codec's levels or centroids come from calibration (nlN:lloyd, pqMxB).
inline bool KvCodecNeedsCodebook(const KvCodecSpec& s) {
  // (learned_clip's model is calibrated too, but is carried separately: clip_model.)
  return s.type == KvCodecType::kVector ||
         (s.type == KvCodecType::kCodebook && s.codebook == KvCodebookKind::kCalibrated);
}

class KvCodec {
 public:
  // Validates the spec against the geometry (group divides head_dim, ...) and the scales.
  static absl::StatusOr<std::unique_ptr<KvCodec>> Create(const KvCodecConfig& config);
  static absl::StatusOr<std::unique_ptr<KvCodec>> Create(const KvCodecSpec& spec, int64_t head_dim,
                                                         int64_t block_tokens) {
    return Create(KvCodecConfig{spec, head_dim, block_tokens, {}, {}, {}, {}});
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
  // keep_rows codecs: stores token t's row (head_dim values, in the encoded domain) exactly
  // in a free slot of the encoded slab, or in place of the kept row of lowest priority when
  // `priority` exceeds it; a row kept already only has its priority raised. True when the
  // row is kept. Other codecs keep nothing.
  virtual bool KeepRow(uint8_t* slab, int64_t t, const float* row, float priority) const {
    return false;
  }
  // True for codecs that do not hold every token (drop:keepN); attention then asks HeldRows.
  bool drops_rows() const { return spec_.type == KvCodecType::kDrop; }
  // Bit t - t0 set for each token t of [t0, t1) (t1 - t0 <= 64) the slab holds; codecs that
  // hold every row set them all.
  virtual uint64_t HeldRows(const uint8_t* slab, int64_t t0, int64_t t1) const {
    (void)slab;
    return t1 - t0 >= 64 ? ~uint64_t{0} : (uint64_t{1} << (t1 - t0)) - 1;
  }

 protected:
  KvCodec(const KvCodecSpec& spec, int64_t head_dim, int64_t block_tokens)
      : spec_(spec), head_dim_(head_dim), block_tokens_(block_tokens) {}

 private:
  KvCodecSpec spec_;
  int64_t head_dim_;
  int64_t block_tokens_;
};

}  // namespace quantkv::kernels
