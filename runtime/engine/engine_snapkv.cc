// Engine's part of kv_promote "snapkv" (runtime/engine/snapkv.h): the observation window's
// queries are kept while a prompt runs, and its blocks are promoted when it ends.
#include <algorithm>
#include <cmath>

#include "runtime/engine/engine.h"
#include "runtime/engine/snapkv.h"
#include "runtime/util/status_macros.h"

namespace quantkv {

void Engine::KeepSnapQueries(std::span<const StepInput> inputs, int64_t layer,
                             const std::vector<float>& q, const std::vector<int32_t>& positions,
                             int64_t q_dim) {
  const int64_t window = config_.snapkv_window;
  int64_t row = 0;
  for (const StepInput& in : inputs) {
    const int64_t n = static_cast<int64_t>(in.tokens.size());
    Sequence& s = sequences_[in.seq];
    if (s.snap_pending) {
      const int64_t take = std::min(n, window);
      const int64_t first = row + n - take;
      std::vector<float>& w = s.snap_q[layer];
      w.insert(w.end(), q.begin() + first * q_dim, q.begin() + (first + take) * q_dim);
      if (static_cast<int64_t>(w.size()) > window * q_dim) {
        w.erase(w.begin(), w.end() - window * q_dim);
      }
      if (layer == 0) {
        std::vector<int32_t>& p = s.snap_positions;
        p.insert(p.end(), positions.begin() + first, positions.begin() + first + take);
        if (static_cast<int64_t>(p.size()) > window) p.erase(p.begin(), p.end() - window);
      }
    }
    row += n;
  }
}

absl::Status Engine::SnapPromote(Sequence& seq) {
  KvCache& cache = *kv_[seq.cache];
  const int64_t n_heads = shard_.heads.size;
  const float scale = 1.0f / std::sqrt(static_cast<float>(model_config_.head_dim));
  const int64_t full = seq.kv.length / cache.block_tokens();
  const int64_t bt = cache.block_tokens();
  for (int64_t l = 0; l < model_config_.n_layers && full > 0; ++l) {
    const SnapKvQueries queries{seq.snap_q[l].data(), seq.snap_positions.data(),
                                static_cast<int64_t>(seq.snap_positions.size()), n_heads,
                                scale * cache.policy().ScoreScale(l)};
    QKV_ASSIGN_OR_RETURN(
        std::vector<float> scores,
        SnapKvScores(cache, seq.kv, l, seq.kv.length, queries, config_.snapkv_pool, pool_.get()));
    for (int64_t pos = 0; pos < full * bt; ++pos) {
      (void)cache.PromoteRow(seq.kv, l, pos, scores[pos]);
    }
  }
  cache.RetainRows(seq.kv, false);
  seq.snap_pending = false;
  seq.snap_q.clear();
  seq.snap_positions.clear();
  return absl::OkStatus();
}

}  // namespace quantkv
