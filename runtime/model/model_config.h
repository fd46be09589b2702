// Architecture hyper-parameters of a LLaMA-family decoder, whatever file they came from.
#pragma once

#include <cstdint>
#include <string>

#include "moe/router.h"

namespace quantkv {

enum class RopeScalingType { kNone, kLinear, kYarn, kLlama3 };

struct RopeConfig {
  float theta = 10000.0f;
  RopeScalingType scaling = RopeScalingType::kNone;
  float factor = 1.0f;           // linear / yarn / llama3 scale factor
  int64_t original_context = 0;  // yarn / llama3: pre-scaling context length
  float yarn_beta_fast = 32.0f;
  float yarn_beta_slow = 1.0f;
  float yarn_attn_factor = 1.0f;  // multiplies the yarn magnitude correction
  float llama3_low_freq_factor = 1.0f;
  float llama3_high_freq_factor = 4.0f;
};

// A mixture-of-experts FFN in every layer (Mixtral, Qwen2-MoE; a dense model split into
// experts by `quantkv moefy`): a router picks top_k of n_experts SwiGLU experts per token,
// plus an always-on shared expert where shared_intermediate > 0 (Qwen2-MoE, whose output is
// scaled by sigmoid(x · w) when the model has that gate).
struct MoeConfig {
  int64_t n_experts = 0;  // 0: a dense MLP
  int64_t top_k = 0;
  int64_t expert_intermediate = 0;
  int64_t shared_intermediate = 0;
  moe::RouterWeighting weighting = moe::RouterWeighting::kSoftmaxTopKNormalized;
  bool enabled() const { return n_experts > 0; }
};

struct ModelConfig {
  // llama, mistral, qwen2, qwen3, mixtral (llama layers with MoE FFNs), qwen2moe, qwen3moe
  std::string architecture = "llama";
  std::string name;
  int64_t n_layers = 0;
  int64_t hidden = 0;
  int64_t intermediate = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t vocab_size = 0;
  int64_t context_length = 2048;
  float rms_eps = 1e-5f;
  RopeConfig rope;
  bool tied_embeddings = false;
  bool attention_bias = false;  // qwen2 has q/k/v biases
  // RoPE rotates pairs (i, i + head_dim/2) (GPT-NeoX / HF rotate_half) instead of adjacent
  // pairs (2i, 2i+1). llama.cpp keeps qwen2's Q/K rows in HF order and ropes them NeoX-style;
  // llama and mistral rows are permuted into adjacent-pair order, so this stays false.
  bool rope_neox = false;
  // Qwen3: each head's q and k RMS-normalised over head_dim (weights attn_q_norm /
  // attn_k_norm) after the projection, before RoPE.
  bool qk_norm = false;
  MoeConfig moe;
};

}  // namespace quantkv
