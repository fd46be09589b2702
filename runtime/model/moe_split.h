// A dense LLaMA-family model split into experts ("MoEfication"): each layer's MLP neurons
// partitioned into n_experts equal groups, and a linear router that predicts each group's
// output norm. `quantkv moefy` fits one on calibration text and writes it as a small
// safetensors file; `--moe-split FILE` then runs the dense model as an MoE model
// (MoefiedSource). With top_k = n_experts it is the dense model (its neurons summed in
// another order); with fewer, a real MoE whose quality cost is measurable.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/model/weight_source.h"

namespace quantkv {

struct MoeSplit {
  int64_t n_layers = 0, hidden = 0, intermediate = 0;
  int64_t n_experts = 0, top_k = 0;
  // Neurons always computed (a shared expert, added with weight 1): the first `shared` of
  // each layer's list; the routed experts split the rest.
  int64_t shared = 0;
  // Per layer, all `intermediate` neuron indices: the shared ones, then expert e's
  // [shared + e * Ie, shared + (e + 1) * Ie) with Ie = (intermediate - shared) / n_experts.
  std::vector<std::vector<int32_t>> neurons;
  // Per layer, the router [n_experts x hidden] and its bias [n_experts].
  std::vector<std::vector<float>> router, router_bias;
  // Free-form provenance (source model, calibration text, fit quality), kept in the file.
  std::map<std::string, std::string> notes;
};

// Consistent sizes, every layer's neurons a permutation of [0, intermediate), equal expert
// sizes, finite router values; errors name the layer and what is wrong.
absl::Status CheckMoeSplit(const MoeSplit& s);

// The file: tensors "blk.L.moe_neurons" (F32, exact small integers), "blk.L.ffn_gate_inp.weight"
// [n_experts, hidden], "blk.L.ffn_gate_inp.bias" [n_experts]; metadata n_layers, hidden,
// intermediate, n_experts, top_k and the notes.
absl::Status WriteMoeSplit(const std::string& path, const MoeSplit& s);
absl::StatusOr<MoeSplit> ReadMoeSplit(const std::string& path);

// `dense` seen as an MoE model with the split's experts: config().moe set (selection-only
// weights: experts are summed with weight 1), the dense ffn_gate/up/down replaced by
// "blk.L.ffn_gate.E.weight" etc. and the router by "blk.L.ffn_gate_inp.{weight,bias}".
// Gate/up experts are copies of whole rows in their stored type (every neuron computes
// exactly as in the dense model); down columns do not keep ggml blocks whole, so each
// expert's down is dequantized to F32. top_k = 0 keeps the split's. Errors: a split for
// another shape of model (named), a dense source that is already MoE.
absl::StatusOr<std::unique_ptr<WeightSource>> MoefiedSource(std::unique_ptr<WeightSource> dense,
                                                            const MoeSplit& split);

}  // namespace quantkv
