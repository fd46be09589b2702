// Attention through a real one-layer KvCache, for tests that compare cache policies on the
// same keys and values.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/rope.h"
#include "runtime/kv/kv_cache.h"

namespace quantkv::testing {

// Writes k and v ([n_ctx][row], row = n_kv_heads * head_dim) into layer 0 of `seq` in steps
// of 64 tokens (the cache's max_step_tokens must be >= 64).
inline void WriteInSteps(KvCache& cache, SequenceKv& seq, const std::vector<float>& k,
                         const std::vector<float>& v, int64_t row) {
  const int64_t n_ctx = static_cast<int64_t>(k.size()) / row;
  for (int64_t pos = 0; pos < n_ctx; pos += 64) {
    const int64_t n = std::min<int64_t>(64, n_ctx - pos);
    EXPECT_TRUE(cache.Reserve(seq, pos + n).ok());
    cache.Write(seq, 0, pos, n, k.data() + pos * row, v.data() + pos * row);
    seq.length = pos + n;
  }
}

struct CacheAttention {
  std::string spec;  // --kv policy
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t n_heads = 0;
  const kernels::RopeTable* rope = nullptr;  // for rope=pre policies
  kernels::ThreadPool* pool = nullptr;
  int split_threads = 0;     // AttentionQuery::split_threads
  bool fused_decode = true;  // AttentionQuery::fused_decode
  // Codebooks / centroids to add to the parsed policy (codecs nlN:lloyd, pqMxB), by layer 0.
  LayerKvVectors codebooks = {};
};

// Writes k and v ([n_ctx][n_kv_heads * head_dim], k already rotated) in steps of 64 tokens,
// then attends with q ([n_q][n_heads * head_dim]) at the last n_q positions.
inline std::vector<float> AttendThroughCache(const CacheAttention& c, const std::vector<float>& k,
                                             const std::vector<float>& v,
                                             const std::vector<float>& q, int64_t n_q) {
  auto policy = ParseKvPolicy(c.spec);
  EXPECT_TRUE(policy.ok()) << policy.status();
  KvCacheConfig cfg;
  cfg.n_layers = 1;
  cfg.n_kv_heads = c.n_kv_heads;
  cfg.head_dim = c.head_dim;
  cfg.policy = *policy;
  if (!c.codebooks.k.empty() || !c.codebooks.v.empty()) cfg.policy.codebooks[0] = c.codebooks;
  cfg.max_bytes = 16 << 20;
  cfg.max_step_tokens = 64;
  cfg.rope = c.rope;
  auto cache = KvCache::Create(cfg);
  EXPECT_TRUE(cache.ok()) << cache.status();
  if (!cache.ok()) return {};
  const int64_t row = c.n_kv_heads * c.head_dim;
  const int64_t n_ctx = static_cast<int64_t>(k.size()) / row;
  SequenceKv seq;
  WriteInSteps(**cache, seq, k, v, row);
  std::vector<int32_t> positions;
  for (int64_t i = 0; i < n_q; ++i) positions.push_back(static_cast<int32_t>(n_ctx - n_q + i));
  std::vector<float> out(n_q * c.n_heads * c.head_dim);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  kernels::AttentionQuery query{q.data(), n_q, c.n_heads, positions.data(), scale};
  query.split_threads = c.split_threads;
  query.fused_decode = c.fused_decode;
  kernels::Attention(query, (*cache)->View(seq, 0, n_ctx), out.data(), c.pool);
  return out;
}

}  // namespace quantkv::testing
