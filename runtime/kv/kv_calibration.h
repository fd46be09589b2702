// Calibration of KV-cache scales from K/V activations seen on calibration text
// (`quantkv calibrate`). Two things are calibrated, both written into a KV policy file:
//  - static scales for codecs with `static` granularity: one affine map per channel (or one
//    per tensor), from min-max, a percentile (alpha) or the MSE-optimal clip ratio;
//  - for codecs with dynamic scales (computed at write time), the MSE-optimal clip ratio
//    per layer and K|V, found by a grid search through the codec itself.
// The calibrator is pure arithmetic over the rows it is given; the engine feeds it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/kv/kv_policy.h"

namespace quantkv {

enum class CalibrationMethod { kMinMax, kPercentile, kMse };

absl::StatusOr<CalibrationMethod> ParseCalibrationMethod(const std::string& name);
std::string CalibrationMethodName(CalibrationMethod m);

struct KvCalibrationConfig {
  int64_t n_layers = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  KvPolicy policy;  // what to calibrate for: codecs, block size, rope=pre|post
  CalibrationMethod method = CalibrationMethod::kMinMax;
  double alpha = 0.999;       // kPercentile: keep the [1 - alpha, alpha] quantiles
  bool per_tensor = false;    // static scales: one map per (layer, K|V) instead of per channel
  int64_t max_tokens = 4096;  // rows kept per layer (the first ones seen)
};

class KvCalibrator {
 public:
  static absl::StatusOr<KvCalibrator> Create(const KvCalibrationConfig& config);

  // K rows as the cache encodes them (pre-RoPE when policy.pre_rope_keys) and V rows,
  // [n][n_kv_heads * head_dim], of one layer. Rows past max_tokens are ignored.
  void Add(int64_t layer, int64_t n, const float* k, const float* v);
  int64_t tokens(int64_t layer) const { return static_cast<int64_t>(k_[layer].size()) / row(); }

  // The calibrated policy: the input policy with static scales filled in and, for kMse,
  // dynamic codecs' clip ratios set per layer. FAILED_PRECONDITION without enough rows
  // (at least one block per layer).
  absl::StatusOr<KvPolicy> Finish() const;

 private:
  explicit KvCalibrator(const KvCalibrationConfig& config);
  int64_t row() const { return config_.n_kv_heads * config_.head_dim; }
  // Static scales of one layer's K or V from its rows.
  StaticScales StaticFor(const kernels::KvCodecSpec& spec, const std::vector<float>& rows) const;
  // Best clip for a dynamic codec over one layer's rows (grid search, encode + decode).
  absl::StatusOr<float> ClipFor(const kernels::KvCodecSpec& spec,
                                const std::vector<float>& rows) const;

  KvCalibrationConfig config_;
  std::vector<std::vector<float>> k_, v_;  // [layer][tokens * row], as the cache encodes them
  std::vector<float> signs_;               // Hadamard signs when the policy rotates
};

// The calibration file: the policy in the KV policy file format (kv_policy.h) with its
// static scales, plus a record of how it was made.
std::string KvPolicyFileJson(const KvPolicy& policy, const std::string& provenance_json);

}  // namespace quantkv
