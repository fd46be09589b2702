// SnapKV's token scores (Li et al., 2024): which prompt tokens the end of the prompt attends
// to. The queries of the last `window` prompt tokens (the observation window, where a
// question usually sits) are softmaxed over every earlier token with the exact keys, and
// each token's probability mass, summed over those queries and all query heads, is
// max-pooled over its neighbours (so that the tokens around a hit are kept with it). The
// engine (`--kv-promote snapkv`) promotes the best-scored rows of each block at the prompt's
// end, instead of H2O's mass received by the time a block fills, when the question has not
// been read yet.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/thread_pool.h"
#include "runtime/kv/kv_cache.h"

namespace quantkv {

struct SnapKvQueries {
  const float* q = nullptr;  // [n_q][n_heads][head_dim], RoPE applied, as attention saw them
  const int32_t* positions = nullptr;  // [n_q]; query i attends tokens 0..positions[i]
  int64_t n_q = 0;
  int64_t n_heads = 0;
  float scale = 0.0f;  // the layer's score scale
};

// scores[t] for t in [0, n_tokens) of `layer`, from keys seq retained (KvCache::RetainRows;
// every token < n_tokens must be retained). pool_kernel: odd width of the max-pooling, 1
// for none. Errors name a missing row or a bad shape.
absl::StatusOr<std::vector<float>> SnapKvScores(const KvCache& cache, const SequenceKv& seq,
                                                int64_t layer, int64_t n_tokens,
                                                const SnapKvQueries& queries, int pool_kernel,
                                                kernels::ThreadPool* pool);

}  // namespace quantkv
