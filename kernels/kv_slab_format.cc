#include "kernels/kv_slab_format.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace quantkv::kernels {
namespace {

absl::Status Refuse(const KvCodecSpec& spec, const char* what) {
  return absl::UnimplementedError(absl::StrCat("KV codec ", spec.ToString(), ": ", what,
                                               " has no plain slab layout (the CUDA cache takes "
                                               "fp32/fp16/bf16, fp8 and intN without extras)"));
}

}  // namespace

absl::StatusOr<KvSlabFormat> KvSlabFormatOf(const KvCodecSpec& spec, int64_t head_dim,
                                            int64_t block_tokens) {
  if (head_dim <= 0 || block_tokens <= 0 || head_dim > 4096 || block_tokens > 4096) {
    return absl::InvalidArgumentError(absl::StrCat("KV slab format: bad geometry head_dim ",
                                                   head_dim, ", block_tokens ", block_tokens));
  }
  if (spec.keep_rows > 0) return Refuse(spec, "promoted rows (keepN)");
  if (spec.outlier_pct > 0.0f) return Refuse(spec, "fp16 outliers (outX)");
  if (spec.rank > 0) return Refuse(spec, "a low-rank residual (rankR)");
  if (spec.mean_residual) return Refuse(spec, "a mean residual (meanres)");
  if (spec.learned_clip) return Refuse(spec, "learned clipping (learnclip)");
  if (spec.type == KvCodecType::kFp8E4M3 || spec.type == KvCodecType::kUniform) {
    if (!(spec.clip > 0.0f && spec.clip <= 1.0f)) {  // as KvCodec::Create
      return absl::InvalidArgumentError(
          absl::StrCat("KV codec ", spec.ToString(), ": clip ", spec.clip, " not in (0, 1]"));
    }
  }
  KvSlabFormat f;
  f.head_dim = static_cast<int>(head_dim);
  f.block_tokens = static_cast<int>(block_tokens);
  f.clip = spec.clip;
  const int d = f.head_dim;
  const int bt = f.block_tokens;
  switch (spec.type) {
    case KvCodecType::kF32:
    case KvCodecType::kF16:
    case KvCodecType::kBF16: {
      const int elem = spec.type == KvCodecType::kF32 ? 4 : 2;
      f.kind = spec.type == KvCodecType::kF32   ? KvSlabKind::kF32
               : spec.type == KvCodecType::kF16 ? KvSlabKind::kF16
                                                : KvSlabKind::kBF16;
      f.bits = 8 * elem;
      f.group_size = d;
      f.n_groups = 1;
      f.row_bytes = elem * d;
      f.codes_bytes = bt * f.row_bytes;
      f.slab_bytes = f.codes_bytes;
      return f;
    }
    case KvCodecType::kFp8E4M3:
      if (spec.granularity != KvGranularity::kPerTokenGroup) {
        return absl::InvalidArgumentError(
            absl::StrCat("KV codec ", spec.ToString(), ": fp8 has per-token-group scales only"));
      }
      if (spec.group_size <= 0 || d % spec.group_size != 0) {
        return absl::InvalidArgumentError(absl::StrCat("KV codec ", spec.ToString(), ": group ",
                                                       spec.group_size, " does not divide ", d));
      }
      f.kind = KvSlabKind::kFp8E4M3;
      f.bits = 8;
      f.group_size = spec.group_size;
      f.n_groups = d / spec.group_size;
      f.row_bytes = d;
      f.codes_bytes = bt * d;
      f.n_meta = bt * f.n_groups;
      f.slab_bytes = f.codes_bytes + 2 * f.n_meta;
      return f;
    case KvCodecType::kUniform:
      break;
    case KvCodecType::kGgml:
      return Refuse(spec, "a llama.cpp block type");
    case KvCodecType::kCodebook:
      return Refuse(spec, "a non-linear codebook");
    case KvCodecType::kVector:
      return Refuse(spec, "product quantization");
    case KvCodecType::kDrop:
      return Refuse(spec, "drop");
  }
  if (spec.bits != 8 && spec.bits != 4 && spec.bits != 3 && spec.bits != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV codec ", spec.ToString(), ": ", spec.bits, " bits"));
  }
  if (d * spec.bits % 8 != 0 || (spec.bits == 3 && d % 8 != 0)) {
    return absl::InvalidArgumentError(absl::StrCat("KV codec ", spec.ToString(), ": head_dim ", d,
                                                   " does not pack at ", spec.bits, " bits"));
  }
  f.kind = KvSlabKind::kUniform;
  f.bits = spec.bits;
  f.symmetric = spec.symmetric;
  f.row_bytes = d * spec.bits / 8;
  f.codes_bytes = bt * f.row_bytes;
  switch (spec.granularity) {
    case KvGranularity::kPerTokenGroup:
      if (spec.group_size <= 0 || d % spec.group_size != 0) {
        return absl::InvalidArgumentError(absl::StrCat("KV codec ", spec.ToString(), ": group ",
                                                       spec.group_size, " does not divide ", d));
      }
      f.meta = KvSlabMeta::kTokenGroup;
      f.group_size = spec.group_size;
      f.n_groups = d / spec.group_size;
      f.n_meta = bt * f.n_groups;
      break;
    case KvGranularity::kPerChannel:
      f.meta = KvSlabMeta::kChannel;
      f.group_size = d;
      f.n_groups = 1;
      f.n_meta = d;
      break;
    case KvGranularity::kPerBlock:
      f.meta = KvSlabMeta::kBlock;
      f.group_size = d;
      f.n_groups = 1;
      f.n_meta = 1;
      break;
    case KvGranularity::kStatic:
      return Refuse(spec, "static calibrated scales");
  }
  f.slab_bytes = f.codes_bytes + (f.symmetric ? 2 : 4) * f.n_meta;
  return f;
}

}  // namespace quantkv::kernels
