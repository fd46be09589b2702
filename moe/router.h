// The MoE router: from each token's router logits (one per expert) to the experts it is
// sent to and the weights their outputs are summed with. Pure arithmetic on floats, no
// model: the engine computes the logits (x · W_routerᵀ) and hands them here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace quantkv::moe {

enum class RouterWeighting {
  // Softmax over all experts, keep the top k, renormalise them to sum to 1 (Mixtral;
  // Qwen2/Qwen3-MoE with norm_topk_prob = true).
  kSoftmaxTopKNormalized,
  // Softmax over all experts, keep the top k as they are (Qwen2-MoE's default).
  kSoftmaxTopK,
  // Selection only: each chosen expert's output is added with weight 1. A dense MLP split
  // into experts (MoEfication) equals the dense model with k = n_experts only this way.
  kOnes,
};

// "softmax-topk-norm", "softmax-topk", "ones".
const char* RouterWeightingName(RouterWeighting w);
absl::StatusOr<RouterWeighting> ParseRouterWeighting(const std::string& name);

struct RouterConfig {
  int n_experts = 0;
  int top_k = 0;
  RouterWeighting weighting = RouterWeighting::kSoftmaxTopKNormalized;
};

// INVALID_ARGUMENT naming the field unless 1 <= top_k <= n_experts.
absl::Status CheckRouterConfig(const RouterConfig& c);

// Routing of n_tokens tokens: token t's choices are expert[t*top_k + j], weight[t*top_k + j]
// for j < top_k, in decreasing router logit (ties: lower expert index first, so routing
// is deterministic).
struct Routing {
  int64_t n_tokens = 0;
  int top_k = 0;
  std::vector<int32_t> expert;
  std::vector<float> weight;
  // Per token, the entropy (nats) of the softmax over all experts: high when the router is
  // unsure. Signals for the precision policies.
  std::vector<float> entropy;
};

// logits: [n_tokens][n_experts].
void Route(const RouterConfig& c, const float* logits, int64_t n_tokens, Routing* out);

// Which tokens (and which of their top-k slots) go to each expert, in token order: the
// dispatch plan of a grouped expert GEMM. rows[e] lists token indices for expert e,
// slots[e] the matching index into Routing::expert / weight.
struct ExpertGroups {
  std::vector<std::vector<int32_t>> rows;
  std::vector<std::vector<int32_t>> slots;
};
void GroupByExpert(const Routing& r, int n_experts, ExpertGroups* out);

}  // namespace quantkv::moe
