// Closed-form fitting of attention-output corrections (runtime/engine/attn_correction.h).
// Per layer it accumulates sufficient statistics of pairs (x = attention output over the
// quantized cache, y = the same query rows' output over an exact cache) in float64, then
//   1. ridge regression of the residual r = y - x on x (affine, centred):
//        M = (Cxx + λ I)^-1 Cxr,  λ = ridge * trace(Cxx) / dim,
//   2. reduced-rank regression: M projected onto the top-`rank` principal directions W of
//      its predictions (eigenvectors of Mᵀ Cxx M), the rank-r map whose predictions lose
//      the least energy, factored as A = (M W)ᵀ [rank, dim], B = W [dim, rank], and
//      bias = mean(r) - B A mean(x).
// Statistics hold no rows, so any number of tokens costs the same memory (2 dim² doubles
// per layer) and the squared error of any correction on them is exact (Evaluate).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model/low_rank_adapter.h"

namespace quantkv {

struct AttnCorrectionFitOptions {
  int64_t rank = 32;
  double ridge = 1e-3;  // relative to the mean variance of x
};

// Squared errors summed over the rows of one layer's statistics.
struct AttnCorrectionError {
  int64_t rows = 0;
  double uncorrected = 0;  // Σ |y - x|²
  double corrected = 0;    // Σ |y - (x + B A x + bias)|²
  double reference = 0;    // Σ |y|², to make the others relative
};

class AttnCorrectionStats {
 public:
  // Collects `layers` (empty: all n_layers) for attention outputs of width `dim`.
  AttnCorrectionStats(int64_t n_layers, int64_t dim, std::vector<int64_t> layers = {});

  int64_t n_layers() const { return n_layers_; }
  int64_t dim() const { return dim_; }
  bool collects(int64_t layer) const;
  int64_t rows(int64_t layer) const;

  // Adds n row pairs x (quantized-cache output) and y (exact-cache output), [n][dim] each;
  // a layer not collected is ignored. Rows with a non-finite value are skipped.
  void Add(int64_t layer, int64_t n, const float* x, const float* y);

  // The correction of one collected layer; FAILED_PRECONDITION with fewer than 2 rows or
  // when the ridge is too small for the data (singular covariance).
  absl::StatusOr<LowRankAdapter> Fit(int64_t layer, const AttnCorrectionFitOptions& options) const;

  // Errors of `c` (empty: no correction) on this layer's rows.
  AttnCorrectionError Evaluate(int64_t layer, const LowRankAdapter& c) const;

 private:
  struct Layer {
    int64_t n = 0;
    std::vector<double> sx, sr;    // Σ x, Σ r   (r = y - x)
    std::vector<double> sxx, sxr;  // Σ x xᵀ (upper triangle filled), Σ x rᵀ; [dim][dim]
    double srr = 0, syy = 0;       // Σ |r|², Σ |y|²
  };
  int64_t n_layers_, dim_;
  std::vector<Layer> layers_;  // sized only for collected layers
  std::vector<double> xbuf_, rbuf_;
};

}  // namespace quantkv
