// Attention mass received by cache tokens: H2O's heavy-hitter score. After Attention() has
// run a set of queries over a layer (with AttentionQuery::lse set), this adds to each token
// of a range the probability those queries gave it, summed over queries and query heads of
// each KV head group and over the groups. The engine accumulates it over steps for the
// tokens of a block not yet full and, when the block fills, keeps the heaviest rows exactly
// (kv_promote "attention"; KvCache::PromoteRow).
#pragma once

#include <cstdint>

#include "kernels/attention.h"

namespace quantkv::kernels {

// mass[t - t0] += sum over queries i with positions[i] >= t and heads h of
// exp(scale * q[i][h] . k_t - lse[i][h]), for t in [t0, t1). Keys are read from the protected
// copy (sinks or ring), so the range must lie there: tokens before
// max(sink_tokens, n_tokens - ring_tokens) that are not sinks are skipped (left unchanged).
// Page selection's skipped tokens get nothing. `lse` is [n_q][n_heads] from the Attention
// call over the same view.
void AddAttentionMass(const AttentionQuery& query, const float* lse, const KvLayerView& kv,
                      int64_t t0, int64_t t1, float* mass);

}  // namespace quantkv::kernels
