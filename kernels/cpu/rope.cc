#include "kernels/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace quantkv::kernels {
namespace {

double YarnCorrectionDim(double rotations, int64_t dim, double base, double context) {
  return (dim * std::log(context / (rotations * 2 * std::numbers::pi))) / (2 * std::log(base));
}

}  // namespace

RopeTable::RopeTable(const RopeSpec& spec) : spec_(spec) {
  const int64_t d = spec.head_dim;
  const int64_t half = d / 2;
  inv_freq_.resize(half);
  for (int64_t i = 0; i < half; ++i) {
    inv_freq_[i] = 1.0 / std::pow(spec.theta, static_cast<double>(2 * i) / d);
  }
  switch (spec.scaling) {
    case RopeScaling::kNone:
      break;
    case RopeScaling::kLinear:
      for (double& f : inv_freq_) f /= spec.factor;
      break;
    case RopeScaling::kYarn: {
      const double ctx = static_cast<double>(spec.original_context);
      double low = std::floor(YarnCorrectionDim(spec.yarn_beta_fast, d, spec.theta, ctx));
      double high = std::ceil(YarnCorrectionDim(spec.yarn_beta_slow, d, spec.theta, ctx));
      low = std::max(low, 0.0);
      high = std::min(high, static_cast<double>(d - 1));
      if (low == high) high += 0.001;
      for (int64_t i = 0; i < half; ++i) {
        const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
        const double extrapolation_weight = 1.0 - ramp;
        const double extrap = inv_freq_[i];
        const double interp = inv_freq_[i] / spec.factor;
        inv_freq_[i] = interp * (1.0 - extrapolation_weight) + extrap * extrapolation_weight;
      }
      magnitude_ = (spec.factor > 1.0 ? 0.1 * std::log(spec.factor) + 1.0 : 1.0) *
                   spec.yarn_attn_factor;
      break;
    }
    case RopeScaling::kLlama3: {
      const double old_ctx = static_cast<double>(spec.original_context);
      const double low_wavelen = old_ctx / spec.llama3_low_freq_factor;
      const double high_wavelen = old_ctx / spec.llama3_high_freq_factor;
      for (double& f : inv_freq_) {
        const double wavelen = 2 * std::numbers::pi / f;
        if (wavelen > low_wavelen) {
          f /= spec.factor;
        } else if (wavelen >= high_wavelen) {
          const double smooth = (old_ctx / wavelen - spec.llama3_low_freq_factor) /
                                (spec.llama3_high_freq_factor - spec.llama3_low_freq_factor);
          f = (1.0 - smooth) * f / spec.factor + smooth * f;
        }
      }
      break;
    }
  }
}

void RopeTable::Apply(float* x, int64_t n_tokens, int64_t n_heads,
                      const int32_t* positions) const {
  const int64_t d = spec_.head_dim;
  const int64_t half = d / 2;
  std::vector<float> cos_t(half), sin_t(half);
  for (int64_t t = 0; t < n_tokens; ++t) {
    // Angles in double: positions up to 1e5 times frequencies near 1 keep full fp32 accuracy.
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(positions[t]) * inv_freq_[i];
      cos_t[i] = static_cast<float>(std::cos(angle) * magnitude_);
      sin_t[i] = static_cast<float>(std::sin(angle) * magnitude_);
    }
    for (int64_t h = 0; h < n_heads; ++h) {
      float* v = x + (t * n_heads + h) * d;
      if (spec_.neox) {
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * cos_t[i] - b * sin_t[i];
          v[i + half] = a * sin_t[i] + b * cos_t[i];
        }
      } else {
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[2 * i], b = v[2 * i + 1];
          v[2 * i] = a * cos_t[i] - b * sin_t[i];
          v[2 * i + 1] = a * sin_t[i] + b * cos_t[i];
        }
      }
    }
  }
}

}  // namespace quantkv::kernels
