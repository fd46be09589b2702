#include "runtime/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_format.h"

namespace quantkv {

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  auto bad = [](const char* field, double v, const char* range) {
    return absl::InvalidArgumentError(
        absl::StrFormat("sampling: %s = %g is out of range (%s)", field, v, range));
  };
  if (!(p.temperature >= 0.0f && p.temperature <= 100.0f)) {
    return bad("temperature", p.temperature, "0..100");
  }
  if (p.top_k < 0) return bad("top_k", p.top_k, ">= 0");
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) return bad("top_p", p.top_p, "(0, 1]");
  if (!(p.min_p >= 0.0f && p.min_p < 1.0f)) return bad("min_p", p.min_p, "[0, 1)");
  if (!(p.repetition_penalty > 0.0f && p.repetition_penalty <= 10.0f)) {
    return bad("repetition_penalty", p.repetition_penalty, "(0, 10]");
  }
  if (!(std::fabs(p.frequency_penalty) <= 2.0f)) {
    return bad("frequency_penalty", p.frequency_penalty, "-2..2");
  }
  if (!(std::fabs(p.presence_penalty) <= 2.0f)) {
    return bad("presence_penalty", p.presence_penalty, "-2..2");
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

int32_t Sampler::Sample(std::span<float> logits, std::span<const int32_t> history) {
  const int32_t n = static_cast<int32_t>(logits.size());
  if (params_.repetition_penalty != 1.0f || params_.frequency_penalty != 0.0f ||
      params_.presence_penalty != 0.0f) {
    absl::flat_hash_map<int32_t, int32_t> counts;
    for (int32_t t : history) {
      if (t >= 0 && t < n) ++counts[t];
    }
    for (const auto& [t, c] : counts) {
      float& l = logits[t];
      if (params_.repetition_penalty != 1.0f) {
        l = l > 0 ? l / params_.repetition_penalty : l * params_.repetition_penalty;
      }
      l -= params_.frequency_penalty * static_cast<float>(c) + params_.presence_penalty;
    }
  }
  if (params_.temperature == 0.0f) {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  // Candidates sorted by logit; top-k first bounds the sort.
  order_.resize(n);
  std::iota(order_.begin(), order_.end(), 0);
  int32_t k = params_.top_k > 0 ? std::min(params_.top_k, n) : n;
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b]; };
  std::partial_sort(order_.begin(), order_.begin() + k, order_.end(), by_logit);
  order_.resize(k);
  std::vector<double> probs(k);
  const double mx = logits[order_[0]];
  double z = 0;
  for (int32_t i = 0; i < k; ++i) {
    probs[i] = std::exp((logits[order_[i]] - mx) / params_.temperature);
    z += probs[i];
  }
  for (double& p : probs) p /= z;
  // min-p: drop tokens below min_p times the top probability.
  int32_t keep = k;
  if (params_.min_p > 0.0f) {
    while (keep > 1 && probs[keep - 1] < params_.min_p * probs[0]) --keep;
  }
  // top-p: the smallest prefix whose mass reaches top_p.
  if (params_.top_p < 1.0f) {
    double cum = 0;
    for (int32_t i = 0; i < keep; ++i) {
      cum += probs[i];
      if (cum >= params_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double mass = 0;
  for (int32_t i = 0; i < keep; ++i) mass += probs[i];
  std::uniform_real_distribution<double> u(0.0, mass);
  double r = u(rng_);
  for (int32_t i = 0; i < keep; ++i) {
    r -= probs[i];
    if (r <= 0) return order_[i];
  }
  return order_[keep - 1];
}

}  // namespace quantkv
