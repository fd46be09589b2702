#include "runtime/engine/moe_ffn.h"

#include <cmath>
#include <cstring>

#include "kernels/activation.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

// out[m x hidden] = down(SwiGLU(gate(x), up(x))) for m gathered rows.
absl::Status RunExpert(const ExpertMatrices& e, const float* x, int64_t m, float* out,
                       kernels::ThreadPool* pool, const kernels::MatMulOptions& mm,
                       MoeFfnScratch& s) {
  const int64_t I = e.gate.rows;
  s.gate.resize(static_cast<size_t>(m * I));
  s.up.resize(static_cast<size_t>(m * I));
  QKV_RETURN_IF_ERROR(kernels::MatMul(e.gate, x, m, s.gate.data(), pool, mm));
  QKV_RETURN_IF_ERROR(kernels::MatMul(e.up, x, m, s.up.data(), pool, mm));
  kernels::SwiGlu(s.gate.data(), s.up.data(), s.gate.data(), m * I);
  return kernels::MatMul(e.down, s.gate.data(), m, out, pool, mm);
}

}  // namespace

absl::Status MoeRoute(const MoeFfnWeights& w, const moe::RouterConfig& rc, const float* x,
                      int64_t n, kernels::ThreadPool* pool, const kernels::MatMulOptions& mm,
                      MoeFfnScratch& s, moe::Routing& routing) {
  // Routing decides which experts run at all: fp32 activations keep it as the float model
  // has it (int8 activations flip near-ties between experts).
  kernels::MatMulOptions exact = mm;
  exact.activations = kernels::ActivationPrecision::kFloat32;
  s.logits.resize(static_cast<size_t>(n * rc.n_experts));
  QKV_RETURN_IF_ERROR(kernels::MatMul(w.router, x, n, s.logits.data(), pool, exact));
  if (!w.router_bias.empty()) {
    for (int64_t r = 0; r < n; ++r) {
      for (int e = 0; e < rc.n_experts; ++e) s.logits[r * rc.n_experts + e] += w.router_bias[e];
    }
  }
  moe::Route(rc, s.logits.data(), n, &routing);
  return absl::OkStatus();
}

absl::Status MoeRoutedExperts(const MoeFfnWeights& w, const moe::RouterConfig& rc, const float* x,
                              int64_t n, const moe::Routing& routing, float* y,
                              kernels::ThreadPool* pool, const kernels::MatMulOptions& mm,
                              MoeFfnScratch& s) {
  const int64_t H = w.router.cols;
  moe::GroupByExpert(routing, rc.n_experts, &s.groups);
  std::memset(y, 0, static_cast<size_t>(n * H) * sizeof(float));
  for (int e = 0; e < rc.n_experts; ++e) {
    const std::vector<int32_t>& rows = s.groups.rows[e];
    if (rows.empty() || (!w.owned.empty() && !w.owned[e]) || !w.experts[e].present()) continue;
    const int64_t m = static_cast<int64_t>(rows.size());
    s.x.resize(static_cast<size_t>(m * H));
    for (int64_t i = 0; i < m; ++i) {
      std::memcpy(s.x.data() + i * H, x + rows[i] * H, static_cast<size_t>(H) * sizeof(float));
    }
    s.out.resize(static_cast<size_t>(m * H));
    QKV_RETURN_IF_ERROR(RunExpert(w.experts[e], s.x.data(), m, s.out.data(), pool, mm, s));
    for (int64_t i = 0; i < m; ++i) {
      const float g = routing.weight[s.groups.slots[e][i]];
      float* yr = y + rows[i] * H;
      const float* o = s.out.data() + i * H;
      for (int64_t j = 0; j < H; ++j) yr[j] += g * o[j];
    }
  }
  return absl::OkStatus();
}

absl::Status MoeAddShared(const MoeFfnWeights& w, const float* x, int64_t n, float* y,
                          kernels::ThreadPool* pool, const kernels::MatMulOptions& mm,
                          MoeFfnScratch& s) {
  if (!w.shared.present() || n == 0) return absl::OkStatus();
  const int64_t H = w.router.cols;
  s.shared_out.resize(static_cast<size_t>(n * H));
  QKV_RETURN_IF_ERROR(RunExpert(w.shared, x, n, s.shared_out.data(), pool, mm, s));
  for (int64_t r = 0; r < n; ++r) {
    float g = 1.0f;
    if (!w.shared_gate.empty()) {
      // A dot of hidden values in double: one scalar per row, and the gate multiplies the
      // whole shared output.
      double z = 0;
      for (int64_t j = 0; j < H; ++j) z += static_cast<double>(x[r * H + j]) * w.shared_gate[j];
      g = static_cast<float>(1.0 / (1.0 + std::exp(-z)));
    }
    float* yr = y + r * H;
    const float* o = s.shared_out.data() + r * H;
    for (int64_t j = 0; j < H; ++j) yr[j] += g * o[j];
  }
  return absl::OkStatus();
}

absl::Status MoeFfn(const MoeFfnWeights& w, const moe::RouterConfig& rc, const float* x, int64_t n,
                    float* y, kernels::ThreadPool* pool, const kernels::MatMulOptions& mm,
                    MoeFfnScratch& s, moe::Routing& routing) {
  QKV_RETURN_IF_ERROR(MoeRoute(w, rc, x, n, pool, mm, s, routing));
  QKV_RETURN_IF_ERROR(MoeRoutedExperts(w, rc, x, n, routing, y, pool, mm, s));
  return MoeAddShared(w, x, n, y, pool, mm, s);
}

}  // namespace quantkv
