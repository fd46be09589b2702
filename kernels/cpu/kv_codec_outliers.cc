// Dense-and-sparse KV codec (SqueezeLLM / KVQuant's outlier isolation): the largest
// `outlier_pct` percent of a slab's values by magnitude are kept exactly (fp16) in a sparse
// side list, and the dense rest is encoded by the inner codec with those positions
// replaced by their row's mean, so one outlier no longer stretches a whole group's scale.
//
// Slab layout: the inner codec's slab, then n_outliers entries of (uint16 position in the
// slab's [token][channel] order, fp16 value), positions ascending.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <vector>

#include "kernels/cpu/kv_codec_internal.h"
#include "kernels/cpu/unaligned.h"
#include "kernels/fp16.h"

namespace quantkv::kernels::kv_codec_internal {
namespace {

class OutlierCodec final : public KvCodec {
 public:
  OutlierCodec(const KvCodecSpec& spec, int64_t head_dim, int64_t block_tokens,
               std::unique_ptr<KvCodec> inner, int64_t n_outliers)
      : KvCodec(spec, head_dim, block_tokens), inner_(std::move(inner)), n_outliers_(n_outliers) {}

  int64_t slab_bytes() const override { return inner_->slab_bytes() + 4 * n_outliers_; }

  void Encode(const float* x, uint8_t* slab) const override {
    const int64_t d = head_dim(), n = block_tokens() * d;
    std::vector<int32_t> idx(static_cast<size_t>(n));
    std::iota(idx.begin(), idx.end(), 0);
    // NaNs sort as smallest so they are never "outliers" (the inner codec handles them).
    auto mag = [&](int32_t i) { return x[i] == x[i] ? std::fabs(x[i]) : -1.0f; };
    std::nth_element(idx.begin(), idx.begin() + n_outliers_, idx.end(),
                     [&](int32_t a, int32_t b) { return mag(a) > mag(b); });
    std::vector<int32_t> out(idx.begin(), idx.begin() + n_outliers_);
    std::sort(out.begin(), out.end());
    std::vector<float> dense(x, x + n);
    std::vector<char> is_out(static_cast<size_t>(n), 0);
    for (int32_t i : out) is_out[i] = 1;
    for (int64_t t = 0; t < block_tokens(); ++t) {
      double sum = 0;
      int64_t cnt = 0;
      for (int64_t c = 0; c < d; ++c) {
        const float v = x[t * d + c];
        if (!is_out[t * d + c] && v == v) {
          sum += v;
          ++cnt;
        }
      }
      const float mean = cnt > 0 ? static_cast<float>(sum / cnt) : 0.0f;
      for (int64_t c = 0; c < d; ++c) {
        if (is_out[t * d + c]) dense[t * d + c] = mean;
      }
    }
    inner_->Encode(dense.data(), slab);
    uint8_t* side = slab + inner_->slab_bytes();
    for (int64_t k = 0; k < n_outliers_; ++k) {
      internal::StoreU16(side + 4 * k, static_cast<uint16_t>(out[k]));
      internal::StoreU16(side + 4 * k + 2, Fp32ToFp16(x[out[k]]));
    }
  }

  void Decode(const uint8_t* slab, int64_t t0, int64_t t1, float* out) const override {
    if (t1 <= t0) return;
    inner_->Decode(slab, t0, t1, out);
    const int64_t d = head_dim();
    const uint8_t* side = slab + inner_->slab_bytes();
    for (int64_t k = 0; k < n_outliers_; ++k) {
      const int64_t pos = internal::LoadU16(side + 4 * k);
      const int64_t t = pos / d;
      if (t < t0 || t >= t1) continue;
      out[(t - t0) * d + pos % d] = Fp16ToFp32(internal::LoadU16(side + 4 * k + 2));
    }
  }

 private:
  std::unique_ptr<KvCodec> inner_;
  int64_t n_outliers_;
};

}  // namespace

std::unique_ptr<KvCodec> MakeOutlierCodec(const KvCodecSpec& spec, int64_t head_dim,
                                          int64_t block_tokens, std::unique_ptr<KvCodec> inner) {
  const double n = static_cast<double>(head_dim * block_tokens);
  const int64_t k =
      std::max<int64_t>(1, static_cast<int64_t>(std::ceil(spec.outlier_pct / 100.0 * n)));
  return std::make_unique<OutlierCodec>(spec, head_dim, block_tokens, std::move(inner), k);
}

}  // namespace quantkv::kernels::kv_codec_internal
