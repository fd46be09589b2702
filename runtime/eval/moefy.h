// MoEfication (`quantkv moefy`): split a dense model's MLP neurons into equal experts by how
// they fire together on calibration text, and fit a router that predicts each expert's
// output norm, giving an MoE test bed whose dense original is known exactly.
//  1. Run the text through the dense model, keeping each layer's MLP input x and SwiGLU
//     activations a (EngineConfig::mlp_observer).
//  2. Per layer, cluster neurons with balanced spherical k-means on |a| over the tokens
//     (neurons active on the same tokens land in one expert; every expert gets
//     intermediate / n_experts neurons, assigned greedily by similarity under capacity).
//  3. Per layer and expert, the target is the norm of that expert's contribution to the
//     MLP output, ||W_down[:, S_e] a_S_e||; the router is a ridge least-squares fit of it
//     from x (with a bias), so top-k by predicted norm picks the experts that matter.
// The last quarter of the tokens is held out for the report.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/engine/engine.h"
#include "runtime/model/moe_split.h"

namespace quantkv {

struct MoefyOptions {
  int64_t n_experts = 8;
  int64_t top_k = 2;  // the split's default top_k (`--moe-top-k` overrides it)
  // Neurons always computed (a shared expert): the ones with the largest mean contribution
  // |a_j| x ||W_down[:, j]||; the experts split the rest.
  int64_t shared_neurons = 0;
  int64_t ctx = 512;          // window length the text is run in
  int64_t max_tokens = 4096;  // tokens of text used (fit: first 3/4, held out: the rest)
  int kmeans_iterations = 15;
  double ridge = 1e-3;  // relative to the mean diagonal of XᵀX
  uint64_t seed = 1;
  std::function<void(int64_t layer)> progress;  // after each layer is fitted
};

struct MoefyLayerReport {
  double router_r2 = 0;       // held out: R² of predicted vs true expert norms
  double oracle_recall = 0;   // held out: share of the true top-k experts the router picks
  double routed_rel_err = 0;  // held out: ||MoE MLP out − dense MLP out|| / ||dense out||
  double oracle_rel_err = 0;  // the same with the true top-k (the router's floor)
};

struct MoefyReport {
  int64_t fit_tokens = 0, heldout_tokens = 0;
  std::vector<MoefyLayerReport> layers;
};

// `make_engine` builds a dense engine of the model from a config this function fills in
// (mlp_observer, max_chunk_tokens); its weights() supply the down projections.
absl::StatusOr<MoeSplit> FitMoeSplit(
    const std::function<absl::StatusOr<std::unique_ptr<Engine>>(const EngineConfig&)>& make_engine,
    std::span<const int32_t> tokens, const MoefyOptions& options, MoefyReport* report);

}  // namespace quantkv
