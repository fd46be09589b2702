// Token sampling from logits: greedy, or temperature with top-k / top-p / min-p filtering
// and repetition / frequency / presence penalties, reproducible from a seed.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "absl/status/statusor.h"

namespace quantkv {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  int32_t top_k = 0;         // 0: off
  float top_p = 1.0f;        // 1: off
  float min_p = 0.0f;        // 0: off
  float repetition_penalty = 1.0f;  // HF semantics: divide positive logits, multiply negative
  float frequency_penalty = 0.0f;   // OpenAI semantics: minus count * penalty
  float presence_penalty = 0.0f;    // minus penalty once a token has appeared
  uint64_t seed = 0;
};

// INVALID_ARGUMENT naming the field for out-of-range values.
absl::Status ValidateSamplingParams(const SamplingParams& p);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  // `history`: tokens so far (prompt and generated), for the penalties. logits is modified.
  int32_t Sample(std::span<float> logits, std::span<const int32_t> history);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<int32_t> order_;
};

}  // namespace quantkv
