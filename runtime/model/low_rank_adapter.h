// A low-rank update of a linear map, y += scale * B (A x) (+ bias): the form of both LoRA
// adapters on the projections (runtime/model/lora.h) and the fitted attention-output
// corrections (runtime/engine/attn_correction.h). Kept as two thin fp32 factors rather than
// merged into the weights, which are stored quantized (Q4_1) and could not absorb a small
// update without requantizing it away.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/matmul.h"
#include "kernels/thread_pool.h"

namespace quantkv {

struct LowRankAdapter {
  int64_t in = 0;    // x's length
  int64_t out = 0;   // y's length
  int64_t rank = 0;  // 0: no adapter
  float scale = 1.0f;
  std::vector<float> a;     // [rank][in], row-major (PEFT's lora_A.weight)
  std::vector<float> b;     // [out][rank] (lora_B.weight)
  std::vector<float> bias;  // [out] or empty; not scaled

  bool empty() const { return rank == 0; }
  // INVALID_ARGUMENT naming `what` when the factor sizes contradict in/out/rank.
  absl::Status Validate(const std::string& what) const;
};

// y[n][out] += scale * x[n][in] · Aᵀ · Bᵀ + bias. `scratch` is resized and reused between
// calls. Always fp32 activations (the factors are fp32 and tiny); `mm` only lends its
// gemm_min_rows, so a server that keeps rows batch-independent keeps them so here too.
absl::Status AddLowRank(const LowRankAdapter& adapter, const float* x, int64_t n, float* y,
                        kernels::ThreadPool* pool, std::vector<float>& scratch,
                        const kernels::MatMulOptions& mm = {});

}  // namespace quantkv
