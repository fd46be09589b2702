// A Hugging Face model directory (config.json + model.safetensors, or
// model.safetensors.index.json + shards) seen as a WeightSource: tensors renamed to GGUF
// names, dims in ggml order, and Q/K projections of llama/mistral permuted the way llama.cpp's
// convert_hf_to_gguf.py does, so the engine runs one code path for both sources.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "runtime/model/model_config.h"
#include "runtime/model/weight_source.h"

namespace quantkv {

// Opens `dir`. Errors name the file and field at fault: missing or ill-typed config keys,
// unsupported architectures or RoPE variants, a malformed index, missing or unexpected
// tensors, and shapes that contradict config.json.
absl::StatusOr<std::unique_ptr<WeightSource>> OpenHfModelDir(const std::string& dir);

// Parses the text of a config.json (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM;
// transformers 4.x `rope_scaling` + `rope_theta` or 5.x `rope_parameters`). Keys that
// transformers itself defaults (num_key_value_heads, head_dim, rms_norm_eps, rope_theta,
// max_position_embeddings, tie_word_embeddings) fall back to the same defaults; the shape
// keys are required. `origin` labels errors.
absl::StatusOr<ModelConfig> ParseHfConfig(std::string_view json_text, const std::string& origin);

// The GGUF name of an HF tensor ("model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight"),
// or nullopt for a name outside the LLaMA-family decoder.
std::optional<std::string> HfToGgufName(std::string_view hf_name);

// convert_hf_to_gguf's Q/K permutation on raw rows of any element type:
//   w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2).reshape(rows, cols)
// i.e. within each head, destination row 2j+s takes source row s*half+j. `rows` must be a
// multiple of 2 * n_head. A bias is the case row_bytes == element size.
void PermuteQkRows(const uint8_t* src, uint8_t* dst, int64_t n_head, int64_t rows,
                   int64_t row_bytes);

}  // namespace quantkv
