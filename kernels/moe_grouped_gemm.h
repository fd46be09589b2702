// Grouped expert GEMM: a mixture-of-experts layer's expert FFNs over rows already gathered and
// sorted by expert, in one call for all experts. Rows [group_offsets[e], group_offsets[e+1]) of
// x go to expert e (empty groups allowed); each row r of group e gets
//
//   y[r] = row_weight[r] * down_e(silu(gate_e x[r]) * up_e x[r])
//
// with the SwiGLU weights of expert e: gate_e, up_e [intermediate x hidden] and down_e
// [hidden x intermediate], row-major, the experts stacked back to back (expert e's gate matrix
// starts at gate + e * intermediate * hidden). row_weight is the router weight of the row's
// expert. The CPU version (fp32 weights, fp32 accumulation) is the reference; the CUDA version
// (bf16 weights, fp32 accumulation) is tested against it. No CUDA types here, so host-only code
// can include this header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string_view>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kernels/thread_pool.h"

namespace quantkv::kernels {

struct MoeGroupedFfnShape {
  int64_t rows = 0;          // m: rows of x and y, summed over all groups
  int64_t hidden = 0;        // width of x and y
  int64_t intermediate = 0;  // I: neurons per expert
  int64_t n_experts = 0;     // E: groups (group_offsets has E + 1 entries)
};

// Host arrays. Sizes must be exactly: x, y: rows * hidden; group_offsets: n_experts + 1;
// gate, up, down: n_experts * intermediate * hidden; row_weight: rows. group_offsets must
// start at 0, be non-decreasing and end at rows. With rows == 0 the call does nothing and only
// the shape's signs are checked.
struct MoeGroupedFfnConfig {
  MoeGroupedFfnShape shape;
  absl::Span<const float> x;
  absl::Span<const int64_t> group_offsets;
  absl::Span<const float> gate;
  absl::Span<const float> up;
  absl::Span<const float> down;
  absl::Span<const float> row_weight;
  absl::Span<float> y;  // overwritten; must not overlap the inputs
  // Rows are split over the pool's threads; null: the calling thread only. Ignored by
  // cuda::MoeGroupedFfnFromHost.
  ThreadPool* pool = nullptr;
};

// CPU reference: fp32 products and fp32 accumulation, one row at a time. InvalidArgument,
// naming the argument, for a negative shape, a missing (null) or wrongly sized array, or
// group offsets that do not start at 0, decrease, or do not end at rows.
absl::Status MoeGroupedFfn(const MoeGroupedFfnConfig& config);

namespace cuda {

// Device arrays (the spans hold device pointers; the host never dereferences them). Sizes as
// in MoeGroupedFfnConfig; the weights are bfloat16 bit patterns (uint16_t, e.g. from
// Fp32ToBf16 or cuda::DequantizeRowsToBf16OrF32 at load). workspace holds at least
// MoeGroupedFfnWorkspaceFloats(shape) floats (the SwiGLU activations between the two stages).
// y must not overlap x or workspace.
struct MoeGroupedFfnDeviceConfig {
  MoeGroupedFfnShape shape;
  absl::Span<const float> x;
  absl::Span<const int64_t> group_offsets;
  absl::Span<const uint16_t> gate;
  absl::Span<const uint16_t> up;
  absl::Span<const uint16_t> down;
  absl::Span<const float> row_weight;
  absl::Span<float> y;
  absl::Span<float> workspace;
  void* stream = nullptr;  // a cudaStream_t; nullptr: the default stream
};

// rows * intermediate.
int64_t MoeGroupedFfnWorkspaceFloats(const MoeGroupedFfnShape& shape);

// Two kernel launches on `stream` (asynchronous with respect to the host): gate/up with the
// SwiGLU in its epilogue, then down with the row weight in its epilogue, each over all groups.
// The sizes and pointers are checked as on the CPU; the offsets are in device memory and are
// not checked here: the kernels clamp them into [0, rows] and read them as non-decreasing, so
// bad offsets cannot make them access memory out of bounds, but rows outside every group are
// left unwritten. Validate offsets on the host (MoeGroupedFfnFromHost does).
absl::Status MoeGroupedFfn(const MoeGroupedFfnDeviceConfig& config);

// For tests and tools: checks config exactly as the CPU version does (before any CUDA call),
// uploads the host arrays (the weights rounded to bf16, nearest even), runs MoeGroupedFfn above
// and downloads y. Synchronous; config.pool is ignored.
absl::Status MoeGroupedFfnFromHost(const MoeGroupedFfnConfig& config);

}  // namespace cuda

namespace moe_grouped_internal {

// One array argument for CheckArrays: its name, data pointer, size and the size it must have.
struct ArrayArg {
  std::string_view name;
  const void* data;
  size_t size;
  int64_t want;
};

// Negative dimensions; with rows > 0 also non-positive hidden, intermediate or n_experts.
absl::Status CheckShape(std::string_view op, const MoeGroupedFfnShape& shape);
// Each array non-null and of exactly its wanted size.
absl::Status CheckArrays(std::string_view op, std::initializer_list<ArrayArg> arrays);
// Host offsets: n_experts + 1 entries, starting at 0, non-decreasing, ending at rows.
absl::Status CheckOffsets(std::string_view op, const MoeGroupedFfnShape& shape,
                          absl::Span<const int64_t> offsets);

// CheckArrays on the arrays of a MoeGroupedFfnConfig or cuda::MoeGroupedFfnDeviceConfig.
template <typename Config>
absl::Status CheckConfigArrays(std::string_view op, const Config& c) {
  const MoeGroupedFfnShape& s = c.shape;
  const int64_t weights = s.n_experts * s.intermediate * s.hidden;
  return CheckArrays(
      op, {{"x", c.x.data(), c.x.size(), s.rows * s.hidden},
           {"group_offsets", c.group_offsets.data(), c.group_offsets.size(), s.n_experts + 1},
           {"gate", c.gate.data(), c.gate.size(), weights},
           {"up", c.up.data(), c.up.size(), weights},
           {"down", c.down.data(), c.down.size(), weights},
           {"row_weight", c.row_weight.data(), c.row_weight.size(), s.rows},
           {"y", c.y.data(), c.y.size(), s.rows * s.hidden}});
}

}  // namespace moe_grouped_internal

}  // namespace quantkv::kernels
