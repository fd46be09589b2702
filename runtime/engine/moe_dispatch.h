// Expert parallelism with token dispatch and combine as all-to-all (EngineConfig::moe_dispatch
// = kAllToAll), the alternative to the all-reduce form in which every rank runs its experts
// on every row and the layer's sum all-reduce is the combine.
//
// Per MoE layer, on a group of N ranks that all hold the step's full activation x[n] (the
// attention before it is tensor-parallel, so its all-reduce leaves every rank the same bits):
//   1. every rank routes all n rows (the router is one small matmul; the routing observers,
//      the expert precision policy and router-entropy promotion need every row's routing on
//      every rank, and the same bits of x give the same routing everywhere);
//   2. token sharding: rank r is the home of rows ReduceScatterChunk(n, N, r);
//   3. dispatch (AllToAllV): each home sends each of its rows once to every other rank that
//      owns at least one of the row's top-k experts (expert e lives on rank ExpertOwner(e));
//   4. each owner runs its experts on the rows it received and its own home rows, in global
//      row order (so an expert sees the same batch as on one rank), and sums each row's
//      weighted expert outputs in expert order;
//   5. combine (AllToAllV): the owners send those partial sums back to the rows' homes, which
//      add them in rank order of the owners, then add the shared expert (held whole by every
//      rank, run on the home rows only);
//   6. an all-gather of the home rows gives every rank the full output again, the same bits
//      on every rank.
// A dispatched or returned row is a record: its global index (int32), a tag byte and three
// zero bytes, then its hidden values: fp32, or (--ep-payload, MoePayloadConfig) a
// kernels::CommCodec payload, each record encoded on its own so that a row's bits do not
// depend on which rows travel with it. With a LOW/HIGH payload a record is encoded with HIGH
// when it concerns a sensitive expert (a dispatched row: one of its experts on the receiving
// rank; a returned partial sum: one of its experts on the sending rank) and with LOW
// otherwise. The engine calls an expert sensitive while router-aware elastic precision holds
// it at its highest weight precision (moe/expert_precision_policy.h), so the experts that
// carry the most routed mass get both their weights and their activations at high precision.
//
// The sum order differs from one rank's (owners' partials in rank order rather than all
// experts in expert order), so the output equals the single-rank layer only within fp32
// rounding (bit for bit when every row has at most two experts: two-term sums commute).
//
// Bytes each rank sends per layer, for h hidden values and d the mean number of other ranks
// a home row has experts on (d <= min(k, N - 1)): dispatch and combine about
// 2 d (n / N) (4 h + 8) with fp32 records (codec payloads instead of 4 h with --ep-payload), the
// all-gather (N - 1) ceil(n / N) 4 h, plus two all-gathers of N counts; against (N - 1) n 4 h for
// the all-reduce form's all-gather (from MpiCommunicatorOptions::reduce_scatter_min_elements values
// 2 (N - 1) / N n 4 h). Fewer bytes when 2 d + N - 1 < N (N - 1): from 3 ranks with small k, not at
// 2 ranks, where the dispatch alone costs what the all-reduce saves. The rows dispatched are rows
// every rank already holds (step 3 exists for layouts where activations are sharded, and to carry
// compressed payloads), so kCombineOnly skips that exchange: d (n / N) (4 h + 8) plus the
// all-gather, below the all-reduce whenever d < N - 1 (at 2 ranks: whenever some rows have
// all their experts on their home rank). Steps of fewer rows than ranks (a decode step of
// one sequence) send more than the all-reduce either way: the all-gather pads every rank's
// rows to the longest chunk.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/comm_codec.h"
#include "kernels/matmul.h"
#include "kernels/thread_pool.h"
#include "moe/router.h"
#include "runtime/comm/communicator.h"
#include "runtime/engine/moe_ffn.h"

namespace quantkv {

enum class MoeDispatch {
  // Every rank runs its experts on all rows; the combine is the layer's sum all-reduce.
  kAllReduce,
  // Rows sharded over the ranks, dispatched to their experts' owners and combined back with
  // all-to-alls, then all-gathered.
  kAllToAll,
  // kAllToAll without step 3's exchange: every rank already holds every row, so an owner
  // reads the rows routed to its experts from its own copy of x; only the combine and the
  // all-gather move bytes.
  kCombineOnly,
};

// "all-reduce" / "all-to-all" / "combine-only", the --ep-dispatch spellings.
const char* MoeDispatchName(MoeDispatch d);
absl::StatusOr<MoeDispatch> ParseMoeDispatch(std::string_view name);

// How dispatch and combine records carry their values: nullopt is fp32 (exact).
struct MoePayloadConfig {
  std::optional<kernels::CommCodecConfig> low;   // records of other experts
  std::optional<kernels::CommCodecConfig> high;  // records of sensitive experts
  bool exact() const { return !low && !high; }
  // Canonical spelling, parseable by ParseMoePayload: "fp32", "int8:g64:out2",
  // "int4:g64:out2/int8:g64:out2".
  std::string ToString() const;
};
// "fp32" (exact, the default), CODEC (every record), or LOW/HIGH (each fp32 or a codec in
// kernels/comm_codec.h's grammar: int8|int4|fp8[:gN][:outK]), the --ep-payload spellings.
absl::StatusOr<MoePayloadConfig> ParseMoePayload(std::string_view text);

// Records sent by this rank, by how they were encoded (for tests and benchmarks).
struct MoePayloadCounts {
  int64_t exact = 0, low = 0, high = 0;
};

// The rank that computes expert e under expert parallelism over `ranks` ranks.
inline int ExpertOwner(int64_t e, int ranks) { return static_cast<int>(e % ranks); }

// Buffers kept between layers and steps.
struct MoeAllToAllScratch {
  std::vector<uint8_t> send, recv;
  std::vector<int64_t> send_counts, recv_counts;
  std::vector<float> batch, partial, home, gathered;
  std::vector<int32_t> batch_rows, batch_source;
  std::vector<uint8_t> owners;  // [rows][ranks]
  moe::Routing batch_routing;
  // Received records, decoded: row index and values, and where each sender's rows start.
  std::vector<int32_t> recv_rows;
  std::vector<float> recv_values;
  std::vector<int64_t> recv_begin;  // [ranks + 1]
  // Codecs of the payload config they were made for (made on first use).
  std::unique_ptr<kernels::CommCodec> low_codec, high_codec;
  MoePayloadCounts counts;  // cumulative
};

// y[n x hidden] = the MoE layer's output for x[n x hidden] (the same on every rank of comm;
// y too on return), by the steps above (dispatch kAllToAll or kCombineOnly: the same bits
// either way, with an exact payload); `routing` receives the routing of all n rows.
// `payload` says how records are encoded; `sensitive` (n_experts entries, or empty: none)
// marks the experts whose records use payload.high.
// w.owned must mark the experts with ExpertOwner(e) == comm.rank(), and w.shared be whole.
// Collective: every rank calls it with the same n. *comm_ns gains the time spent in comm's
// collectives.
absl::Status MoeFfnAllToAll(MoeDispatch dispatch, const MoeFfnWeights& w,
                            const moe::RouterConfig& rc, const float* x, int64_t n, float* y,
                            Communicator& comm, kernels::ThreadPool* pool,
                            const kernels::MatMulOptions& mm, MoeFfnScratch& scratch,
                            MoeAllToAllScratch& a2a, moe::Routing& routing, int64_t* comm_ns,
                            const MoePayloadConfig& payload = {},
                            std::span<const uint8_t> sensitive = {});

}  // namespace quantkv
