// Mixed-precision KV bit allocation under a memory budget (`quantkv kv-allocate`): given a
// sensitivity file (kv_sensitivity_file.h), choose one candidate codec for every layer's K
// and V — or every KV head's, where the file has per-head data — so that the cache's average
// bits per element (codes and all scale/zero metadata, from the codecs' own slab sizes) stays
// within the budget and the summed sensitivity is smallest. Sensitivities are treated as
// additive across layers and heads, which is what measuring one layer at a time assumes.
//
// The solver is an exact multiple-choice knapsack (dynamic programming over the cache bytes
// of one block, in units of the greatest common divisor of all slab sizes), so more budget
// never gives a worse allocation. A head's cost is its layer's measured cost split by the
// file's per-head proxy (head h gets proxy_h / sum of the layer's proxies), so a layer's
// heads together cost what the layer measured.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/kv/kv_sensitivity_file.h"

namespace quantkv {

enum class KvAllocationMetric {
  kKl,        // mean KL against the base run (stable on short texts; the default)
  kDeltaPpl,  // PPL increase, negative values (noise) counted as 0
};

struct KvAllocationOptions {
  // Exactly one budget is > 0: the average bits per cached element, or the bytes per token
  // of all layers' K and V (codes and metadata; fp16-protected tokens are not counted).
  double budget_bits = 0;
  double budget_bytes_per_token = 0;
  KvAllocationMetric metric = KvAllocationMetric::kKl;
  bool per_head = true;  // allocate heads separately when every layer has per-head data
  // Largest DP table (items x budget units); past it the byte unit is coarsened (rounded up,
  // so the budget still holds) and the answer may be slightly suboptimal.
  int64_t max_dp_cells = int64_t{1} << 26;
};

struct KvAllocationChoice {
  int64_t layer = 0;
  int64_t head = -1;  // -1: every KV head of the layer
  bool key = true;    // K, else V
  std::string codec;
  double bits_per_element = 0;
  double cost = 0;  // predicted sensitivity of this choice
};

struct KvAllocation {
  std::vector<KvAllocationChoice> choices;  // by layer, K then V, by head
  bool per_head = false;
  double budget_bits = 0;       // the budget in bits/element
  double bits_per_element = 0;  // what the choices average
  double bytes_per_token = 0;
  double cost = 0;      // summed predicted sensitivity
  double min_bits = 0;  // every K and V at its cheapest candidate
  double max_bits = 0;  // every K and V at its richest candidate
  // A KV policy spec: the file's base, then the choices ("k=..,v=..,L.k=..,L.hH.v=..").
  std::string spec;
};

absl::StatusOr<KvAllocationMetric> ParseKvAllocationMetric(const std::string& name);

// INVALID_ARGUMENT when the budget is below the cheapest allocation (the message names both);
// FAILED_PRECONDITION when the file does not cover every layer or names a codec that does
// not fit its geometry.
absl::StatusOr<KvAllocation> AllocateKvBits(const KvSensitivity& sensitivity,
                                            const KvAllocationOptions& options);

// A KV policy file usable as --kv @FILE: {"spec": ..., "allocation": {...how it was made...}}.
std::string KvAllocationPolicyJson(const KvAllocation& allocation,
                                   const std::string& provenance_json);

}  // namespace quantkv
