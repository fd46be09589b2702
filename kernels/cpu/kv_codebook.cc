// Non-linear codebook KV codec and its level sets (kernels/kv_codebook.h).
//
// Slab layout: the metadata of every scale — per token group in [token][group] order, or per
// channel — as one fp16 scale (symmetric) or fp16 midpoint then fp16 half-range
// (asymmetric), followed by the codes, `bits` bits each, packed LSB-first in
// [token][channel] order.
#include "kernels/kv_codebook.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "kernels/cpu/kv_codec_internal.h"
#include "kernels/cpu/unaligned.h"
#include "kernels/fp16.h"

namespace quantkv::kernels {
namespace {

using internal::LoadU16;
using internal::StoreU16;

// Inverse of the standard normal CDF by bisection on erfc (only 2^bits values are needed,
// once per codec, so simplicity beats a rational approximation).
double NormalQuantile(double p) {
  double lo = -10, hi = 10;
  for (int i = 0; i < 200; ++i) {
    const double mid = 0.5 * (lo + hi);
    if (0.5 * std::erfc(-mid / std::sqrt(2.0)) < p) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return 0.5 * (lo + hi);
}

// Group normalisation shared by the encoder and KvCodebookNormalize: u = (x - mid) / half.
struct GroupScale {
  float mid = 0;
  float half = 0;  // > 0, or 0 for a constant (or all-NaN) group
};

// Scale of n values x[0], x[stride], ... (NaNs ignored).
GroupScale ScaleOf(const KvCodecSpec& s, const float* x, int64_t n, int64_t stride) {
  // Beyond fp16's range the metadata saturates (and infinities would poison the midpoint).
  constexpr float kMaxHalf = 65504.0f;
  float lo = INFINITY, hi = -INFINITY, amax = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i * stride];
    if (!(xi == xi)) continue;
    const float v = std::clamp(xi, -kMaxHalf, kMaxHalf);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
    amax = std::max(amax, std::fabs(v));
  }
  if (!(lo <= hi)) return {};
  GroupScale g;
  if (s.symmetric) {
    g.half = Fp16ToFp32(kv_codec_internal::Fp16RoundUp(s.clip * amax));
  } else {
    g.mid = Fp16ToFp32(Fp32ToFp16(0.5f * (lo + hi)));
    g.half = Fp16ToFp32(kv_codec_internal::Fp16RoundUp(s.clip * 0.5f * (hi - lo)));
  }
  return g;
}

float Normalized(const GroupScale& g, float x) {
  if (!(g.half > 0) || !(x == x)) return 0.0f;
  return std::clamp((x - g.mid) / g.half, -1.0f, 1.0f);
}

// The scales of one [bt][d] slab: per token group ([t][group]) or per channel ([c], over the
// slab's tokens, as KIVI does for keys).
std::vector<GroupScale> SlabScales(const KvCodecSpec& s, const float* x, int64_t bt, int64_t d) {
  std::vector<GroupScale> sc;
  if (s.granularity == KvGranularity::kPerChannel) {
    for (int64_t c = 0; c < d; ++c) sc.push_back(ScaleOf(s, x + c, bt, d));
  } else {
    for (int64_t t = 0; t < bt; ++t) {
      for (int64_t g = 0; g < d; g += s.group_size) {
        sc.push_back(ScaleOf(s, x + t * d + g, s.group_size, 1));
      }
    }
  }
  return sc;
}

class CodebookCodec final : public KvCodec {
 public:
  CodebookCodec(const KvCodecSpec& spec, int64_t head_dim, int64_t block_tokens,
                std::vector<float> levels)
      : KvCodec(spec, head_dim, block_tokens),
        levels_(std::move(levels)),
        per_channel_(spec.granularity == KvGranularity::kPerChannel),
        n_scales_(per_channel_ ? head_dim : block_tokens * (head_dim / spec.group_size)),
        meta_per_scale_(spec.symmetric ? 1 : 2) {
    for (size_t i = 0; i + 1 < levels_.size(); ++i) {
      thresholds_.push_back(0.5f * (levels_[i] + levels_[i + 1]));
    }
  }

  int64_t slab_bytes() const override { return meta_bytes() + code_bytes(); }

  void Encode(const float* x, uint8_t* slab) const override {
    const KvCodecSpec& s = spec();
    const int64_t d = head_dim(), bt = block_tokens(), bits = s.bits;
    const std::vector<GroupScale> sc = SlabScales(s, x, bt, d);
    for (int64_t k = 0; k < n_scales_; ++k) {
      uint8_t* meta = slab + 2 * meta_per_scale_ * k;
      if (s.symmetric) {
        StoreU16(meta, Fp32ToFp16(sc[k].half));
      } else {
        StoreU16(meta, Fp32ToFp16(sc[k].mid));
        StoreU16(meta + 2, Fp32ToFp16(sc[k].half));
      }
    }
    uint8_t* codes = slab + meta_bytes();
    std::memset(codes, 0, static_cast<size_t>(code_bytes()));
    for (int64_t t = 0; t < bt; ++t) {
      for (int64_t c = 0; c < d; ++c) {
        const float u = Normalized(sc[ScaleIndex(t, c)], x[t * d + c]);
        uint32_t code = 0;
        while (code < thresholds_.size() && u > thresholds_[code]) ++code;
        const int64_t bit = (t * d + c) * bits;
        // Codes never straddle more than two bytes (bits <= 4).
        const uint32_t shifted = code << (bit & 7);
        codes[bit >> 3] |= static_cast<uint8_t>(shifted);
        if ((bit & 7) + bits > 8) codes[(bit >> 3) + 1] |= static_cast<uint8_t>(shifted >> 8);
      }
    }
  }

  void Decode(const uint8_t* slab, int64_t t0, int64_t t1, float* out) const override {
    const KvCodecSpec& s = spec();
    const int64_t d = head_dim(), bits = s.bits, n_levels = int64_t{1} << bits;
    const uint8_t* codes = slab + meta_bytes();
    // Codes of one token as indices (3-bit codes may straddle bytes; 2 and 4 never do).
    uint8_t idx[kMaxHeadDim];
    auto unpack = [&](int64_t t, int64_t c0, int64_t n) {
      for (int64_t c = c0; c < c0 + n; ++c) {
        const int64_t bit = (t * d + c) * bits;
        uint32_t v = codes[bit >> 3];
        if ((bit & 7) + bits > 8) v |= static_cast<uint32_t>(codes[(bit >> 3) + 1]) << 8;
        idx[c - c0] = static_cast<uint8_t>((v >> (bit & 7)) & (n_levels - 1));
      }
    };
    auto meta = [&](int64_t k, float* mid, float* half) {
      const uint8_t* m = slab + 2 * meta_per_scale_ * k;
      *mid = s.symmetric ? 0.0f : Fp16ToFp32(LoadU16(m));
      *half = Fp16ToFp32(LoadU16(m + (s.symmetric ? 0 : 2)));
    };
    if (per_channel_) {
      // Channel c's levels scaled once per call: out = table[c][code].
      thread_local std::vector<float> table;
      table.resize(static_cast<size_t>(d * n_levels));
      for (int64_t c = 0; c < d; ++c) {
        float mid, half;
        meta(c, &mid, &half);
        for (int64_t k = 0; k < n_levels; ++k) table[c * n_levels + k] = mid + half * levels_[k];
      }
      for (int64_t t = t0; t < t1; ++t) {
        float* o = out + (t - t0) * d;
        for (int64_t c0 = 0; c0 < d; c0 += kMaxHeadDim) {
          const int64_t n = std::min(kMaxHeadDim, d - c0);
          unpack(t, c0, n);
          for (int64_t c = 0; c < n; ++c) o[c0 + c] = table[(c0 + c) * n_levels + idx[c]];
        }
      }
      return;
    }
    // Per token group: that group's scaled levels (at most 16), then one lookup per value.
    const int64_t gs = s.group_size;
    float scaled[16];
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t g = 0; g < d; g += gs) {
        float mid, half;
        meta(ScaleIndex(t, g), &mid, &half);
        for (int64_t k = 0; k < n_levels; ++k) scaled[k] = mid + half * levels_[k];
        float* o = out + (t - t0) * d + g;
        for (int64_t c0 = 0; c0 < gs; c0 += kMaxHeadDim) {
          const int64_t n = std::min(kMaxHeadDim, gs - c0);
          unpack(t, g + c0, n);
          for (int64_t c = 0; c < n; ++c) o[c0 + c] = scaled[idx[c]];
        }
      }
    }
  }

 private:
  static constexpr int64_t kMaxHeadDim = 256;  // channels unpacked at a time

  int64_t ScaleIndex(int64_t t, int64_t c) const {
    return per_channel_ ? c : t * (head_dim() / spec().group_size) + c / spec().group_size;
  }
  int64_t meta_bytes() const { return 2 * meta_per_scale_ * n_scales_; }
  int64_t code_bytes() const { return (block_tokens() * head_dim() * spec().bits + 7) / 8; }

  std::vector<float> levels_;
  std::vector<float> thresholds_;  // midpoints between neighbouring levels
  bool per_channel_;
  int64_t n_scales_;
  int64_t meta_per_scale_;
};

}  // namespace

std::vector<float> KvCodebookLevels(const KvCodecSpec& spec) {
  const int n = 1 << spec.bits;
  std::vector<float> lv(static_cast<size_t>(n));
  switch (spec.codebook) {
    case KvCodebookKind::kNormalFloat: {
      // QLoRA's NormalFloat construction: n/2 positive and n/2 - 1 negative normal quantiles
      // at evenly spaced probabilities from `offset` towards 0.5, plus an exact 0 (values
      // crowd around zero; a zero level also keeps constant and tiny inputs exact), scaled
      // so the ends are +-1. For 4 bits this is NF4 (offset 0.9677).
      const double offset = 0.5 * ((1 - 0.5 / (n - 1)) + (1 - 0.5 / n));
      const int pos = n / 2, neg = n / 2 - 1;
      const double top = NormalQuantile(offset);
      lv.assign(static_cast<size_t>(n), 0.0f);
      for (int i = 0; i < pos; ++i) {  // probabilities offset .. 0.5 in pos + 1 steps, not 0.5
        const double p = offset + (0.5 - offset) * i / pos;
        lv[n - 1 - i] = static_cast<float>(NormalQuantile(p) / top);
      }
      for (int i = 0; i < neg; ++i) {
        const double p = offset + (0.5 - offset) * i / neg;
        lv[i] = static_cast<float>(-NormalQuantile(p) / top);
      }
      lv[neg] = 0.0f;
      lv.front() = -1.0f;
      lv.back() = 1.0f;
      break;
    }
    case KvCodebookKind::kPower:
      for (int i = 0; i < n; ++i) {
        const double t = -1.0 + 2.0 * i / (n - 1);
        lv[i] = static_cast<float>(std::copysign(std::pow(std::fabs(t), 1.0 / spec.power), t));
      }
      break;
    case KvCodebookKind::kLog:
      // n/2 magnitudes per sign, 1, 1/2, 1/4, ...
      for (int i = 0; i < n / 2; ++i) {
        const float m = std::ldexp(1.0f, -(n / 2 - 1 - i));
        lv[n / 2 + i] = m;
        lv[n / 2 - 1 - i] = -m;
      }
      break;
    case KvCodebookKind::kCalibrated:
      lv.clear();  // levels come with the codec config
      break;
  }
  return lv;
}

void KvCodebookNormalize(const KvCodecSpec& spec, const float* x, int64_t n_rows, int64_t row_width,
                         int64_t block_tokens, std::vector<float>& out) {
  const int64_t bt = spec.granularity == KvGranularity::kPerChannel ? block_tokens : 1;
  for (int64_t r0 = 0; r0 + bt <= n_rows; r0 += bt) {
    const float* xb = x + r0 * row_width;
    const std::vector<GroupScale> sc = SlabScales(spec, xb, bt, row_width);
    for (int64_t t = 0; t < bt; ++t) {
      for (int64_t c = 0; c < row_width; ++c) {
        const int64_t k = spec.granularity == KvGranularity::kPerChannel
                              ? c
                              : t * (row_width / spec.group_size) + c / spec.group_size;
        const float v = xb[t * row_width + c];
        // Constant groups say nothing about the shape.
        if (sc[k].half > 0 && v == v) out.push_back(Normalized(sc[k], v));
      }
    }
  }
}

absl::StatusOr<std::vector<float>> FitKvCodebook(int bits, const std::vector<float>& u,
                                                 int max_iters) {
  if (bits < 1 || bits > 4) {
    return absl::InvalidArgumentError(absl::StrFormat("codebook: bits %d not in [1, 4]", bits));
  }
  const int n = 1 << bits;
  if (static_cast<int64_t>(u.size()) < 16 * n) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "codebook: %d calibration values are too few to fit %d levels", u.size(), n));
  }
  KvCodecSpec nf;
  nf.bits = bits;
  std::vector<float> lv = KvCodebookLevels(nf);
  std::vector<float> sorted(u);
  std::sort(sorted.begin(), sorted.end());
  // Prefix sums make each Lloyd round O(n log N): a level's cell is a range of the sorted data.
  std::vector<double> prefix(sorted.size() + 1, 0.0);
  for (size_t i = 0; i < sorted.size(); ++i) prefix[i + 1] = prefix[i] + sorted[i];
  for (int it = 0; it < max_iters; ++it) {
    double moved = 0;
    std::vector<float> next(lv);
    size_t begin = 0;
    for (int i = 0; i < n; ++i) {
      const float upper = i + 1 < n ? 0.5f * (lv[i] + lv[i + 1]) : INFINITY;
      const size_t end =
          static_cast<size_t>(std::upper_bound(sorted.begin() + static_cast<std::ptrdiff_t>(begin),
                                               sorted.end(), upper) -
                              sorted.begin());
      // Ends stay at +-1; an empty cell keeps its level.
      if (i != 0 && i != n - 1 && end > begin) {
        next[i] = static_cast<float>((prefix[end] - prefix[begin]) / (end - begin));
      }
      begin = end;
    }
    for (int i = 0; i < n; ++i) moved = std::max(moved, std::fabs(double{next[i]} - lv[i]));
    lv = std::move(next);
    if (moved < 1e-6) break;
  }
  return lv;
}

namespace kv_codec_internal {

absl::StatusOr<std::unique_ptr<KvCodec>> MakeCodebookCodec(const KvCodecConfig& config) {
  const KvCodecSpec& s = config.spec;
  std::vector<float> levels =
      s.codebook == KvCodebookKind::kCalibrated ? config.codebook : KvCodebookLevels(s);
  const size_t n = size_t{1} << s.bits;
  if (levels.size() != n) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KV codec %s: needs %d calibrated codebook levels (got %d); make them with `quantkv "
        "calibrate --kv %s` and pass the file as --kv @FILE",
        s.ToString(), n, levels.size(), s.ToString()));
  }
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(levels[i]) || levels[i] < -1.0f || levels[i] > 1.0f ||
        (i > 0 && !(levels[i] > levels[i - 1]))) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "KV codec %s: codebook level %d (%g) is not finite, in [-1, 1] and above the one "
          "before",
          s.ToString(), i, levels[i]));
    }
  }
  return std::unique_ptr<KvCodec>(
      new CodebookCodec(s, config.head_dim, config.block_tokens, std::move(levels)));
}

}  // namespace kv_codec_internal
}  // namespace quantkv::kernels
