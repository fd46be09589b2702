// Non-linear KV codebooks (KvCodecType::kCodebook): each token group (or, with `chan`, each
// channel over a block, as KIVI does for keys) is normalised to [-1, 1] (symmetric: divided
// by clip * max|x|; asymmetric: centred on the midpoint of its range and divided by
// clip * half the range), and each value stored as the index of the nearest of 2^bits
// levels. Built-in level sets (normal-float quantiles, power transform,
// logarithmic) need nothing; Lloyd-Max levels are fitted by calibration on the same
// normalised values the encoder sees, so the fit minimises the codec's own error.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/kv_codec.h"

namespace quantkv::kernels {

// The 2^bits ascending levels of a built-in codebook kind (not kCalibrated).
std::vector<float> KvCodebookLevels(const KvCodecSpec& spec);

// The normalised values u in [-1, 1] the encoder would index for rows x
// ([n_rows][row_width], row_width a multiple of the spec's group size; per-channel specs
// take blocks of block_tokens rows, a trailing partial block is skipped), appended to `out`.
void KvCodebookNormalize(const KvCodecSpec& spec, const float* x, int64_t n_rows, int64_t row_width,
                         int64_t block_tokens, std::vector<float>& out);

// Lloyd-Max (1-D k-means) levels for `bits` bits fitted to normalised values u, started
// from the normal-float levels and run until no level moves by more than 1e-6 (at most
// `max_iters` rounds). The ends are kept at -1 and +1 when the data reach them, since the
// group's extreme value always normalises to +-1 and should be stored exactly.
absl::StatusOr<std::vector<float>> FitKvCodebook(int bits, const std::vector<float>& u,
                                                 int max_iters = 100);

}  // namespace quantkv::kernels
