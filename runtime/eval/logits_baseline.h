// A compact record of a reference run's next-token distributions (usually the FP16-cache
// run), so later runs with other KV formats report KL divergence and top-1 agreement.
// Per scored token it keeps the top-K log-probabilities and the remaining tail mass; KL is
// then computed over those K+1 outcomes, a lower bound of the full-vocabulary KL that is
// tight when the tail is small (K = 64: the tail of SmolLM2 is typically < 5% of the mass).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace quantkv {

struct BaselineToken {
  std::vector<int32_t> ids;     // top-K ids, most likely first
  std::vector<float> logprobs;  // their log-probabilities
  float tail_logprob = 0;       // log of the probability mass outside the top K
};

struct LogitsBaseline {
  static constexpr int kTopK = 64;
  // Identifies the scored tokens, so a baseline of another text or ctx is refused.
  uint64_t tokens_hash = 0;
  int64_t ctx = 0;
  int64_t vocab = 0;
  std::vector<BaselineToken> tokens;
};

// Summarises one logit row (log-softmax taken here).
BaselineToken SummariseLogits(std::span<const float> logits, int k = LogitsBaseline::kTopK);

// KL(base || q) over the base's top-K plus tail, and whether q's argmax is base's top-1.
struct TokenDivergence {
  double kl = 0;
  bool top1_agrees = false;
};
TokenDivergence CompareToBaseline(const BaselineToken& base, std::span<const float> logits);

absl::Status WriteLogitsBaseline(const std::string& path, const LogitsBaseline& baseline);
absl::StatusOr<LogitsBaseline> ReadLogitsBaseline(const std::string& path);

uint64_t HashTokens(std::span<const int32_t> tokens);

}  // namespace quantkv
