#include "moe/router.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_format.h"

namespace quantkv::moe {

const char* RouterWeightingName(RouterWeighting w) {
  switch (w) {
    case RouterWeighting::kSoftmaxTopKNormalized:
      return "softmax-topk-norm";
    case RouterWeighting::kSoftmaxTopK:
      return "softmax-topk";
    case RouterWeighting::kOnes:
      return "ones";
  }
  return "?";
}

absl::StatusOr<RouterWeighting> ParseRouterWeighting(const std::string& name) {
  for (RouterWeighting w : {RouterWeighting::kSoftmaxTopKNormalized, RouterWeighting::kSoftmaxTopK,
                            RouterWeighting::kOnes}) {
    if (name == RouterWeightingName(w)) return w;
  }
  return absl::InvalidArgumentError(absl::StrFormat(
      "router weighting '%s' is not one of softmax-topk-norm, softmax-topk, ones", name));
}

absl::Status CheckRouterConfig(const RouterConfig& c) {
  if (c.n_experts < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("router: n_experts = %d must be positive", c.n_experts));
  }
  if (c.top_k < 1 || c.top_k > c.n_experts) {
    return absl::InvalidArgumentError(
        absl::StrFormat("router: top_k = %d must be in [1, n_experts = %d]", c.top_k, c.n_experts));
  }
  return absl::OkStatus();
}

void Route(const RouterConfig& c, const float* logits, int64_t n_tokens, Routing* out) {
  const int E = c.n_experts, K = c.top_k;
  out->n_tokens = n_tokens;
  out->top_k = K;
  out->expert.resize(static_cast<size_t>(n_tokens * K));
  out->weight.resize(static_cast<size_t>(n_tokens * K));
  out->entropy.resize(static_cast<size_t>(n_tokens));
  std::vector<int32_t> order(E);
  std::vector<double> p(E);
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* z = logits + t * E;
    // Softmax in double: the weights feed every expert output, and the entropy is a sum
    // of many small terms.
    const double zmax = *std::max_element(z, z + E);
    double sum = 0;
    for (int e = 0; e < E; ++e) sum += p[e] = std::exp(static_cast<double>(z[e]) - zmax);
    double entropy = 0;
    for (int e = 0; e < E; ++e) {
      p[e] /= sum;
      if (p[e] > 0) entropy -= p[e] * std::log(p[e]);
    }
    out->entropy[t] = static_cast<float>(entropy);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + K, order.end(),
                      [z](int32_t a, int32_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); });
    double kept = 0;
    for (int j = 0; j < K; ++j) kept += p[order[j]];
    for (int j = 0; j < K; ++j) {
      const int32_t e = order[j];
      double w = 1.0;
      if (c.weighting == RouterWeighting::kSoftmaxTopKNormalized) w = p[e] / kept;
      if (c.weighting == RouterWeighting::kSoftmaxTopK) w = p[e];
      out->expert[t * K + j] = e;
      out->weight[t * K + j] = static_cast<float>(w);
    }
  }
}

void GroupByExpert(const Routing& r, int n_experts, ExpertGroups* out) {
  out->rows.assign(n_experts, {});
  out->slots.assign(n_experts, {});
  for (int64_t t = 0; t < r.n_tokens; ++t) {
    for (int j = 0; j < r.top_k; ++j) {
      const int64_t s = t * r.top_k + j;
      const int32_t e = r.expert[s];
      out->rows[e].push_back(static_cast<int32_t>(t));
      out->slots[e].push_back(static_cast<int32_t>(s));
    }
  }
}

}  // namespace quantkv::moe
