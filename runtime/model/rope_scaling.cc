#include "runtime/model/rope_scaling.h"

#include <cmath>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"

namespace quantkv {

absl::Status ApplyRopeScaling(std::string_view spec, ModelConfig* config) {
  if (spec.empty() || spec == "model") return absl::OkStatus();
  const size_t colon = spec.find(':');
  const std::string kind(spec.substr(0, colon));
  float factor = 0;
  if (colon == std::string_view::npos ||
      !absl::SimpleAtof(std::string(spec.substr(colon + 1)), &factor) || !(factor > 1.0f) ||
      factor > 64.0f) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--rope-scaling '%s': want linear:F, ntk:F or yarn:F with 1 < F <= 64 (or 'model')",
        std::string(spec)));
  }
  if (config->rope.scaling != RopeScalingType::kNone) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--rope-scaling '%s': the model already declares RoPE scaling; stacking a second one "
        "is not supported",
        std::string(spec)));
  }
  RopeConfig& rope = config->rope;
  if (kind == "linear") {
    rope.scaling = RopeScalingType::kLinear;
    rope.factor = factor;
  } else if (kind == "ntk") {
    // NTK-aware scaling keeps the highest frequency and stretches the lowest by F: the
    // base grows so that theta'^((d-2)/d) = F * theta^((d-2)/d).
    const double d = static_cast<double>(config->head_dim);
    rope.theta = static_cast<float>(rope.theta * std::pow(factor, d / (d - 2)));
  } else if (kind == "yarn") {
    rope.scaling = RopeScalingType::kYarn;
    rope.factor = factor;
    rope.original_context = config->context_length;
  } else {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--rope-scaling '%s': unknown kind '%s' (linear, ntk, yarn)", std::string(spec), kind));
  }
  config->context_length =
      static_cast<int64_t>(std::llround(static_cast<double>(config->context_length) * factor));
  return absl::OkStatus();
}

}  // namespace quantkv
