// Every MoE expert held at several weight precisions ("levels", e.g. Q4_0 and Q8_0 blocks),
// made once at load from the weights as loaded, so that the router-aware elastic precision
// policy (moe/expert_precision_policy.h) can switch an expert's active precision by pointing
// the layer at another copy: no requantization on the serving path. Block metadata (bytes
// per level) is kept apart from the storage, for the policy's budget.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/ggml_types.h"
#include "kernels/thread_pool.h"
#include "runtime/engine/moe_ffn.h"

namespace quantkv {

struct ExpertStoreConfig {
  // Weight types, lowest precision first (each one kernels::CanQuantizeTo).
  std::vector<kernels::GgmlType> levels;
  // Also repack each copy for the batched int8 kernels where this CPU has them.
  bool pack = false;
  kernels::ActivationPrecision activations = kernels::ActivationPrecision::kInt8;
};

class ExpertStore {
 public:
  // experts[layer][expert]: the source matrices (any dequantizable type).
  static absl::StatusOr<std::unique_ptr<ExpertStore>> Build(
      const std::vector<std::vector<ExpertMatrices>>& experts, const ExpertStoreConfig& config,
      kernels::ThreadPool* pool);

  int n_levels() const { return static_cast<int>(config_.levels.size()); }
  kernels::GgmlType level_type(int level) const { return config_.levels[level]; }
  const ExpertMatrices& At(int64_t layer, int64_t expert, int level) const {
    return copies_[(layer * n_experts_ + expert) * n_levels() + level].m;
  }
  // Bytes of one expert's three matrices at `level` (what the budget counts).
  int64_t Bytes(int64_t layer, int64_t expert, int level) const;
  // Per (layer, expert), the bytes of each level: the policy's level_bytes.
  std::vector<std::vector<int64_t>> LevelBytes() const;
  // ||W_level − W_reference||² / ||W_reference||² over the expert's three matrices.
  double RelativeError(int64_t layer, int64_t expert, int level, int reference) const;

 private:
  struct Copy {
    ExpertMatrices m;
    std::vector<uint8_t> bytes[3];  // gate, up, down
    std::unique_ptr<kernels::PackedWeights> packed[3];
  };
  ExpertStoreConfig config_;
  int64_t n_layers_ = 0, n_experts_ = 0;
  std::vector<Copy> copies_;  // [layer][expert][level]
};

}  // namespace quantkv
