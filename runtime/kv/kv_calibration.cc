#include "runtime/kv/kv_calibration.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "absl/strings/str_format.h"
#include "kernels/hadamard.h"
#include "kernels/kv_clip_model.h"
#include "kernels/kv_codebook.h"
#include "kernels/kv_codec.h"
#include "kernels/kv_vector_quant.h"
#include "nlohmann/json.hpp"

namespace quantkv {
namespace {

// Clip ratios searched: 1 (min-max) down to 0.3 of the observed range.
constexpr int kClipSteps = 36;
float ClipAt(int i) { return 1.0f - 0.02f * static_cast<float>(i); }

// Squared error of x under an asymmetric b-bit map over [lo, hi], or a symmetric one with
// max |x| = amax (lo, hi unused).
double QuantError(const std::vector<float>& x, int bits, bool sym, float lo, float hi) {
  double err = 0;
  if (sym) {
    const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
    const float s = std::max(std::fabs(lo), std::fabs(hi)) / qmax;
    const float inv = s > 0 ? 1.0f / s : 0.0f;
    for (float v : x) {
      const float q = std::clamp(std::nearbyint(v * inv), -qmax, qmax);
      const double e = static_cast<double>(v) - q * s;
      err += e * e;
    }
    return err;
  }
  const float top = static_cast<float>((1 << bits) - 1);
  const float s = (hi - lo) / top;
  const float inv = s > 0 ? 1.0f / s : 0.0f;
  for (float v : x) {
    const float q = std::clamp(std::nearbyint((v - lo) * inv), 0.0f, top);
    const double e = static_cast<double>(v) - (lo + q * s);
    err += e * e;
  }
  return err;
}

float Quantile(std::vector<float> x, double p) {
  const size_t k = static_cast<size_t>(std::clamp(p, 0.0, 1.0) * static_cast<double>(x.size() - 1));
  std::nth_element(x.begin(), x.begin() + static_cast<std::ptrdiff_t>(k), x.end());
  return x[k];
}

}  // namespace

absl::StatusOr<CalibrationMethod> ParseCalibrationMethod(const std::string& name) {
  if (name == "minmax") return CalibrationMethod::kMinMax;
  if (name == "percentile") return CalibrationMethod::kPercentile;
  if (name == "mse") return CalibrationMethod::kMse;
  return absl::InvalidArgumentError(
      absl::StrFormat("calibration method '%s' unknown (want minmax, percentile or mse)", name));
}

std::string CalibrationMethodName(CalibrationMethod m) {
  switch (m) {
    case CalibrationMethod::kMinMax:
      return "minmax";
    case CalibrationMethod::kPercentile:
      return "percentile";
    case CalibrationMethod::kMse:
      return "mse";
  }
  return "?";
}

absl::StatusOr<KvCalibrator> KvCalibrator::Create(const KvCalibrationConfig& c) {
  if (c.n_layers <= 0 || c.n_kv_heads <= 0 || c.head_dim <= 0) {
    return absl::InvalidArgumentError("calibration: model geometry must be positive");
  }
  if (!(c.alpha > 0.5 && c.alpha <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("calibration: --alpha %g must be in (0.5, 1]", c.alpha));
  }
  if ((c.policy.rotate_k || c.policy.rotate_v) && (c.head_dim & (c.head_dim - 1)) != 0) {
    return absl::InvalidArgumentError("calibration: rotate= needs a power-of-two head_dim");
  }
  if (c.max_tokens < c.policy.block_tokens) {
    return absl::InvalidArgumentError(
        absl::StrFormat("calibration: %d tokens are fewer than one cache block (%d)", c.max_tokens,
                        c.policy.block_tokens));
  }
  return KvCalibrator(c);
}

KvCalibrator::KvCalibrator(const KvCalibrationConfig& c)
    : config_(c), k_(c.n_layers), v_(c.n_layers) {
  if (c.policy.rotate_k || c.policy.rotate_v) {
    signs_ = kernels::HadamardSigns(c.head_dim, kernels::kKvRotationSeed);
  }
}

void KvCalibrator::Add(int64_t layer, int64_t n, const float* k, const float* v) {
  if (layer < 0 || layer >= config_.n_layers) return;
  const int64_t room = config_.max_tokens - tokens(layer);
  const int64_t take = std::clamp<int64_t>(n, 0, room);
  k_[layer].insert(k_[layer].end(), k, k + take * row());
  v_[layer].insert(v_[layer].end(), v, v + take * row());
  // Rotated caches encode rotated rows: calibrate those.
  const int64_t rows = take * config_.n_kv_heads;
  if (config_.policy.rotate_k) {
    kernels::HadamardRotate(k_[layer].data() + k_[layer].size() - take * row(), rows,
                            config_.head_dim, signs_.data(), /*inverse=*/false);
  }
  if (config_.policy.rotate_v) {
    kernels::HadamardRotate(v_[layer].data() + v_[layer].size() - take * row(), rows,
                            config_.head_dim, signs_.data(), /*inverse=*/false);
  }
}

StaticScales KvCalibrator::StaticFor(const kernels::KvCodecSpec& spec,
                                     const std::vector<float>& rows) const {
  const int64_t r = row();
  const int64_t n = static_cast<int64_t>(rows.size()) / r;
  const bool sym = spec.symmetric;
  const int bits = spec.bits;
  StaticScales out;
  out.scale.resize(r);
  if (!sym) out.min.resize(r);
  // One column of values per channel, or all of them for a per-tensor map.
  auto fit = [&](const std::vector<float>& x, float* scale, float* min) {
    float lo = *std::min_element(x.begin(), x.end());
    float hi = *std::max_element(x.begin(), x.end());
    switch (config_.method) {
      case CalibrationMethod::kMinMax:
        break;
      case CalibrationMethod::kPercentile:
        if (sym) {
          std::vector<float> a(x.size());
          for (size_t i = 0; i < x.size(); ++i) a[i] = std::fabs(x[i]);
          hi = Quantile(std::move(a), config_.alpha);
          lo = -hi;
        } else {
          lo = Quantile(x, 1.0 - config_.alpha);
          hi = Quantile(x, config_.alpha);
        }
        break;
      case CalibrationMethod::kMse: {
        // Shrink the range around its midpoint (asym) or the max |x| (sym), as the
        // dynamic codecs' clip does, keeping the ratio with the least squared error.
        double best = std::numeric_limits<double>::infinity();
        float best_lo = lo, best_hi = hi;
        const float mid = 0.5f * (lo + hi), half = 0.5f * (hi - lo);
        const float amax = std::max(std::fabs(lo), std::fabs(hi));
        for (int i = 0; i < kClipSteps; ++i) {
          const float c = ClipAt(i);
          const float l = sym ? -c * amax : mid - c * half;
          const float h = sym ? c * amax : mid + c * half;
          const double e = QuantError(x, bits, sym, l, h);
          if (e < best) {
            best = e;
            best_lo = l;
            best_hi = h;
          }
        }
        lo = best_lo;
        hi = best_hi;
        break;
      }
    }
    if (sym) {
      *scale = std::max(std::fabs(lo), std::fabs(hi)) / static_cast<float>((1 << (bits - 1)) - 1);
    } else {
      *scale = (hi - lo) / static_cast<float>((1 << bits) - 1);
      *min = lo;
    }
  };
  std::vector<float> col;
  if (config_.per_tensor) {
    col.assign(rows.begin(), rows.end());
    float scale = 0, min = 0;
    fit(col, &scale, &min);
    std::fill(out.scale.begin(), out.scale.end(), scale);
    if (!sym) std::fill(out.min.begin(), out.min.end(), min);
    return out;
  }
  col.resize(static_cast<size_t>(n));
  for (int64_t ch = 0; ch < r; ++ch) {
    for (int64_t t = 0; t < n; ++t) col[t] = rows[t * r + ch];
    float min = 0;
    fit(col, &out.scale[ch], sym ? &min : &out.min[ch]);
  }
  return out;
}

absl::StatusOr<float> KvCalibrator::ClipFor(const kernels::KvCodecSpec& spec,
                                            const std::vector<float>& rows) const {
  const int64_t d = config_.head_dim;
  const int64_t r = row();
  const int64_t bt = config_.policy.block_tokens;
  const int64_t n_blocks = static_cast<int64_t>(rows.size()) / r / bt;
  std::vector<float> x(bt * d), y(bt * d);
  double best = std::numeric_limits<double>::infinity();
  float best_clip = 1.0f;
  // Clips below 0.5 never won on real activations and double the search time.
  for (int i = 0; ClipAt(i) >= 0.5f - 1e-6f; ++i) {
    kernels::KvCodecSpec s = spec;
    s.clip = ClipAt(i);
    absl::StatusOr<std::unique_ptr<kernels::KvCodec>> codec = kernels::KvCodec::Create(s, d, bt);
    if (!codec.ok()) return codec.status();
    std::vector<uint8_t> slab(static_cast<size_t>((*codec)->slab_bytes()));
    double err = 0;
    for (int64_t b = 0; b < n_blocks; ++b) {
      for (int64_t h = 0; h < config_.n_kv_heads; ++h) {
        for (int64_t t = 0; t < bt; ++t) {
          std::copy_n(rows.data() + (b * bt + t) * r + h * d, d, x.data() + t * d);
        }
        (*codec)->Encode(x.data(), slab.data());
        (*codec)->Decode(slab.data(), 0, bt, y.data());
        for (int64_t e = 0; e < bt * d; ++e) {
          const double diff = static_cast<double>(x[e]) - y[e];
          err += diff * diff;
        }
      }
    }
    if (err < best) {
      best = err;
      best_clip = s.clip;
    }
  }
  return best_clip;
}

absl::StatusOr<KvPolicy> KvCalibrator::Finish() const {
  KvPolicy p = config_.policy;
  p.static_scales.clear();
  p.codebooks.clear();
  p.clip_models.clear();
  for (int64_t l = 0; l < config_.n_layers; ++l) {
    if (tokens(l) < p.block_tokens) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "calibration: layer %d saw %d tokens, fewer than one cache block (%d); give a longer "
          "--text",
          l, tokens(l), p.block_tokens));
    }
    if (p.HasHeadOverrides(l)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "calibration: layer %d has per-head codec overrides (L.hH.k=...); calibrate the "
          "layer-wide codecs and add the head overrides afterwards",
          l));
    }
    for (int kv = 0; kv < 2; ++kv) {
      const LayerKvPolicy& lp = p.ForLayer(l);
      const kernels::KvCodecSpec spec = kv == 0 ? lp.k : lp.v;
      const std::vector<float>& rows = kv == 0 ? k_[l] : v_[l];
      if (kernels::KvCodecNeedsCodebook(spec)) {
        // Lloyd-Max levels or k-means centroids on exactly the values the encoder will index.
        const int64_t n_rows = static_cast<int64_t>(rows.size()) / row();
        std::vector<float> u;
        absl::StatusOr<std::vector<float>> levels;
        if (spec.type == kernels::KvCodecType::kVector) {
          kernels::KvVectorNormalize(spec, rows.data(), n_rows, row(), config_.head_dim, u);
          levels = kernels::FitKvVectorCodebook(spec, u);
        } else {
          kernels::KvCodebookNormalize(spec, rows.data(), n_rows, row(), p.block_tokens, u);
          levels = kernels::FitKvCodebook(spec.bits, u);
        }
        if (!levels.ok()) {
          return absl::FailedPreconditionError(absl::StrFormat("calibration: layer %d %s: %s", l,
                                                               kv == 0 ? "keys" : "values",
                                                               levels.status().message()));
        }
        LayerKvVectors& b = p.codebooks[l];
        (kv == 0 ? b.k : b.v) = std::move(*levels);
        continue;
      }
      if (spec.learned_clip) {
        absl::StatusOr<std::vector<float>> w = kernels::FitClipModel(
            spec, rows.data(), static_cast<int64_t>(rows.size()) / row(), row());
        if (!w.ok()) {
          return absl::FailedPreconditionError(absl::StrFormat("calibration: layer %d %s: %s", l,
                                                               kv == 0 ? "keys" : "values",
                                                               w.status().message()));
        }
        LayerKvVectors& m = p.clip_models[l];
        (kv == 0 ? m.k : m.v) = std::move(*w);
        continue;
      }
      if (spec.type != kernels::KvCodecType::kUniform &&
          spec.type != kernels::KvCodecType::kFp8E4M3) {
        continue;  // float codecs have nothing to calibrate
      }
      if (spec.granularity == kernels::KvGranularity::kStatic) {
        LayerStaticScales& s = p.static_scales[l];
        (kv == 0 ? s.k : s.v) = StaticFor(spec, rows);
      } else if (config_.method == CalibrationMethod::kMse) {
        absl::StatusOr<float> clip = ClipFor(spec, rows);
        if (!clip.ok()) return clip.status();
        LayerKvPolicy& dst = p.layers.try_emplace(l, p.all).first->second;
        (kv == 0 ? dst.k : dst.v).clip = *clip;
      }
    }
  }
  return p;
}

std::string KvPolicyFileJson(const KvPolicy& policy, const std::string& provenance_json) {
  nlohmann::json j;
  j["spec"] = policy.ToSpec();
  nlohmann::json scales = nlohmann::json::object();
  std::vector<int64_t> ids;
  for (const auto& [l, s] : policy.static_scales) ids.push_back(l);
  std::sort(ids.begin(), ids.end());
  for (int64_t l : ids) {
    const LayerStaticScales& s = policy.static_scales.at(l);
    nlohmann::json e = nlohmann::json::object();
    for (int kv = 0; kv < 2; ++kv) {
      const StaticScales& st = kv == 0 ? s.k : s.v;
      if (st.scale.empty()) continue;
      nlohmann::json o;
      o["scale"] = st.scale;
      if (!st.min.empty()) o["min"] = st.min;
      e[kv == 0 ? "k" : "v"] = o;
    }
    scales[std::to_string(l)] = e;
  }
  if (!scales.empty()) j["static_scales"] = scales;
  using Vectors = absl::flat_hash_map<int64_t, LayerKvVectors>;
  const std::pair<const char*, const Vectors*> kinds[] = {{"codebooks", &policy.codebooks},
                                                          {"clip_models", &policy.clip_models}};
  for (const auto& [field, vectors] : kinds) {
    nlohmann::json all = nlohmann::json::object();
    for (const auto& [l, b] : *vectors) {
      nlohmann::json e = nlohmann::json::object();
      if (!b.k.empty()) e["k"] = b.k;
      if (!b.v.empty()) e["v"] = b.v;
      all[std::to_string(l)] = e;
    }
    if (!all.empty()) j[field] = all;
  }
  nlohmann::json prov = nlohmann::json::parse(provenance_json, nullptr, false);
  if (!prov.is_discarded()) j["calibration"] = prov;
  return j.dump(1) + "\n";
}

}  // namespace quantkv
