// Learned dynamic clipping (codec option `learnclip`, uniform codecs with per-token groups):
// instead of one clip ratio per layer, each token group's ratio is predicted at write time
// from cheap scale-free statistics of the group by a linear model per layer and K|V, fitted
// by `quantkv calibrate` to the ratio that minimises that group's own quantization error.
// A peaked group (one large value) wants a tight clip, a flat one none; the statistics tell
// them apart. The slab layout is the plain codec's, so decoding (and the fused decode
// kernels) are unchanged.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/kv_codec.h"

namespace quantkv::kernels {

// Features: 1, max|x| / rms, mean|x| / rms, kurtosis E[x^4] / E[x^2]^2 / 10, and the range's
// asymmetry (max + min) / (max - min) — all independent of the group's scale.
constexpr int kClipFeatures = 5;
void ClipFeatures(const float* x, int64_t n, float* features);

// w . features, clamped to [kMinClip, 1].
constexpr float kMinClip = 0.2f;
float PredictClip(const float* weights, const float* features);

// The model for `spec` (learned_clip set; its clip is ignored) fitted on rows
// ([n_rows][row_width], groups of spec.group_size channels): each group's best clip on a
// grid (0.2 .. 1 in steps of 0.025) through the codec itself, then ridge least squares on
// the features. At most max_groups groups (an even stride through the data) are used.
absl::StatusOr<std::vector<float>> FitClipModel(const KvCodecSpec& spec, const float* rows,
                                                int64_t n_rows, int64_t row_width,
                                                int64_t max_groups = 20000);

}  // namespace quantkv::kernels
