// One mixture-of-experts FFN layer on the CPU: route each row, run every expert on the rows
// sent to it as one batched matmul (a grouped expert GEMM: gather, gate/up, SwiGLU, down),
// and add the weighted outputs back per row; plus the shared expert where the model has one.
// MoeFfn is the three steps in one; the steps are apart for the all-to-all form of expert
// parallelism (moe_dispatch.h), which runs them on different rows on different ranks.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/matmul.h"
#include "kernels/thread_pool.h"
#include "moe/router.h"

namespace quantkv {

// A SwiGLU MLP's three matrices: gate/up [I x hidden], down [hidden x I].
struct ExpertMatrices {
  kernels::WeightMatrix gate, up, down;
  bool present() const { return gate.rows > 0; }
};

struct MoeFfnWeights {
  kernels::WeightMatrix router;         // [n_experts x hidden]
  std::vector<float> router_bias;       // [n_experts], or empty
  std::vector<ExpertMatrices> experts;  // at their active precision
  ExpertMatrices shared;                // absent: gate.rows == 0
  std::vector<float> shared_gate;       // [hidden]: output scaled by sigmoid(x · g); empty: 1
  // Under expert parallelism this rank computes only experts with owned[e] != 0; under
  // tensor parallelism an expert (and the shared one) holds this rank's slice of its
  // neurons, or nothing (absent). Either way the caller sums the partial outputs over the
  // group.
  std::vector<uint8_t> owned;  // empty: all
};

struct MoeFfnScratch {
  std::vector<float> logits, x, gate, up, out, shared_out;
  moe::ExpertGroups groups;
};

// y[n x hidden] = the layer's output for x[n x hidden] (overwritten, not accumulated);
// `routing` receives the routing of the n rows (for the precision policies and stats).
// Each row's result is summed over its experts in expert order, so it does not depend on
// which other rows share the call (up to the matmuls' own row-count thresholds).
absl::Status MoeFfn(const MoeFfnWeights& w, const moe::RouterConfig& rc, const float* x, int64_t n,
                    float* y, kernels::ThreadPool* pool, const kernels::MatMulOptions& mm,
                    MoeFfnScratch& scratch, moe::Routing& routing);

// Step 1: the routing of x[n x hidden] (router logits in fp32, bias, top-k).
absl::Status MoeRoute(const MoeFfnWeights& w, const moe::RouterConfig& rc, const float* x,
                      int64_t n, kernels::ThreadPool* pool, const kernels::MatMulOptions& mm,
                      MoeFfnScratch& scratch, moe::Routing& routing);
// Step 2: y[n x hidden] = for each row, the sum over its experts in `routing` (the routing
// of exactly these n rows) that this rank computes (w.owned) of weight times the expert's
// output, in expert order, starting from 0 (overwritten; rows with none stay 0).
absl::Status MoeRoutedExperts(const MoeFfnWeights& w, const moe::RouterConfig& rc, const float* x,
                              int64_t n, const moe::Routing& routing, float* y,
                              kernels::ThreadPool* pool, const kernels::MatMulOptions& mm,
                              MoeFfnScratch& scratch);
// Step 3: y[n x hidden] += the shared expert's gated output for x (nothing without one).
absl::Status MoeAddShared(const MoeFfnWeights& w, const float* x, int64_t n, float* y,
                          kernels::ThreadPool* pool, const kernels::MatMulOptions& mm,
                          MoeFfnScratch& scratch);

}  // namespace quantkv
