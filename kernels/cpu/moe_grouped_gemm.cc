// CPU reference of the grouped expert GEMM: each row on its own, as two matrix-vector products
// and a third after the SwiGLU, fp32 throughout. Plain loops on purpose: this is what the CUDA
// kernels are checked against, and the engine's CPU path uses the ggml-block MatMul instead.
#include <cmath>
#include <vector>

#include "absl/strings/str_format.h"
#include "kernels/moe_grouped_gemm.h"
#include "runtime/util/status_macros.h"

namespace quantkv::kernels {

namespace moe_grouped_internal {

absl::Status CheckShape(std::string_view op, const MoeGroupedFfnShape& s) {
  if (s.rows < 0 || s.hidden < 0 || s.intermediate < 0 || s.n_experts < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: negative shape (rows %d, hidden %d, intermediate %d, n_experts %d)",
                        op, s.rows, s.hidden, s.intermediate, s.n_experts));
  }
  if (s.rows == 0) return absl::OkStatus();
  if (s.hidden == 0 || s.intermediate == 0 || s.n_experts == 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: %d rows need hidden, intermediate and n_experts > 0 (got %d, %d, %d)",
                        op, s.rows, s.hidden, s.intermediate, s.n_experts));
  }
  return absl::OkStatus();
}

absl::Status CheckArrays(std::string_view op, std::initializer_list<ArrayArg> arrays) {
  for (const ArrayArg& a : arrays) {
    if (a.data == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: %s is null (want %d elements)", op, a.name, a.want));
    }
    if (static_cast<int64_t>(a.size) != a.want) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: %s has %d elements, want %d", op, a.name, static_cast<int64_t>(a.size), a.want));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckOffsets(std::string_view op, const MoeGroupedFfnShape& s,
                          absl::Span<const int64_t> off) {
  if (static_cast<int64_t>(off.size()) != s.n_experts + 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: group_offsets has %d entries, want n_experts + 1 = %d", op,
                        static_cast<int64_t>(off.size()), s.n_experts + 1));
  }
  if (off[0] != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: group_offsets[0] = %d, want 0", op, off[0]));
  }
  for (int64_t e = 0; e < s.n_experts; ++e) {
    if (off[e + 1] < off[e]) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: group_offsets must be non-decreasing: group_offsets[%d] = %d < group_offsets[%d] = "
          "%d",
          op, e + 1, off[e + 1], e, off[e]));
    }
  }
  if (off[s.n_experts] != s.rows) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: group_offsets[%d] (the last) = %d, want rows = %d", op, s.n_experts,
                        off[s.n_experts], s.rows));
  }
  return absl::OkStatus();
}

}  // namespace moe_grouped_internal

namespace {

// Dot product of n floats, accumulated in fp32 in index order.
float Dot(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace

absl::Status MoeGroupedFfn(const MoeGroupedFfnConfig& c) {
  namespace in = moe_grouped_internal;
  constexpr std::string_view kOp = "MoeGroupedFfn";
  const MoeGroupedFfnShape& s = c.shape;
  QKV_RETURN_IF_ERROR(in::CheckShape(kOp, s));
  if (s.rows == 0) return absl::OkStatus();
  const int64_t H = s.hidden, I = s.intermediate, E = s.n_experts;
  QKV_RETURN_IF_ERROR(in::CheckConfigArrays(kOp, c));
  QKV_RETURN_IF_ERROR(in::CheckOffsets(kOp, s, c.group_offsets));

  std::vector<int64_t> expert_of_row(static_cast<size_t>(s.rows));
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t r = c.group_offsets[e]; r < c.group_offsets[e + 1]; ++r) expert_of_row[r] = e;
  }
  auto run_rows = [&](int64_t begin, int64_t end, int /*thread*/) {
    std::vector<float> act(static_cast<size_t>(I));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t e = expert_of_row[r];
      const float* xr = c.x.data() + r * H;
      const float* gate = c.gate.data() + e * I * H;
      const float* up = c.up.data() + e * I * H;
      const float* down = c.down.data() + e * H * I;
      for (int64_t j = 0; j < I; ++j) {
        const float g = Dot(gate + j * H, xr, H);
        const float u = Dot(up + j * H, xr, H);
        act[j] = g / (1.0f + std::exp(-g)) * u;  // SwiGLU, as kernels::SwiGlu
      }
      const float w = c.row_weight[r];
      float* yr = c.y.data() + r * H;
      for (int64_t i = 0; i < H; ++i) yr[i] = w * Dot(down + i * I, act.data(), I);
    }
  };
  if (c.pool != nullptr && c.pool->size() > 1) {
    c.pool->ParallelFor(s.rows, run_rows, /*grain=*/1);
  } else {
    run_rows(0, s.rows, 0);
  }
  return absl::OkStatus();
}

}  // namespace quantkv::kernels
