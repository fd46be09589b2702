// LoRA adapters in PEFT's format (what `PeftModel.save_pretrained` writes): a directory with
// adapter_config.json (r, lora_alpha, target_modules, ...) and adapter_model.safetensors
// holding "base_model.model.model.layers.L.self_attn.q_proj.lora_A.weight" [r, in] and
// "...lora_B.weight" [out, r]. Applied at run time as W x + (alpha / r) B A x on the
// attention projections q/k/v/o; anything else PEFT can express (MLP targets, DoRA, biases,
// per-module ranks, modules_to_save) is refused with a message saying what and where.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model/low_rank_adapter.h"
#include "runtime/model/model_config.h"

namespace quantkv {

struct LoraAdapters {
  std::string origin;  // the directory or file it was read from
  int64_t rank = 0;
  double alpha = 0;
  float scale = 0;                   // alpha / r, or alpha / sqrt(r) with use_rslora
  std::vector<std::string> targets;  // of q_proj, k_proj, v_proj, o_proj
  struct Layer {
    // Rows of q/k are in the engine's (GGUF) order: permuted like the weights they adapt.
    LowRankAdapter q, k, v, o;
  };
  std::vector<Layer> layers;  // [n_layers]; a projection without an adapter is empty()
};

// Reads a PEFT LoRA adapter for a model of `config`: `path` is the adapter directory, or
// its adapter_model.safetensors with adapter_config.json beside it. Errors name the file
// and the field or tensor at fault (unsupported options, unknown or missing tensors,
// shapes that do not match the model's projections).
absl::StatusOr<LoraAdapters> LoadLoraAdapters(const std::string& path, const ModelConfig& config);

// INVALID_ARGUMENT unless every adapter's shape is that of the projection it adapts in a
// model of `config` (adapters loaded for one model and handed to another engine).
absl::Status CheckLoraFitsModel(const LoraAdapters& lora, const ModelConfig& config);

}  // namespace quantkv
