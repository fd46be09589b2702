#include "kernels/kv_clip_model.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace quantkv::kernels {

void ClipFeatures(const float* x, int64_t n, float* f) {
  double s1 = 0, s2 = 0, s4 = 0;
  float lo = INFINITY, hi = -INFINITY, amax = 0;
  int64_t cnt = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) continue;
    const double a = std::fabs(x[i]);
    s1 += a;
    s2 += a * a;
    s4 += a * a * a * a;
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    amax = std::max(amax, static_cast<float>(a));
    ++cnt;
  }
  f[0] = 1.0f;
  if (cnt == 0 || s2 <= 0) {
    f[1] = f[2] = f[3] = f[4] = 0.0f;
    return;
  }
  const double ms = s2 / cnt, rms = std::sqrt(ms);
  f[1] = static_cast<float>(amax / rms);
  f[2] = static_cast<float>(s1 / cnt / rms);
  f[3] = static_cast<float>(s4 / cnt / (ms * ms) / 10.0);
  f[4] = hi > lo ? static_cast<float>((hi + lo) / (hi - lo)) : 0.0f;
}

float PredictClip(const float* w, const float* f) {
  float c = 0;
  for (int i = 0; i < kClipFeatures; ++i) c += w[i] * f[i];
  return std::isfinite(c) ? std::clamp(c, kMinClip, 1.0f) : 1.0f;
}

absl::StatusOr<std::vector<float>> FitClipModel(const KvCodecSpec& spec, const float* rows,
                                                int64_t n_rows, int64_t row_width,
                                                int64_t max_groups) {
  const int64_t gs = spec.group_size;
  if (spec.type != KvCodecType::kUniform || spec.granularity != KvGranularity::kPerTokenGroup ||
      gs < 1 || row_width % gs != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "clip model: %s is not a uniform codec with per-token groups dividing %d channels",
        spec.ToString(), row_width));
  }
  const int64_t n_groups = n_rows * (row_width / gs);
  if (n_groups < 64) {
    return absl::FailedPreconditionError(
        absl::StrFormat("clip model: %d token groups are too few to fit on", n_groups));
  }
  // One codec per grid clip, over a single group (block of one token, head_dim = gs).
  std::vector<float> grid;
  std::vector<std::unique_ptr<KvCodec>> codecs;
  for (float c = kMinClip; c <= 1.0f + 1e-6f; c += 0.025f) {
    KvCodecSpec s = spec;
    s.learned_clip = false;
    s.clip = std::min(c, 1.0f);
    absl::StatusOr<std::unique_ptr<KvCodec>> codec = KvCodec::Create(s, gs, 1);
    if (!codec.ok()) return codec.status();
    grid.push_back(s.clip);
    codecs.push_back(std::move(*codec));
  }
  const int64_t stride = std::max<int64_t>(1, n_groups / max_groups);
  // Normal equations of ridge least squares, in double.
  double ata[kClipFeatures][kClipFeatures] = {}, atb[kClipFeatures] = {};
  std::vector<uint8_t> slab(static_cast<size_t>(codecs[0]->slab_bytes()));
  std::vector<float> out(static_cast<size_t>(gs));
  int64_t used = 0;
  for (int64_t gi = 0; gi < n_groups; gi += stride) {
    const float* x = rows + gi * gs;  // groups are contiguous: row-major, gs | row_width
    bool finite = true;
    for (int64_t c = 0; c < gs; ++c) finite &= std::isfinite(x[c]);
    if (!finite) continue;
    double best_err = INFINITY;
    float best = 1.0f;
    for (size_t k = 0; k < codecs.size(); ++k) {
      codecs[k]->Encode(x, slab.data());
      codecs[k]->Decode(slab.data(), 0, 1, out.data());
      double e = 0;
      for (int64_t c = 0; c < gs; ++c) e += (double{out[c]} - x[c]) * (double{out[c]} - x[c]);
      if (k == 0 || e < best_err * (1 - 1e-12)) {  // ties go to the smaller clip seen first
        best_err = e;
        best = grid[k];
      }
    }
    float f[kClipFeatures];
    ClipFeatures(x, gs, f);
    for (int i = 0; i < kClipFeatures; ++i) {
      atb[i] += f[i] * double{best};
      for (int j = 0; j < kClipFeatures; ++j) ata[i][j] += double{f[i]} * f[j];
    }
    ++used;
  }
  if (used < 64) {
    return absl::FailedPreconditionError(
        absl::StrFormat("clip model: only %d finite token groups to fit on", used));
  }
  for (int i = 0; i < kClipFeatures; ++i) ata[i][i] += 1e-6 * used;
  // Gaussian elimination with partial pivoting on the 5x5 system.
  double a[kClipFeatures][kClipFeatures + 1];
  for (int i = 0; i < kClipFeatures; ++i) {
    for (int j = 0; j < kClipFeatures; ++j) a[i][j] = ata[i][j];
    a[i][kClipFeatures] = atb[i];
  }
  for (int c = 0; c < kClipFeatures; ++c) {
    int piv = c;
    for (int r = c + 1; r < kClipFeatures; ++r) {
      if (std::fabs(a[r][c]) > std::fabs(a[piv][c])) piv = r;
    }
    std::swap(a[c], a[piv]);
    if (std::fabs(a[c][c]) < 1e-300) continue;
    for (int r = 0; r < kClipFeatures; ++r) {
      if (r == c) continue;
      const double m = a[r][c] / a[c][c];
      for (int k = c; k <= kClipFeatures; ++k) a[r][k] -= m * a[c][k];
    }
  }
  std::vector<float> w(kClipFeatures);
  for (int i = 0; i < kClipFeatures; ++i) {
    w[i] = std::fabs(a[i][i]) < 1e-300 ? 0.0f : static_cast<float>(a[i][kClipFeatures] / a[i][i]);
  }
  return w;
}

}  // namespace quantkv::kernels
