// What the all-to-all MoE dispatch (runtime/engine/moe_dispatch.h) must send, from a layer's
// routing: for the byte counters' tests.
#pragma once

#include <cstdint>

#include "moe/router.h"
#include "runtime/comm/communicator.h"
#include "runtime/engine/moe_dispatch.h"

namespace quantkv::testing {

// Bytes rank `me` of `ranks` sends in one layer: records (an 8-byte header holding the row
// index and a tag, then 4 * hidden bytes) of its home rows to the other ranks owning their experts
// (kAllToAll only), records of the rows it computes for other homes back to them, the all-gather of
// the home rows padded to the longest chunk, and the all-gathers of the all-to-alls' send counts (8
// bytes per rank to every other rank).
inline int64_t MoeAllToAllBytes(MoeDispatch dispatch, const moe::Routing& r, int64_t hidden,
                                int ranks, int me) {
  const int64_t n = r.n_tokens, record = 8 + 4 * hidden;
  auto owns = [&](int64_t row, int q) {
    for (int j = 0; j < r.top_k; ++j) {
      if (ExpertOwner(r.expert[row * r.top_k + j], ranks) == q) return true;
    }
    return false;
  };
  const bool send_rows = dispatch == MoeDispatch::kAllToAll;
  const ChunkRange home = ReduceScatterChunk(n, ranks, me);
  int64_t bytes = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (i >= home.begin && i < home.end) {
      for (int q = 0; q < ranks; ++q) bytes += send_rows && q != me && owns(i, q) ? record : 0;
    } else if (owns(i, me)) {
      bytes += record;
    }
  }
  bytes += (ranks - 1) * ReduceScatterChunk(n, ranks, 0).size() * hidden * 4;
  bytes += (send_rows ? 2 : 1) * (ranks - 1) * ranks * 8;
  return bytes;
}

}  // namespace quantkv::testing
