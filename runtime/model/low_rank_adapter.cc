#include "runtime/model/low_rank_adapter.h"

#include <string>

#include "absl/strings/str_format.h"
#include "runtime/util/status_macros.h"

namespace quantkv {

absl::Status LowRankAdapter::Validate(const std::string& what) const {
  if (in <= 0 || out <= 0 || rank < 0 || static_cast<int64_t>(a.size()) != rank * in ||
      static_cast<int64_t>(b.size()) != out * rank ||
      (!bias.empty() && static_cast<int64_t>(bias.size()) != out)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: factors of %d and %d values (bias %d) do not fit in %d, out %d, rank %d", what,
        a.size(), b.size(), bias.size(), in, out, rank));
  }
  return absl::OkStatus();
}

absl::Status AddLowRank(const LowRankAdapter& adapter, const float* x, int64_t n, float* y,
                        kernels::ThreadPool* pool, std::vector<float>& scratch,
                        const kernels::MatMulOptions& options) {
  if (adapter.empty() || n == 0) return absl::OkStatus();
  const int64_t r = adapter.rank;
  kernels::MatMulOptions mm = options;
  mm.activations = kernels::ActivationPrecision::kFloat32;
  const kernels::WeightMatrix a{kernels::GgmlType::kF32,
                                reinterpret_cast<const uint8_t*>(adapter.a.data()), r, adapter.in};
  const kernels::WeightMatrix b{kernels::GgmlType::kF32,
                                reinterpret_cast<const uint8_t*>(adapter.b.data()), adapter.out, r};
  // One buffer for t = x Aᵀ (n x r) followed by d = t Bᵀ (n x out).
  scratch.resize(static_cast<size_t>(n * (r + adapter.out)));
  float* t = scratch.data();
  float* d = t + n * r;
  QKV_RETURN_IF_ERROR(kernels::MatMul(a, x, n, t, pool, mm));
  if (adapter.scale != 1.0f) {
    for (int64_t i = 0; i < n * r; ++i) t[i] *= adapter.scale;
  }
  QKV_RETURN_IF_ERROR(kernels::MatMul(b, t, n, d, pool, mm));
  const int64_t o = adapter.out;
  for (int64_t row = 0; row < n; ++row) {
    float* yr = y + row * o;
    const float* dr = d + row * o;
    if (adapter.bias.empty()) {
      for (int64_t i = 0; i < o; ++i) yr[i] += dr[i];
    } else {
      for (int64_t i = 0; i < o; ++i) yr[i] += dr[i] + adapter.bias[i];
    }
  }
  return absl::OkStatus();
}

}  // namespace quantkv
