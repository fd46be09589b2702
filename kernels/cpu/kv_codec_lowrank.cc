// Low-rank residual KV codec (GEAR): the inner codec encodes the slab, and the rank-R
// truncated SVD of what it got wrong (E = X - decode(encode(X)), [block_tokens][head_dim])
// is kept in fp16 as E ~ U V^T and added back on decode. Quantization errors of one slab are
// correlated across tokens (a channel whose range the scales cover badly is off in every
// token), so a few rank-one terms recover much of them.
//
// Slab layout: the inner codec's slab, then U [block_tokens][R] fp16, then V [R][head_dim]
// fp16 (the right singular vectors; U holds the singular values).
//
// Also here: the mean-residual codec (option meanres), the rank-"zero" special case whose
// only term is the per-channel mean error with weight one for every token.
#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "kernels/cpu/kv_codec_internal.h"
#include "kernels/cpu/unaligned.h"
#include "kernels/fp16.h"

namespace quantkv::kernels::kv_codec_internal {
namespace {

// Orthonormalises the R columns of m ([n][R], row-major) in place (modified Gram-Schmidt);
// a column that collapses is zeroed.
void Orthonormalize(std::vector<double>& m, int64_t n, int64_t r) {
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t k = 0; k < j; ++k) {
      double dot = 0;
      for (int64_t i = 0; i < n; ++i) dot += m[i * r + j] * m[i * r + k];
      for (int64_t i = 0; i < n; ++i) m[i * r + j] -= dot * m[i * r + k];
    }
    double norm = 0;
    for (int64_t i = 0; i < n; ++i) norm += m[i * r + j] * m[i * r + j];
    norm = std::sqrt(norm);
    for (int64_t i = 0; i < n; ++i) m[i * r + j] = norm > 1e-30 ? m[i * r + j] / norm : 0.0;
  }
}

class LowRankCodec final : public KvCodec {
 public:
  LowRankCodec(const KvCodecSpec& spec, int64_t head_dim, int64_t block_tokens,
               std::unique_ptr<KvCodec> inner)
      : KvCodec(spec, head_dim, block_tokens), inner_(std::move(inner)), rank_(spec.rank) {}

  int64_t slab_bytes() const override {
    return inner_->slab_bytes() + 2 * rank_ * (block_tokens() + head_dim());
  }

  void Encode(const float* x, uint8_t* slab) const override {
    const int64_t bt = block_tokens(), d = head_dim(), r = rank_;
    inner_->Encode(x, slab);
    std::vector<float> dec(static_cast<size_t>(bt * d));
    inner_->Decode(slab, 0, bt, dec.data());
    std::vector<double> e(static_cast<size_t>(bt * d));
    for (int64_t i = 0; i < bt * d; ++i) {
      const double v = double{x[i]} - dec[i];
      e[i] = std::isfinite(v) ? v : 0.0;  // NaN / inf inputs: leave them to the inner codec
    }
    // Subspace iteration for the top-R right singular vectors V [d][R]: V <- orth(E^T E V).
    // A fixed start keeps encoding deterministic.
    std::vector<double> v(static_cast<size_t>(d * r)), u(static_cast<size_t>(bt * r));
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = 0; j < r; ++j) v[i * r + j] = std::cos(0.7 * (i + 1) * (j + 1) + j);
    }
    Orthonormalize(v, d, r);
    for (int it = 0; it < 8; ++it) {
      MulEV(e, v, u, bt, d, r);
      std::vector<double> w(static_cast<size_t>(d * r), 0.0);  // E^T U
      for (int64_t t = 0; t < bt; ++t) {
        for (int64_t i = 0; i < d; ++i) {
          for (int64_t j = 0; j < r; ++j) w[i * r + j] += e[t * d + i] * u[t * r + j];
        }
      }
      v = std::move(w);
      Orthonormalize(v, d, r);
    }
    // V as stored (fp16), then U = E V against the stored V so U absorbs its rounding.
    std::vector<double> vh(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      vh[i] = Fp16ToFp32(Fp32ToFp16(static_cast<float>(v[i])));
    }
    MulEV(e, vh, u, bt, d, r);
    uint8_t* side = slab + inner_->slab_bytes();
    for (int64_t t = 0; t < bt; ++t) {
      for (int64_t j = 0; j < r; ++j) {
        internal::StoreU16(side + 2 * (t * r + j), Fp32ToFp16(static_cast<float>(u[t * r + j])));
      }
    }
    uint8_t* vs = side + 2 * bt * r;
    for (int64_t j = 0; j < r; ++j) {
      for (int64_t i = 0; i < d; ++i) {
        internal::StoreU16(vs + 2 * (j * d + i), Fp32ToFp16(static_cast<float>(vh[i * r + j])));
      }
    }
  }

  void Decode(const uint8_t* slab, int64_t t0, int64_t t1, float* out) const override {
    if (t1 <= t0) return;
    const int64_t bt = block_tokens(), d = head_dim(), r = rank_;
    inner_->Decode(slab, t0, t1, out);
    const uint8_t* side = slab + inner_->slab_bytes();
    const uint8_t* vs = side + 2 * bt * r;
    float vrow[kMaxRank][kMaxHeadDim];
    const bool staged = d <= kMaxHeadDim;
    if (staged) {
      for (int64_t j = 0; j < r; ++j) {
        for (int64_t i = 0; i < d; ++i)
          vrow[j][i] = Fp16ToFp32(internal::LoadU16(vs + 2 * (j * d + i)));
      }
    }
    for (int64_t t = t0; t < t1; ++t) {
      float* o = out + (t - t0) * d;
      for (int64_t j = 0; j < r; ++j) {
        const float uj = Fp16ToFp32(internal::LoadU16(side + 2 * (t * r + j)));
        for (int64_t i = 0; i < d; ++i) {
          o[i] += uj * (staged ? vrow[j][i] : Fp16ToFp32(internal::LoadU16(vs + 2 * (j * d + i))));
        }
      }
    }
  }

 private:
  static constexpr int64_t kMaxRank = 16;
  static constexpr int64_t kMaxHeadDim = 256;

  // u [bt][R] = e [bt][d] * v [d][R].
  static void MulEV(const std::vector<double>& e, const std::vector<double>& v,
                    std::vector<double>& u, int64_t bt, int64_t d, int64_t r) {
    std::fill(u.begin(), u.end(), 0.0);
    for (int64_t t = 0; t < bt; ++t) {
      for (int64_t i = 0; i < d; ++i) {
        for (int64_t j = 0; j < r; ++j) u[t * r + j] += e[t * d + i] * v[i * r + j];
      }
    }
  }

  std::unique_ptr<KvCodec> inner_;
  int64_t rank_;
};

// Score correction from residual statistics: the per-channel mean of the block's quantization
// error, kept in fp16 (head_dim values per slab) and added to every decoded row, so
// q . k_t gains q . mean_residual — the bias part of the error that per-token scales leave.
// Slab layout: the inner codec's slab, then the mean residual [head_dim] fp16.
class MeanResidualCodec final : public KvCodec {
 public:
  MeanResidualCodec(const KvCodecSpec& spec, int64_t head_dim, int64_t block_tokens,
                    std::unique_ptr<KvCodec> inner)
      : KvCodec(spec, head_dim, block_tokens), inner_(std::move(inner)) {}

  int64_t slab_bytes() const override { return inner_->slab_bytes() + 2 * head_dim(); }

  void Encode(const float* x, uint8_t* slab) const override {
    const int64_t bt = block_tokens(), d = head_dim();
    inner_->Encode(x, slab);
    std::vector<float> dec(static_cast<size_t>(bt * d));
    inner_->Decode(slab, 0, bt, dec.data());
    uint8_t* side = slab + inner_->slab_bytes();
    for (int64_t c = 0; c < d; ++c) {
      double sum = 0;
      int64_t n = 0;
      for (int64_t t = 0; t < bt; ++t) {
        const double e = double{x[t * d + c]} - dec[t * d + c];
        if (std::isfinite(e)) {
          sum += e;
          ++n;
        }
      }
      internal::StoreU16(side + 2 * c, Fp32ToFp16(n > 0 ? static_cast<float>(sum / n) : 0.0f));
    }
  }

  void Decode(const uint8_t* slab, int64_t t0, int64_t t1, float* out) const override {
    if (t1 <= t0) return;
    const int64_t d = head_dim();
    inner_->Decode(slab, t0, t1, out);
    const uint8_t* side = slab + inner_->slab_bytes();
    float mean[kMaxHeadDim];
    for (int64_t c = 0; c < d && c < kMaxHeadDim; ++c) {
      mean[c] = Fp16ToFp32(internal::LoadU16(side + 2 * c));
    }
    for (int64_t t = t0; t < t1; ++t) {
      float* o = out + (t - t0) * d;
      for (int64_t c = 0; c < d; ++c) {
        o[c] += c < kMaxHeadDim ? mean[c] : Fp16ToFp32(internal::LoadU16(side + 2 * c));
      }
    }
  }

 private:
  static constexpr int64_t kMaxHeadDim = 512;
  std::unique_ptr<KvCodec> inner_;
};

}  // namespace

std::unique_ptr<KvCodec> MakeMeanResidualCodec(const KvCodecSpec& spec, int64_t head_dim,
                                               int64_t block_tokens,
                                               std::unique_ptr<KvCodec> inner) {
  return std::make_unique<MeanResidualCodec>(spec, head_dim, block_tokens, std::move(inner));
}

std::unique_ptr<KvCodec> MakeLowRankCodec(const KvCodecSpec& spec, int64_t head_dim,
                                          int64_t block_tokens, std::unique_ptr<KvCodec> inner) {
  return std::make_unique<LowRankCodec>(spec, head_dim, block_tokens, std::move(inner));
}

}  // namespace quantkv::kernels::kv_codec_internal
