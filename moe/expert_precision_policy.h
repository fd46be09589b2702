// Router-aware elastic precision for expert weights: every expert of every MoE layer is
// held at several precisions ("levels": e.g. 0 = 4-bit blocks, 1 = 8-bit blocks) and this
// policy picks each expert's ACTIVE level so that the active bytes of all experts stay
// within a budget (`--expert-budget`), spending the bytes on the experts that carry the
// most of recent traffic. Pure bookkeeping: the engine feeds it each layer's Routing and
// swaps weights on the changes Decide() returns.
//
// Importance. Per (layer, expert), two exponential moving averages over that layer's tokens,
// with decay d = 2^(-1 / half_life_tokens) per token, both starting at 0:
//   frequency  F <- d F + (1 - d) [token routes to the expert]
//   weighted   W <- d W + (1 - d) [token routes to the expert] * router weight
// mean weight = W / F (the mean router weight when routed, 0 while F = 0), and
//   score = F * mean weight * sensitivity = W * sensitivity,
// the expected share of the layer's output the expert contributes, times a per-expert
// multiplier (SetSensitivity; default 1; meant to be measured, e.g. the KL increase when
// only that expert is degraded). The ratio of two EMAs keeps the mean weight on the same
// token time scale as the frequency, rare experts included.
//
// Value of a level. level_error[l] is the relative output error of level l (strictly
// decreasing; the default is 1 at level 0 falling linearly to 0 at the top level, which is
// exact up to scale for two levels; pass measured errors for more). An expert at level l is
// worth score * (level_error[0] - level_error[l]) over keeping it at level 0.
//
// Decision (Decide). Before the first decision every expert is active at level 0. A greedy
// multiple-choice knapsack: every expert (but the pinned, below) starts the solve at level 0
// (the budget always covers that); then repeatedly the upgrade with the largest value gained
// per extra byte is applied, over all experts and all higher levels that still fit the
// remaining budget, until none fits or gains anything. Ties: larger ratio first, then lower
// layer, then lower expert; within one expert, the cheaper target level. So decisions are
// deterministic. An upgrade must gain value (> 0); the only zero-gain move allowed is back
// to the expert's current level (it costs no swap).
//
// HYSTERESIS, precisely. With e's active level c before the decision:
//   1. Bonus: in the solve, e's value at level c (only) is multiplied by (1 + hysteresis):
//        value_e(l) = score_e * (level_error[0] - level_error[l]) * (l == c ? 1 + h : 1).
//      So with two levels and equal sizes, an expert at level 1 keeps it against a
//      challenger at level 0 unless the challenger's score exceeds (1 + h) x its own.
//   2. Dwell: an expert whose level changed at decision k is pinned to that level at
//      decisions k+1 .. k+min_dwell_decisions (its bytes are reserved before the solve);
//      it may change again from decision k+min_dwell_decisions+1. Experts never changed
//      are free. min_dwell_decisions = 0 turns this off.
// Pinning keeps the solve feasible: pinned experts hold bytes the previous (feasible)
// decision already gave them, and everyone else starts at level 0 <= their current bytes.
//
// Clock. decide_every_tokens counts tokens as seen by an average layer: the sum of
// n_tokens over all Observe calls divided by n_layers (when every layer observes every
// token once, exactly the token count). MaybeDecide() decides once that many tokens have
// passed since the last decision; Decide() decides now. Either resets the clock.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "moe/router.h"

namespace quantkv::moe {

struct ExpertPrecisionConfig {
  int n_layers = 0;
  int n_experts = 0;  // per layer
  // Bytes of one expert at each level, strictly increasing with the level. Either one list
  // for every expert, or n_layers * n_experts lists, index layer * n_experts + expert. All
  // lists have the same number of levels.
  std::vector<std::vector<int64_t>> level_bytes;
  // Relative error of each level (see the file comment); empty: linear 1 .. 0.
  std::vector<double> level_error;
  // Upper bound on the summed active bytes of all experts (--expert-budget). At least the
  // sum of every expert's level-0 bytes.
  int64_t budget_bytes = 0;
  double half_life_tokens = 256;    // > 0
  int64_t decide_every_tokens = 0;  // >= 0; 0: only explicit Decide() calls
  double hysteresis = 0.2;          // >= 0; the keep bonus, see the file comment
  int min_dwell_decisions = 0;      // >= 0
};

// INVALID_ARGUMENT naming the bad field; the budget error names the minimum budget.
absl::Status CheckExpertPrecisionConfig(const ExpertPrecisionConfig& c);

// One expert's level changed: the engine swaps its weights to new_level before its next use.
struct ExpertLevelChange {
  int layer = 0;
  int expert = 0;
  int old_level = 0;
  int new_level = 0;
};

struct ExpertPrecisionStat {
  int layer = 0;
  int expert = 0;
  double frequency = 0;    // EMA share of tokens routed to it
  double mean_weight = 0;  // EMA mean router weight when routed
  double sensitivity = 1;
  double score = 0;     // frequency * mean_weight * sensitivity
  int level = 0;        // active
  int64_t bytes = 0;    // at the active level
  int64_t changes = 0;  // level changes so far
};

struct ExpertPrecisionStats {
  std::vector<ExpertPrecisionStat> experts;  // layer-major: layer * n_experts + expert
  int64_t active_bytes = 0;
  int64_t budget_bytes = 0;
  int64_t min_budget_bytes = 0;  // every expert at level 0
  int64_t decisions = 0;
  int64_t changes = 0;         // level changes over all experts and decisions
  double tokens_observed = 0;  // by the clock above
};

class ExpertPrecisionPolicy {
 public:
  static absl::StatusOr<ExpertPrecisionPolicy> Create(const ExpertPrecisionConfig& config);

  // Folds one batch of `layer`'s routing (tokens in order) into the EMAs. INVALID_ARGUMENT,
  // with nothing updated, when the layer is out of range or the routing is malformed
  // (sizes, expert ids outside [0, n_experts), an expert twice in one token, weights
  // negative or not finite).
  absl::Status Observe(int layer, const Routing& routing);

  // s >= 0 and finite; INVALID_ARGUMENT otherwise or when layer/expert is out of range.
  absl::Status SetSensitivity(int layer, int expert, double s);

  // Re-solves now (see the file comment); the changes are by layer, then expert.
  std::vector<ExpertLevelChange> Decide();
  // True once decide_every_tokens (> 0) tokens have passed since the last decision.
  bool DecisionDue() const;
  // Decide() when due, else no changes.
  std::vector<ExpertLevelChange> MaybeDecide();

  // Active level of one expert; -1 when out of range.
  int level(int layer, int expert) const;
  int n_levels() const { return n_levels_; }
  int64_t active_bytes() const { return active_bytes_; }
  ExpertPrecisionStats Stats() const;

 private:
  struct Expert {
    std::vector<int64_t> bytes;  // per level
    double frequency = 0, weighted = 0, sensitivity = 1;
    int level = 0;
    int64_t changes = 0;
    int64_t last_change_decision = -1;  // decision number, -1: never changed
  };

  explicit ExpertPrecisionPolicy(const ExpertPrecisionConfig& config);
  double Score(const Expert& e) const { return e.weighted * e.sensitivity; }

  ExpertPrecisionConfig config_;
  int n_levels_ = 0;
  double decay_ = 0;             // per token
  std::vector<Expert> experts_;  // layer * n_experts + expert
  int64_t active_bytes_ = 0, min_budget_bytes_ = 0;
  int64_t decisions_ = 0, changes_ = 0;
  int64_t layer_tokens_ = 0, layer_tokens_at_decision_ = 0;  // summed over layers
  // Observe scratch, per expert of a layer.
  std::vector<double> freq_acc_, weight_acc_;
  std::vector<int64_t> seen_in_token_;
};

}  // namespace quantkv::moe
