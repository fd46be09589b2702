// Rotary position embedding with the scaling variants HF transformers implements
// (none, linear, YaRN, llama3), applied in place to [tokens][heads][head_dim] rows.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace quantkv::kernels {

enum class RopeScaling { kNone, kLinear, kYarn, kLlama3 };

struct RopeSpec {
  int64_t head_dim = 64;
  double theta = 10000.0;
  RopeScaling scaling = RopeScaling::kNone;
  double factor = 1.0;
  int64_t original_context = 0;  // YaRN / llama3
  double yarn_beta_fast = 32.0;
  double yarn_beta_slow = 1.0;
  double yarn_attn_factor = 1.0;  // extra multiplier on YaRN's 0.1*ln(s)+1 magnitude
  double llama3_low_freq_factor = 1.0;
  double llama3_high_freq_factor = 4.0;
  // false: rotate adjacent pairs (x[2i], x[2i+1]) — GGUF's LLaMA layout;
  // true: rotate (x[i], x[i + d/2]) — NeoX / HF rotate_half layout (Qwen2 in GGUF).
  bool neox = false;
};

class RopeTable {
 public:
  explicit RopeTable(const RopeSpec& spec);
  const RopeSpec& spec() const { return spec_; }
  const std::vector<double>& inv_freq() const { return inv_freq_; }
  double magnitude() const { return magnitude_; }  // YaRN scales cos/sin by this

  // x: n_tokens rows of n_heads * head_dim; token t is at positions[t].
  void Apply(float* x, int64_t n_tokens, int64_t n_heads, const int32_t* positions) const;

  // Rotates n single-head rows [n][head_dim] of consecutive positions first_position, ...
  // (inverse: undoes Apply, magnitude included). For pre-RoPE keys, which attention rotates
  // after decoding them; positions below Precompute's bound use a cached cos/sin table.
  void RotateRows(float* x, int64_t n, int64_t first_position, bool inverse) const;
  // Caches cos/sin for positions [0, n_positions). Not thread-safe: call before sharing.
  void Precompute(int64_t n_positions);
  // The cos and sin Apply multiplies by for positions [0, n_positions), [position][head_dim /
  // 2] each, magnitude included: the table a device uploads (cuda::RopeApply).
  void CosSin(int64_t n_positions, std::vector<float>* cos, std::vector<float>* sin) const;

 private:
  RopeSpec spec_;
  std::vector<double> inv_freq_;
  double magnitude_ = 1.0;
  int64_t cached_positions_ = 0;
  std::vector<float> cos_cache_, sin_cache_;  // [position][head_dim / 2], magnitude included
};

namespace cuda {
// RopeTable::Apply on the device: x [n_tokens][n_heads][head_dim] in place, token t at
// positions[t] < n_positions; cos / sin from RopeTable::CosSin uploaded ([n_positions]
// [head_dim / 2]). neox as RopeSpec::neox. Device pointers; `stream` a cudaStream_t.
absl::Status RopeApply(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim,
                       const int32_t* positions, const float* cos, const float* sin,
                       int64_t n_positions, bool neox, void* stream);
}  // namespace cuda

}  // namespace quantkv::kernels
