#include "kernels/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace quantkv::kernels {
namespace {

double YarnCorrectionDim(double rotations, int64_t dim, double base, double context) {
  return (dim * std::log(context / (rotations * 2 * std::numbers::pi))) / (2 * std::log(base));
}

// The cos and sin (magnitude included) that rotate pair i at `position`, for every pair. The one
// place they are computed, so that Apply, the cache and the device table (CosSin) agree bit for
// bit. Angles in double: positions up to 1e5 times frequencies near 1 keep full fp32 accuracy.
void PositionCosSin(const std::vector<double>& inv_freq, double magnitude, int64_t position,
                    float* cos_out, float* sin_out) {
  const int64_t half = static_cast<int64_t>(inv_freq.size());
  for (int64_t i = 0; i < half; ++i) {
    const double angle = static_cast<double>(position) * inv_freq[i];
    cos_out[i] = static_cast<float>(std::cos(angle) * magnitude);
    sin_out[i] = static_cast<float>(std::sin(angle) * magnitude);
  }
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
      magnitude_ =
          (spec.factor > 1.0 ? 0.1 * std::log(spec.factor) + 1.0 : 1.0) * spec.yarn_attn_factor;
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

void RopeTable::Apply(float* x, int64_t n_tokens, int64_t n_heads, const int32_t* positions) const {
  const int64_t d = spec_.head_dim;
  const int64_t half = d / 2;
  std::vector<float> cos_t(half), sin_t(half);
  for (int64_t t = 0; t < n_tokens; ++t) {
    PositionCosSin(inv_freq_, magnitude_, positions[t], cos_t.data(), sin_t.data());
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

void RopeTable::Precompute(int64_t n_positions) {
  const int64_t half = spec_.head_dim / 2;
  cos_cache_.resize(n_positions * half);
  sin_cache_.resize(n_positions * half);
  for (int64_t p = 0; p < n_positions; ++p) {
    PositionCosSin(inv_freq_, magnitude_, p, cos_cache_.data() + p * half,
                   sin_cache_.data() + p * half);
  }
  cached_positions_ = n_positions;
}

void RopeTable::CosSin(int64_t n_positions, std::vector<float>* cos,
                       std::vector<float>* sin) const {
  const int64_t half = spec_.head_dim / 2;
  n_positions = std::max<int64_t>(n_positions, 0);
  cos->resize(n_positions * half);
  sin->resize(n_positions * half);
  // The cache holds exactly these values; reuse what Precompute already paid for.
  const int64_t cached = std::min(n_positions, cached_positions_);
  std::copy(cos_cache_.begin(), cos_cache_.begin() + cached * half, cos->begin());
  std::copy(sin_cache_.begin(), sin_cache_.begin() + cached * half, sin->begin());
  for (int64_t p = cached; p < n_positions; ++p) {
    PositionCosSin(inv_freq_, magnitude_, p, cos->data() + p * half, sin->data() + p * half);
  }
}

void RopeTable::RotateRows(float* x, int64_t n, int64_t first_position, bool inverse) const {
  const int64_t d = spec_.head_dim;
  const int64_t half = d / 2;
  // The inverse of magnitude * R(angle) is R(-angle) / magnitude.
  const float inv_mag2 = static_cast<float>(1.0 / (magnitude_ * magnitude_));
  float cos_buf[512], sin_buf[512];
  for (int64_t r = 0; r < n; ++r) {
    const int64_t p = first_position + r;
    const float* c;
    const float* s;
    if (p < cached_positions_) {
      c = cos_cache_.data() + p * half;
      s = sin_cache_.data() + p * half;
    } else {
      PositionCosSin(inv_freq_, magnitude_, p, cos_buf, sin_buf);
      c = cos_buf;
      s = sin_buf;
    }
    float* v = x + r * d;
    const float sign = inverse ? -1.0f : 1.0f;
    const float mul = inverse ? inv_mag2 : 1.0f;
    const int64_t stride = spec_.neox ? 1 : 2;
    const int64_t second = spec_.neox ? half : 1;
    for (int64_t i = 0; i < half; ++i) {
      float& a = v[i * stride];
      float& b = v[i * stride + second];
      const float ci = c[i] * mul, si = sign * s[i] * mul;
      const float a0 = a, b0 = b;
      a = a0 * ci - b0 * si;
      b = a0 * si + b0 * ci;
    }
  }
}

}  // namespace quantkv::kernels
