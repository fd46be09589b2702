// Activation codecs for the compressed all-reduce (kernels/comm_codec.h). The group
// quantizers are KvCodecs with head_dim = group_size and one group per "token", so the
// payload's codes-then-scales segments are exactly their slabs.
//
// Error bounds (ElementErrorBound), for finite inputs, per value x of a group whose
// non-outlier values have max |x| = A:
//   intB   s = Fp16RoundUp(A / qmax), qmax = 2^(B-1) - 1, codes cover [-qmax s, qmax s] >= A,
//          so rounding to the nearest code errs by <= s / 2. The fp16 round-up adds at most
//          one fp16 step to A / qmax (relative 2^-10, or 2^-24 below the normal range); the
//          fp32 arithmetic of the quantizer ((x + 2^(B-1) s) / s) may move a value sitting on
//          a rounding midpoint by a few fp32 ulps of 255, well inside the s * 2^-12 slack.
//          Decoding (q - 2^(B-1)) * s is exact (<= 8 + 11 significant bits).
//   fp8    s = Fp16RoundUp(A / 448); v = x / s rounds to E4M3 with relative error <= 2^-4
//          (3 mantissa bits) above 2^-6 and absolute error <= 2^-10 among the subnormals:
//          |err| <= 2^-4 |x| + 2^-10 s, times (1 + 2^-10) for the fp32 rounding of 1 / s.
//          Decoding e4m3 * s is exact (4 + 11 significant bits).
//   outlier  stored as fp16: <= 2^-11 |x| (2^-25 among fp16 subnormals).
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/comm_codec.h"
#include "kernels/cpu/unaligned.h"
#include "kernels/fp16.h"
#include "kernels/kv_codec.h"

namespace quantkv::kernels {
namespace {

using internal::LoadU16;
using internal::StoreU16;

constexpr char kMagic[4] = {'Q', 'K', 'V', 'A'};
constexpr uint8_t kVersion = 1;
constexpr double kFp16Max = 65504.0;
constexpr uint16_t kFp16NaN = 0x7e00;

// What is wrong with a config, or "" (callers say where the config came from).
std::string ConfigProblem(const CommCodecConfig& c) {
  if (c.type != CommCodecType::kInt8 && c.type != CommCodecType::kInt4 &&
      c.type != CommCodecType::kFp8E4M3) {
    return absl::StrFormat("unknown codec type %d", static_cast<int>(c.type));
  }
  if (c.group_size < 32 || c.group_size > 128 || c.group_size % 8 != 0) {
    return absl::StrFormat("group size %d must be a multiple of 8 in [32, 128]", c.group_size);
  }
  if (c.outliers < 0 || c.outliers > c.group_size / 8) {
    return absl::StrFormat("%d outliers per group outside [0, group size / 8 = %d]", c.outliers,
                           c.group_size / 8);
  }
  return "";
}

int Bits(CommCodecType t) { return t == CommCodecType::kInt4 ? 4 : 8; }

int64_t Groups(int64_t n, int gs) { return (n + gs - 1) / gs; }

// A whole decimal int (no sign, nothing around it).
bool ParseInt(std::string_view text, int* v) {
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), *v);
  return ec == std::errc() && end == text.data() + text.size() && !text.empty() && text[0] != '-';
}

// Smallest fp16 step above v (>= 0): how far Fp16RoundUp may move it.
double Fp16Step(double v) { return std::max(v * 0x1p-10, 0x1p-24); }

}  // namespace

std::string CommCodecConfig::ToString() const {
  const char* name = type == CommCodecType::kInt8      ? "int8"
                     : type == CommCodecType::kInt4    ? "int4"
                     : type == CommCodecType::kFp8E4M3 ? "fp8"
                                                       : "unknown";
  return absl::StrFormat("%s:g%d:out%d", name, group_size, outliers);
}

absl::StatusOr<CommCodecConfig> ParseCommCodecConfig(std::string_view text) {
  auto error = [&](std::string_view what) {
    return absl::InvalidArgumentError(absl::StrFormat("comm codec '%s': %s", text, what));
  };
  std::vector<std::string_view> parts;
  for (size_t start = 0;;) {
    const size_t colon = text.find(':', start);
    parts.push_back(text.substr(start, colon == std::string_view::npos ? colon : colon - start));
    if (colon == std::string_view::npos) break;
    start = colon + 1;
  }
  CommCodecConfig c;
  if (parts[0] == "int8") {
    c.type = CommCodecType::kInt8;
  } else if (parts[0] == "int4") {
    c.type = CommCodecType::kInt4;
  } else if (parts[0] == "fp8" || parts[0] == "fp8e4m3") {
    c.type = CommCodecType::kFp8E4M3;
  } else {
    return error(absl::StrFormat("unknown codec '%s' (want int8, int4 or fp8)", parts[0]));
  }
  for (size_t i = 1; i < parts.size(); ++i) {
    const std::string_view p = parts[i];
    int v = 0;
    if (p.size() > 1 && p[0] == 'g' && ParseInt(p.substr(1), &v)) {
      c.group_size = v;
    } else if (p.size() > 3 && p.substr(0, 3) == "out" && ParseInt(p.substr(3), &v)) {
      c.outliers = v;
    } else {
      return error(absl::StrFormat("unknown option '%s' (want gN or outK)", p));
    }
  }
  if (const std::string problem = ConfigProblem(c); !problem.empty()) return error(problem);
  return c;
}

absl::StatusOr<CommPayloadHeader> ReadCommPayloadHeader(const uint8_t* p, int64_t bytes) {
  if (bytes < kCommCodecHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("comm payload: %d bytes, shorter than its header", bytes));
  }
  if (std::memcmp(p, kMagic, 4) != 0 || p[4] != kVersion) {
    return absl::InvalidArgumentError("comm payload: bad magic or version");
  }
  CommPayloadHeader h;
  h.config.type = static_cast<CommCodecType>(p[5]);
  h.config.group_size = p[6];
  h.config.outliers = p[7];
  std::memcpy(&h.n, p + 8, 8);
  if (const std::string problem = ConfigProblem(h.config); !problem.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("comm payload header: ", problem));
  }
  if (h.n < 0 || h.n > (int64_t{1} << 40)) {
    return absl::InvalidArgumentError(absl::StrFormat("comm payload: bad count %d", h.n));
  }
  const int64_t record = h.config.group_size * Bits(h.config.type) / 8 + 2 + 3 * h.config.outliers;
  const int64_t need = kCommCodecHeaderBytes + Groups(h.n, h.config.group_size) * record;
  if (bytes < need) {
    return absl::InvalidArgumentError(
        absl::StrFormat("comm payload: %d bytes for %d values of %s, which need %d", bytes, h.n,
                        h.config.ToString(), need));
  }
  return h;
}

absl::StatusOr<std::unique_ptr<CommCodec>> CommCodec::Create(const CommCodecConfig& config) {
  if (const std::string problem = ConfigProblem(config); !problem.empty()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("comm codec %s: %s", config.ToString(), problem));
  }
  std::unique_ptr<CommCodec> c(new CommCodec(config));
  // Checks that the KV codec accepts the geometry once, here, so Encode/Decode cannot fail.
  KvCodecSpec spec;
  spec.type =
      config.type == CommCodecType::kFp8E4M3 ? KvCodecType::kFp8E4M3 : KvCodecType::kUniform;
  spec.bits = c->bits_;
  spec.symmetric = true;
  spec.group_size = config.group_size;
  absl::StatusOr<std::unique_ptr<KvCodec>> seg =
      KvCodec::Create(spec, config.group_size, kCommCodecSegmentGroups);
  if (!seg.ok()) return seg.status();
  if ((*seg)->slab_bytes() != kCommCodecSegmentGroups * c->record_bytes_) {
    return absl::InternalError(
        absl::StrFormat("comm codec %s: KV codec slab of %d bytes, expected %d", config.ToString(),
                        (*seg)->slab_bytes(), kCommCodecSegmentGroups * c->record_bytes_));
  }
  c->segment_codec_ = std::move(*seg);
  return c;
}

CommCodec::CommCodec(const CommCodecConfig& config)
    : config_(config),
      bits_(Bits(config.type)),
      record_bytes_(config.group_size * Bits(config.type) / 8 + 2) {}

CommCodec::~CommCodec() = default;

int64_t CommCodec::PayloadBytes(int64_t n) const {
  return kCommCodecHeaderBytes +
         Groups(n, config_.group_size) * (record_bytes_ + 3 * config_.outliers);
}

double CommCodec::BitsPerValue() const {
  return 8.0 * static_cast<double>(record_bytes_ + 3 * config_.outliers) / config_.group_size;
}

// k passes of "largest |x| not yet taken", lower index first on ties: deterministic and,
// for k <= 16 of <= 128 values, cheaper than sorting. Padding past `len` is never picked
// before a real value (it is zero and comes later), but is when len < k.
void CommCodec::PickOutliers(const float* v, int64_t len, uint8_t* idx) const {
  const int gs = config_.group_size;
  uint64_t taken[2] = {0, 0};
  for (int j = 0; j < config_.outliers; ++j) {
    int best = -1;
    float best_abs = -1.0f;
    for (int c = 0; c < gs; ++c) {
      if (taken[c >> 6] >> (c & 63) & 1) continue;
      const float a = c < len ? std::fabs(v[c]) : 0.0f;
      if (a > best_abs) {  // NaN never wins; such groups decode to NaN anyway
        best_abs = a;
        best = c;
      }
    }
    if (best < 0) best = 0;  // only NaNs left: any index will do
    taken[best >> 6] |= uint64_t{1} << (best & 63);
    idx[j] = static_cast<uint8_t>(best);
  }
}

void CommCodec::Encode(const float* x, int64_t n, uint8_t* payload) {
  const int gs = config_.group_size;
  const int k = config_.outliers;
  const int64_t groups = Groups(n, gs);
  std::memcpy(payload, kMagic, 4);
  payload[4] = kVersion;
  payload[5] = static_cast<uint8_t>(config_.type);
  payload[6] = static_cast<uint8_t>(gs);
  payload[7] = static_cast<uint8_t>(k);
  std::memcpy(payload + 8, &n, 8);
  uint8_t* slabs = payload + kCommCodecHeaderBytes;
  uint8_t* out_idx = slabs + groups * record_bytes_;
  uint8_t* out_val = out_idx + groups * k;
  const int64_t code_bytes = gs * bits_ / 8;
  for (int64_t g0 = 0; g0 < groups; g0 += kCommCodecSegmentGroups) {
    const int64_t m = std::min(kCommCodecSegmentGroups, groups - g0);
    scratch_.assign(static_cast<size_t>(m * gs), 0.0f);
    uint8_t* slab = slabs + g0 * record_bytes_;
    std::vector<int64_t> non_finite;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t g = g0 + j;
      const int64_t len = std::min<int64_t>(gs, n - g * gs);
      float* v = scratch_.data() + j * gs;
      std::memcpy(v, x + g * gs, static_cast<size_t>(len) * sizeof(float));
      bool finite = true;
      for (int64_t c = 0; c < len; ++c) finite &= std::isfinite(v[c]);
      if (!finite) non_finite.push_back(j);
      if (k == 0) continue;
      uint8_t* idx = out_idx + g * k;
      PickOutliers(v, len, idx);
      for (int i = 0; i < k; ++i) {
        StoreU16(out_val + 2 * (g * k + i), finite ? Fp32ToFp16(v[idx[i]]) : kFp16NaN);
        v[idx[i]] = 0.0f;  // out of the group's scale: it travels apart
      }
    }
    KvCodec* codec = CodecFor(m);
    codec->Encode(scratch_.data(), slab);
    // A NaN scale makes every code of the group decode to NaN (see the header).
    for (int64_t j : non_finite) StoreU16(slab + m * code_bytes + 2 * j, kFp16NaN);
  }
}

KvCodec* CommCodec::CodecFor(int64_t groups) {
  if (groups == kCommCodecSegmentGroups) return segment_codec_.get();
  if (tail_codec_ == nullptr || tail_groups_ != groups) {
    // Create accepted this geometry for the full segment; fewer tokens cannot fail.
    tail_codec_ = *KvCodec::Create(segment_codec_->spec(), config_.group_size, groups);
    tail_groups_ = groups;
  }
  return tail_codec_.get();
}

absl::Status CommCodec::Decode(const uint8_t* payload, int64_t bytes, float* out, int64_t n) {
  absl::StatusOr<CommPayloadHeader> h = ReadCommPayloadHeader(payload, bytes);
  if (!h.ok()) return h.status();
  if (h->config.type != config_.type || h->config.group_size != config_.group_size ||
      h->config.outliers != config_.outliers || h->n != n) {
    return absl::InvalidArgumentError(
        absl::StrFormat("comm payload holds %d values of %s, expected %d of %s", h->n,
                        h->config.ToString(), n, config_.ToString()));
  }
  const int gs = config_.group_size;
  const int k = config_.outliers;
  const int64_t groups = Groups(n, gs);
  const uint8_t* slabs = payload + kCommCodecHeaderBytes;
  const uint8_t* in_idx = slabs + groups * record_bytes_;
  const uint8_t* in_val = in_idx + groups * k;
  for (int64_t i = 0; i < groups * k; ++i) {
    if (in_idx[i] >= gs) {
      return absl::InvalidArgumentError(
          absl::StrFormat("comm payload: outlier index %d in a group of %d", in_idx[i], gs));
    }
  }
  for (int64_t g0 = 0; g0 < groups; g0 += kCommCodecSegmentGroups) {
    const int64_t m = std::min(kCommCodecSegmentGroups, groups - g0);
    KvCodec* codec = CodecFor(m);
    const uint8_t* slab = slabs + g0 * record_bytes_;
    const int64_t first = g0 * gs;
    if (first + m * gs <= n) {
      codec->Decode(slab, 0, m, out + first);
    } else {  // the zero-padded last group: decode aside, keep what n covers
      scratch_.resize(static_cast<size_t>(m * gs));
      codec->Decode(slab, 0, m, scratch_.data());
      std::memcpy(out + first, scratch_.data(), static_cast<size_t>(n - first) * sizeof(float));
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    for (int i = 0; i < k; ++i) {
      const int64_t pos = g * gs + in_idx[g * k + i];
      if (pos < n) out[pos] = Fp16ToFp32(LoadU16(in_val + 2 * (g * k + i)));
    }
  }
  return absl::OkStatus();
}

double CommCodec::ElementErrorBound(double inlier_amax, double abs_x, bool outlier) const {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  if (outlier) return abs_x > kFp16Max ? kInf : std::max(abs_x * 0x1p-11, 0x1p-25);
  const double qmax =
      config_.type == CommCodecType::kFp8E4M3 ? 448.0 : double((1 << (bits_ - 1)) - 1);
  const double t = inlier_amax / qmax;
  if (!(t <= kFp16Max)) return kInf;
  const double s = t + Fp16Step(t);
  if (config_.type == CommCodecType::kFp8E4M3) {
    return (abs_x * 0x1p-4 + s * 0x1p-10) * (1.0 + 0x1p-10);
  }
  return s * (0.5 + 0x1p-12);
}

void CommCodec::ErrorBounds(const float* x, int64_t n, double* bound) const {
  const int gs = config_.group_size;
  const int k = config_.outliers;
  std::vector<float> v(static_cast<size_t>(gs));
  uint8_t idx[16];
  for (int64_t g = 0; g < Groups(n, gs); ++g) {
    const int64_t len = std::min<int64_t>(gs, n - g * gs);
    std::fill(v.begin(), v.end(), 0.0f);
    std::memcpy(v.data(), x + g * gs, static_cast<size_t>(len) * sizeof(float));
    bool finite = true;
    for (int64_t c = 0; c < len; ++c) finite &= std::isfinite(v[c]);
    bool is_outlier[128] = {};
    if (k > 0) PickOutliers(v.data(), len, idx);
    for (int i = 0; i < k; ++i) is_outlier[idx[i]] = true;
    double amax = 0.0;
    for (int64_t c = 0; c < len; ++c) {
      if (!is_outlier[c]) amax = std::max(amax, std::fabs(static_cast<double>(v[c])));
    }
    for (int64_t c = 0; c < len; ++c) {
      bound[g * gs + c] = finite ? ElementErrorBound(amax, std::fabs(v[c]), is_outlier[c])
                                 : std::numeric_limits<double>::infinity();
    }
  }
}

}  // namespace quantkv::kernels
