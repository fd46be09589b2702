// Attention-output correction adapters: per layer, a low-rank affine map added to the
// attention output (the concatenated heads, before o_proj) that moves what attention over a
// quantized KV cache produced towards what it would have produced over an exact cache,
//   a' = a + B (A a) + bias,
// fitted in closed form by `quantkv fit-correction` (runtime/engine/attn_correction_fit.h)
// and applied by the engine (EngineConfig::attn_correction) to the rows whose attention read
// encoded blocks. Stored as safetensors:
//   layers.L.attn_corr.a     F32 [rank, dim]
//   layers.L.attn_corr.b     F32 [dim, rank]
//   layers.L.attn_corr.bias  F32 [dim]
// with __metadata__ {format, model, kv_spec, n_layers, dim, rank, tokens, ridge, ...}; a
// layer without tensors is left uncorrected.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model/low_rank_adapter.h"
#include "runtime/model/model_config.h"

namespace quantkv {

inline constexpr char kAttnCorrectionFormat[] = "quantkv-attn-correction/1";

struct AttnCorrection {
  std::string origin;   // the file it was read from ("" when fitted in memory)
  std::string kv_spec;  // the --kv it was fitted for
  int64_t n_layers = 0;
  int64_t dim = 0;  // n_heads * head_dim
  int64_t rank = 0;
  std::vector<LowRankAdapter> layers;  // [n_layers]; empty() for an uncorrected layer
  // Everything else in __metadata__ (model, text, tokens, ridge, ...), kept for reports.
  std::map<std::string, std::string> metadata;
};

absl::Status WriteAttnCorrection(const std::string& path, const AttnCorrection& c);

// Reads and validates a file written by WriteAttnCorrection; errors name the file and what
// is wrong (not a correction file, inconsistent shapes, unknown tensors, non-finite values).
absl::StatusOr<AttnCorrection> ReadAttnCorrection(const std::string& path);

// INVALID_ARGUMENT unless `c` was fitted for a model of this shape (layers, attention width).
absl::Status CheckAttnCorrectionFitsModel(const AttnCorrection& c, const ModelConfig& model);

// FAILED_PRECONDITION when the KV spec `kv` differs from the one `c` was fitted for: a
// correction learns one codec's error, and on another cache it adds error instead.
absl::Status CheckAttnCorrectionKv(const AttnCorrection& c, std::string_view kv);

}  // namespace quantkv
