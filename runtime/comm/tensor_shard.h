// Which slice of a decoder layer one tensor-parallel rank computes (Megatron-style).
// Attention is split by KV-head groups: rank r owns a contiguous range of KV heads and the
// query heads that read them, so attention needs no communication and any KV head count
// splits (3 heads over 2 ranks: 2 + 1). The MLP is split along the intermediate dimension in
// units of `intermediate_align` (the block size of the down projection's storage, whose
// columns are cut). Ranks earlier in the group take the remainder.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"

namespace quantkv {

struct ShardRange {
  int64_t begin = 0;
  int64_t size = 0;
  int64_t end() const { return begin + size; }
};

// units split over `ranks` as evenly as possible, the first units % ranks one larger.
ShardRange SplitEvenly(int64_t units, int rank, int ranks);

struct ShardShape {
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t intermediate = 0;
  int64_t intermediate_align = 1;  // block size of ffn_down's rows (columns are cut)
  int64_t o_align = 1;             // block size of attn_output's rows (columns are cut)
};

struct TensorShard {
  int rank = 0;
  int ranks = 1;
  ShardRange kv_heads;      // of n_kv_heads
  ShardRange heads;         // query heads of those KV groups
  ShardRange intermediate;  // MLP columns
  bool whole() const { return ranks == 1; }
};

// Every rank computes something of every layer; errors name the numbers that do not split.
absl::StatusOr<TensorShard> PlanTensorShard(const ShardShape& shape, int rank, int ranks);

}  // namespace quantkv
