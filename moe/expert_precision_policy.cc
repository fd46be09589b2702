#include "moe/expert_precision_policy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <queue>
#include <utility>

#include "absl/strings/str_format.h"

namespace quantkv::moe {
namespace {

absl::Status CheckLevelBytes(const ExpertPrecisionConfig& c, int64_t* min_budget) {
  const size_t n_items = static_cast<size_t>(c.n_layers) * static_cast<size_t>(c.n_experts);
  if (c.level_bytes.size() != 1 && c.level_bytes.size() != n_items) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "expert precision: level_bytes has %d lists; want 1 (every expert) or n_layers * "
        "n_experts = %d",
        c.level_bytes.size(), n_items));
  }
  const size_t n_levels = c.level_bytes[0].size();
  for (size_t i = 0; i < c.level_bytes.size(); ++i) {
    const std::vector<int64_t>& b = c.level_bytes[i];
    if (b.empty()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("expert precision: level_bytes[%d] is empty; want >= 1 level", i));
    }
    if (b.size() != n_levels) {
      return absl::InvalidArgumentError(
          absl::StrFormat("expert precision: level_bytes[%d] has %d levels but level_bytes[0] "
                          "has %d; every expert needs the same levels",
                          i, b.size(), n_levels));
    }
    for (size_t l = 0; l < b.size(); ++l) {
      if (b[l] <= 0) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "expert precision: level_bytes[%d][%d] = %d must be positive", i, l, b[l]));
      }
      if (l > 0 && b[l] <= b[l - 1]) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "expert precision: level_bytes[%d] must increase strictly with the level, but "
            "level %d has %d bytes and level %d has %d",
            i, l - 1, b[l - 1], l, b[l]));
      }
    }
  }
  // Every expert at level 0; a single list covers all n_items experts.
  int64_t sum = 0;
  for (size_t i = 0; i < n_items; ++i) {
    const int64_t b = c.level_bytes[c.level_bytes.size() == 1 ? 0 : i][0];
    if (__builtin_add_overflow(sum, b, &sum)) {
      return absl::InvalidArgumentError(
          "expert precision: the level-0 bytes of all experts overflow int64 (level_bytes)");
    }
  }
  *min_budget = sum;
  return absl::OkStatus();
}

absl::Status CheckLevelError(const ExpertPrecisionConfig& c) {
  if (c.level_error.empty()) return absl::OkStatus();
  const size_t n_levels = c.level_bytes[0].size();
  if (c.level_error.size() != n_levels) {
    return absl::InvalidArgumentError(
        absl::StrFormat("expert precision: level_error has %d entries; want one per level (%d)",
                        c.level_error.size(), n_levels));
  }
  for (size_t l = 0; l < n_levels; ++l) {
    const double e = c.level_error[l];
    if (!std::isfinite(e) || e < 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("expert precision: level_error[%d] = %g must be finite and >= 0", l, e));
    }
    if (l > 0 && e >= c.level_error[l - 1]) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "expert precision: level_error must decrease strictly with the level, but "
          "level_error[%d] = %g and level_error[%d] = %g",
          l - 1, c.level_error[l - 1], l, e));
    }
  }
  return absl::OkStatus();
}

// What the solve needs of one expert.
struct SolveItem {
  int level = 0;  // in the solve
  bool pinned = false;
};

// The best upgrade of one expert from its solve level: the greedy's queue entry.
struct Candidate {
  double ratio = 0;   // value gained per extra byte
  int64_t index = 0;  // layer * n_experts + expert, so lower means lower layer, then expert
  int target = 0;
  int64_t extra = 0;  // bytes
};

// Priority: larger ratio, then lower index (the header's tie rule).
struct CandidateLess {
  bool operator()(const Candidate& a, const Candidate& b) const {
    if (a.ratio != b.ratio) return a.ratio < b.ratio;
    return a.index > b.index;
  }
};

}  // namespace

absl::Status CheckExpertPrecisionConfig(const ExpertPrecisionConfig& c) {
  if (c.n_layers < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("expert precision: n_layers = %d must be positive", c.n_layers));
  }
  if (c.n_experts < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("expert precision: n_experts = %d must be positive", c.n_experts));
  }
  int64_t min_budget = 0;
  if (absl::Status s = CheckLevelBytes(c, &min_budget); !s.ok()) return s;
  if (absl::Status s = CheckLevelError(c); !s.ok()) return s;
  if (!std::isfinite(c.half_life_tokens) || c.half_life_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "expert precision: half_life_tokens = %g must be finite and > 0", c.half_life_tokens));
  }
  if (c.decide_every_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("expert precision: decide_every_tokens = %d must be >= 0 (0: only "
                        "explicit decisions)",
                        c.decide_every_tokens));
  }
  if (!std::isfinite(c.hysteresis) || c.hysteresis < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("expert precision: hysteresis = %g must be finite and >= 0", c.hysteresis));
  }
  if (c.min_dwell_decisions < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "expert precision: min_dwell_decisions = %d must be >= 0", c.min_dwell_decisions));
  }
  if (c.budget_bytes < min_budget) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "expert precision: budget_bytes (--expert-budget) = %d is below the minimum budget "
        "%d bytes (every expert at level 0)",
        c.budget_bytes, min_budget));
  }
  return absl::OkStatus();
}

absl::StatusOr<ExpertPrecisionPolicy> ExpertPrecisionPolicy::Create(
    const ExpertPrecisionConfig& config) {
  if (absl::Status s = CheckExpertPrecisionConfig(config); !s.ok()) return s;
  return ExpertPrecisionPolicy(config);
}

ExpertPrecisionPolicy::ExpertPrecisionPolicy(const ExpertPrecisionConfig& config)
    : config_(config), n_levels_(static_cast<int>(config.level_bytes[0].size())) {
  if (config_.level_error.empty()) {
    // Linear 1 .. 0: for two levels any default is the same up to scale.
    for (int l = 0; l < n_levels_; ++l) {
      config_.level_error.push_back(n_levels_ == 1 ? 1.0 : 1.0 - double(l) / (n_levels_ - 1));
    }
  }
  decay_ = std::exp2(-1.0 / config_.half_life_tokens);
  const size_t n = static_cast<size_t>(config_.n_layers) * config_.n_experts;
  experts_.resize(n);
  for (size_t i = 0; i < n; ++i) {
    experts_[i].bytes = config_.level_bytes[config_.level_bytes.size() == 1 ? 0 : i];
    active_bytes_ += experts_[i].bytes[0];
  }
  min_budget_bytes_ = active_bytes_;
  freq_acc_.resize(config_.n_experts);
  weight_acc_.resize(config_.n_experts);
  seen_in_token_.resize(config_.n_experts);
}

absl::Status ExpertPrecisionPolicy::Observe(int layer, const Routing& r) {
  const int E = config_.n_experts;
  if (layer < 0 || layer >= config_.n_layers) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "expert precision: layer %d is outside [0, n_layers = %d)", layer, config_.n_layers));
  }
  if (r.n_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("expert precision: routing n_tokens = %d is negative", r.n_tokens));
  }
  if (r.n_tokens == 0) return absl::OkStatus();
  if (r.top_k < 1 || r.top_k > E) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "expert precision: routing top_k = %d must be in [1, n_experts = %d]", r.top_k, E));
  }
  // n_tokens <= size first, so the product cannot overflow.
  const auto want = static_cast<uint64_t>(r.n_tokens);
  if (want > r.expert.size() || want * r.top_k != r.expert.size() ||
      r.weight.size() != r.expert.size()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "expert precision: routing has %d expert ids and %d weights; want n_tokens * top_k = "
        "%d * %d of each",
        r.expert.size(), r.weight.size(), r.n_tokens, r.top_k));
  }
  // Validate everything before touching the EMAs, so a bad batch changes nothing.
  std::fill(seen_in_token_.begin(), seen_in_token_.end(), -1);
  for (int64_t t = 0; t < r.n_tokens; ++t) {
    for (int j = 0; j < r.top_k; ++j) {
      const int64_t s = t * r.top_k + j;
      const int32_t e = r.expert[s];
      if (e < 0 || e >= E) {
        return absl::InvalidArgumentError(
            absl::StrFormat("expert precision: routing expert[%d] = %d (token %d) is outside "
                            "[0, n_experts = %d)",
                            s, e, t, E));
      }
      if (seen_in_token_[e] == t) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "expert precision: routing token %d lists expert %d twice (expert[%d])", t, e, s));
      }
      seen_in_token_[e] = t;
      const float w = r.weight[s];
      if (!std::isfinite(w) || w < 0) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "expert precision: routing weight[%d] = %g (token %d) must be finite and >= 0", s, w,
            t));
      }
    }
  }
  // Token t of n is decayed n-1-t times after its own update, so its contribution is
  // (1 - d) d^(n-1-t); walk backwards to build the powers by multiplication.
  std::fill(freq_acc_.begin(), freq_acc_.end(), 0.0);
  std::fill(weight_acc_.begin(), weight_acc_.end(), 0.0);
  double factor = 1.0 - decay_;
  for (int64_t t = r.n_tokens - 1; t >= 0 && factor > 0; --t, factor *= decay_) {
    for (int j = 0; j < r.top_k; ++j) {
      const int64_t s = t * r.top_k + j;
      freq_acc_[r.expert[s]] += factor;
      weight_acc_[r.expert[s]] += factor * r.weight[s];
    }
  }
  const double batch_decay = std::pow(decay_, static_cast<double>(r.n_tokens));
  for (int e = 0; e < E; ++e) {
    Expert& x = experts_[static_cast<size_t>(layer) * E + e];
    x.frequency = x.frequency * batch_decay + freq_acc_[e];
    x.weighted = x.weighted * batch_decay + weight_acc_[e];
  }
  layer_tokens_ += r.n_tokens;
  return absl::OkStatus();
}

absl::Status ExpertPrecisionPolicy::SetSensitivity(int layer, int expert, double s) {
  if (layer < 0 || layer >= config_.n_layers || expert < 0 || expert >= config_.n_experts) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "expert precision: sensitivity for (layer %d, expert %d) is outside n_layers = %d, "
        "n_experts = %d",
        layer, expert, config_.n_layers, config_.n_experts));
  }
  if (!std::isfinite(s) || s < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "expert precision: sensitivity of (layer %d, expert %d) = %g must be finite and >= 0",
        layer, expert, s));
  }
  experts_[static_cast<size_t>(layer) * config_.n_experts + expert].sensitivity = s;
  return absl::OkStatus();
}

std::vector<ExpertLevelChange> ExpertPrecisionPolicy::Decide() {
  const int64_t decision = ++decisions_;
  layer_tokens_at_decision_ = layer_tokens_;
  const std::vector<double>& err = config_.level_error;
  const double keep_bonus = 1.0 + config_.hysteresis;
  auto value = [&](const Expert& x, int l) {
    return Score(x) * (err[0] - err[l]) * (l == x.level ? keep_bonus : 1.0);
  };

  // Pinned experts reserve their current bytes; everyone else starts at level 0.
  std::vector<SolveItem> items(experts_.size());
  int64_t remaining = config_.budget_bytes;
  for (size_t i = 0; i < experts_.size(); ++i) {
    const Expert& x = experts_[i];
    items[i].pinned = config_.min_dwell_decisions > 0 && x.last_change_decision >= 0 &&
                      decision - x.last_change_decision <= config_.min_dwell_decisions;
    items[i].level = items[i].pinned ? x.level : 0;
    remaining -= x.bytes[items[i].level];
  }

  // The best upgrade of expert i that fits `remaining`; false when none gains anything.
  auto best = [&](size_t i, Candidate* out) {
    const Expert& x = experts_[i];
    const int a = items[i].level;
    bool found = false;
    for (int b = a + 1; b < n_levels_; ++b) {
      const int64_t extra = x.bytes[b] - x.bytes[a];
      if (extra > remaining) break;  // bytes grow with the level
      const double gain = value(x, b) - value(x, a);
      // Zero gain only to stay where it is: that needs no swap.
      if (!(gain > 0 || (gain == 0 && b == x.level))) continue;
      const double ratio = gain / static_cast<double>(extra);
      if (!found || ratio > out->ratio) {  // strict: ties keep the cheaper level
        *out = {.ratio = ratio, .index = static_cast<int64_t>(i), .target = b, .extra = extra};
        found = true;
      }
    }
    return found;
  };

  std::priority_queue<Candidate, std::vector<Candidate>, CandidateLess> queue;
  Candidate c;
  for (size_t i = 0; i < experts_.size(); ++i) {
    if (!items[i].pinned && best(i, &c)) queue.push(c);
  }
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    const size_t i = static_cast<size_t>(top.index);
    // The budget only shrinks, so a stale entry that no longer fits is recomputed against
    // what is left (a smaller upgrade of the same expert may still fit).
    if (top.extra <= remaining) {
      items[i].level = top.target;
      remaining -= top.extra;
    }
    if (best(i, &c)) queue.push(c);
  }

  std::vector<ExpertLevelChange> changes;
  for (size_t i = 0; i < experts_.size(); ++i) {
    Expert& x = experts_[i];
    if (items[i].level == x.level) continue;
    changes.push_back({.layer = static_cast<int>(i / config_.n_experts),
                       .expert = static_cast<int>(i % config_.n_experts),
                       .old_level = x.level,
                       .new_level = items[i].level});
    active_bytes_ += x.bytes[items[i].level] - x.bytes[x.level];
    x.level = items[i].level;
    x.last_change_decision = decision;
    ++x.changes;
  }
  changes_ += static_cast<int64_t>(changes.size());
  return changes;
}

bool ExpertPrecisionPolicy::DecisionDue() const {
  // Floor division keeps D * n_layers from overflowing: floor(delta / n) >= D <=> delta >= D n.
  return config_.decide_every_tokens > 0 &&
         (layer_tokens_ - layer_tokens_at_decision_) / config_.n_layers >=
             config_.decide_every_tokens;
}

std::vector<ExpertLevelChange> ExpertPrecisionPolicy::MaybeDecide() {
  if (!DecisionDue()) return {};
  return Decide();
}

int ExpertPrecisionPolicy::level(int layer, int expert) const {
  if (layer < 0 || layer >= config_.n_layers || expert < 0 || expert >= config_.n_experts) {
    return -1;
  }
  return experts_[static_cast<size_t>(layer) * config_.n_experts + expert].level;
}

ExpertPrecisionStats ExpertPrecisionPolicy::Stats() const {
  ExpertPrecisionStats s;
  s.experts.reserve(experts_.size());
  for (size_t i = 0; i < experts_.size(); ++i) {
    const Expert& x = experts_[i];
    s.experts.push_back({.layer = static_cast<int>(i / config_.n_experts),
                         .expert = static_cast<int>(i % config_.n_experts),
                         .frequency = x.frequency,
                         .mean_weight = x.frequency > 0 ? x.weighted / x.frequency : 0.0,
                         .sensitivity = x.sensitivity,
                         .score = Score(x),
                         .level = x.level,
                         .bytes = x.bytes[x.level],
                         .changes = x.changes});
  }
  s.active_bytes = active_bytes_;
  s.budget_bytes = config_.budget_bytes;
  s.min_budget_bytes = min_budget_bytes_;
  s.decisions = decisions_;
  s.changes = changes_;
  s.tokens_observed = static_cast<double>(layer_tokens_) / config_.n_layers;
  return s;
}

}  // namespace quantkv::moe
