// Product-quantization KV codec and its k-means fit (kernels/kv_vector_quant.h).
//
// Slab layout: block_tokens fp16 scales (each token's RMS), then the codes, `bits` bits each
// in [token][sub-vector] order, packed LSB-first.
#include "kernels/kv_vector_quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "kernels/cpu/kv_codec_internal.h"
#include "kernels/cpu/unaligned.h"
#include "kernels/fp16.h"

namespace quantkv::kernels {
namespace {

using internal::LoadU16;
using internal::StoreU16;

// The token's scale as stored: RMS of its finite values, rounded up to fp16 (0 for an
// all-zero row).
float RowScale(const float* x, int64_t d) {
  double ss = 0;
  for (int64_t i = 0; i < d; ++i) {
    if (std::isfinite(x[i])) ss += double{x[i]} * x[i];
  }
  return Fp16ToFp32(kv_codec_internal::Fp16RoundUp(static_cast<float>(std::sqrt(ss / d))));
}

float Normalized(float x, float inv_scale) {
  if (!std::isfinite(x)) return x == x ? std::copysign(1e4f, x) : 0.0f;
  return x * inv_scale;
}

int64_t Nearest(const float* v, const std::vector<float>& centroids, int64_t m) {
  const int64_t k = static_cast<int64_t>(centroids.size()) / m;
  int64_t best = 0;
  float best_d = std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < k; ++c) {
    const float* ce = centroids.data() + c * m;
    float dist = 0;
    for (int64_t i = 0; i < m; ++i) dist += (v[i] - ce[i]) * (v[i] - ce[i]);
    if (dist < best_d) {
      best_d = dist;
      best = c;
    }
  }
  return best;
}

class VectorCodec final : public KvCodec {
 public:
  VectorCodec(const KvCodecSpec& spec, int64_t head_dim, int64_t block_tokens,
              std::vector<float> centroids)
      : KvCodec(spec, head_dim, block_tokens),
        centroids_(std::move(centroids)),
        m_(spec.vector_dims),
        subs_(head_dim / spec.vector_dims) {}

  int64_t slab_bytes() const override {
    return 2 * block_tokens() + (block_tokens() * subs_ * spec().bits + 7) / 8;
  }

  void Encode(const float* x, uint8_t* slab) const override {
    const int64_t d = head_dim(), bt = block_tokens(), bits = spec().bits;
    uint8_t* codes = slab + 2 * bt;
    std::memset(codes, 0, static_cast<size_t>(slab_bytes() - 2 * bt));
    float u[16];
    for (int64_t t = 0; t < bt; ++t) {
      const float scale = RowScale(x + t * d, d);
      StoreU16(slab + 2 * t, Fp32ToFp16(scale));
      const float inv = scale > 0 ? 1.0f / scale : 0.0f;
      for (int64_t j = 0; j < subs_; ++j) {
        for (int64_t i = 0; i < m_; ++i) u[i] = Normalized(x[t * d + j * m_ + i], inv);
        const uint32_t code = static_cast<uint32_t>(Nearest(u, centroids_, m_));
        const int64_t bit = (t * subs_ + j) * bits;
        // A code spans at most three bytes (bits <= 12, any bit offset).
        const uint32_t shifted = code << (bit & 7);
        for (int64_t b = 0; b < 3 && (bit & 7) + bits > 8 * b; ++b) {
          codes[(bit >> 3) + b] |= static_cast<uint8_t>(shifted >> (8 * b));
        }
      }
    }
  }

  void Decode(const uint8_t* slab, int64_t t0, int64_t t1, float* out) const override {
    const int64_t d = head_dim();
    const KvVectorLayout l = layout();
    for (int64_t t = t0; t < t1; ++t) {
      const float scale = KvVectorRowScale(slab, t);
      for (int64_t j = 0; j < subs_; ++j) {
        const float* ce = centroids_.data() + KvVectorCode(l, slab, t, j) * m_;
        float* o = out + (t - t0) * d + j * m_;
        for (int64_t i = 0; i < m_; ++i) o[i] = scale * ce[i];
      }
    }
  }

  KvVectorLayout layout() const {
    return {centroids_.data(), m_, spec().bits, subs_, block_tokens()};
  }

 private:
  std::vector<float> centroids_;  // [2^bits][m]
  int64_t m_;
  int64_t subs_;
};

}  // namespace

void KvVectorNormalize(const KvCodecSpec& spec, const float* x, int64_t n_rows, int64_t row_width,
                       int64_t head_dim, std::vector<float>& out) {
  const int64_t m = spec.vector_dims;
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t h = 0; h + head_dim <= row_width; h += head_dim) {
      const float* row = x + r * row_width + h;
      const float scale = RowScale(row, head_dim);
      if (!(scale > 0)) continue;  // zero rows say nothing about the distribution
      const float inv = 1.0f / scale;
      for (int64_t i = 0; i < head_dim / m * m; ++i) out.push_back(Normalized(row[i], inv));
    }
  }
}

absl::StatusOr<std::vector<float>> FitKvVectorCodebook(const KvCodecSpec& spec,
                                                       const std::vector<float>& subvectors,
                                                       int iters, int64_t max_samples) {
  const int64_t m = spec.vector_dims, k = int64_t{1} << spec.bits;
  const int64_t n_all = static_cast<int64_t>(subvectors.size()) / m;
  if (n_all < 4 * k) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "vector codebook: %d calibration sub-vectors are too few for %d centroids (want >= %d)",
        n_all, k, 4 * k));
  }
  const int64_t stride = std::max<int64_t>(1, n_all / std::max<int64_t>(max_samples, k));
  std::vector<float> data;
  for (int64_t i = 0; i < n_all; i += stride) {
    data.insert(data.end(), subvectors.begin() + i * m, subvectors.begin() + (i + 1) * m);
  }
  const int64_t n = static_cast<int64_t>(data.size()) / m;
  // k-means++ start: each next centroid drawn with probability proportional to its squared
  // distance from the nearest one chosen so far.
  std::mt19937_64 rng(0x9e3779b97f4a7c15ull);
  std::vector<float> cent(static_cast<size_t>(k * m));
  std::vector<double> dist(static_cast<size_t>(n), std::numeric_limits<double>::infinity());
  int64_t pick = static_cast<int64_t>(rng() % static_cast<uint64_t>(n));
  for (int64_t c = 0; c < k; ++c) {
    std::copy_n(data.begin() + pick * m, m, cent.begin() + c * m);
    double total = 0;
    for (int64_t i = 0; i < n; ++i) {
      double dd = 0;
      for (int64_t e = 0; e < m; ++e) {
        const double diff = double{data[i * m + e]} - cent[c * m + e];
        dd += diff * diff;
      }
      dist[i] = std::min(dist[i], dd);
      total += dist[i];
    }
    double r = std::uniform_real_distribution<double>(0.0, total)(rng);
    pick = n - 1;
    for (int64_t i = 0; i < n; ++i) {
      r -= dist[i];
      if (r <= 0) {
        pick = i;
        break;
      }
    }
  }
  std::vector<int64_t> assign(static_cast<size_t>(n), -1);
  for (int it = 0; it < iters; ++it) {
    bool changed = false;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t a = Nearest(data.data() + i * m, cent, m);
      changed |= a != assign[i];
      assign[i] = a;
    }
    std::vector<double> sum(static_cast<size_t>(k * m), 0.0);
    std::vector<int64_t> count(static_cast<size_t>(k), 0);
    for (int64_t i = 0; i < n; ++i) {
      ++count[assign[i]];
      for (int64_t e = 0; e < m; ++e) sum[assign[i] * m + e] += data[i * m + e];
    }
    for (int64_t c = 0; c < k; ++c) {
      if (count[c] == 0) continue;  // an empty cluster keeps its centroid
      for (int64_t e = 0; e < m; ++e)
        cent[c * m + e] = static_cast<float>(sum[c * m + e] / count[c]);
    }
    if (!changed) break;
  }
  return cent;
}

KvVectorLayout KvVectorLayoutOf(const KvCodec& codec) {
  const auto* v = dynamic_cast<const VectorCodec*>(&codec);
  return v == nullptr ? KvVectorLayout{} : v->layout();
}

namespace kv_codec_internal {

absl::StatusOr<std::unique_ptr<KvCodec>> MakeVectorCodec(const KvCodecConfig& config) {
  const KvCodecSpec& s = config.spec;
  const size_t want = (size_t{1} << s.bits) * static_cast<size_t>(s.vector_dims);
  if (config.codebook.size() != want) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KV codec %s: needs %d calibrated centroid values (2^%d centroids x %d dims; got %d); "
        "make them with `quantkv calibrate --kv %s` and pass the file as --kv @FILE",
        s.ToString(), want, s.bits, s.vector_dims, config.codebook.size(), s.ToString()));
  }
  for (size_t i = 0; i < want; ++i) {
    if (!std::isfinite(config.codebook[i])) {
      return absl::InvalidArgumentError(
          absl::StrFormat("KV codec %s: centroid value %d is not finite", s.ToString(), i));
    }
  }
  return std::unique_ptr<KvCodec>(
      new VectorCodec(s, config.head_dim, config.block_tokens, config.codebook));
}

}  // namespace kv_codec_internal
}  // namespace quantkv::kernels
