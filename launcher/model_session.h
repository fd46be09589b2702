// What every model-running subcommand shares: the --model/--threads/--kv/... flags and
// loading the engine and tokenizer they describe, on one process or, with --tp N under
// `mpirun -np N`, as one rank of a tensor-parallel group.
#pragma once

#include <memory>
#include <ostream>
#include <string>

#include "absl/status/statusor.h"
#include "launcher/flags.h"
#include "launcher/subcommand.h"
#include "runtime/comm/communicator.h"
#include "runtime/comm/compressed_communicator.h"
#include "runtime/engine/engine.h"
#include "runtime/tokenizer/tokenizer.h"

namespace quantkv::launcher {

struct ModelFlags {
  std::string model;
  int threads = 1;
  std::string kv;
  int64_t kv_budget_mb = 0;
  std::string rope_scaling;  // "" (the model's), linear:F, ntk:F, yarn:F
  int tp = 1;                // tensor-parallel ranks; > 1 under mpirun with as many processes,
                             // or with rendezvous
  // Ranks started without mpirun (runtime/comm/tcp_communicator.h): rank 0's HOST:PORT,
  // this process's rank and the file holding the job's shared secret.
  std::string rendezvous;
  int rank = -1;
  std::string secret_file;
  // The data plane of ranks started by mpirun: "mpi", or "nccl" (one GPU per rank; MPI then
  // only bootstraps it: runtime/comm/nccl_communicator.h).
  std::string comm_backend = "mpi";
  // MoE models under --tp: experts split over the ranks whole (ep = tp, the default 0 means
  // that) or every expert split by neuron (ep = 1, tensor parallelism inside experts).
  int ep = 0;
  // Under --ep N, how tokens reach their experts (runtime/engine/moe_dispatch.h): "all-reduce"
  // (every rank runs its experts on all tokens, the combine is the layer's all-reduce) or
  // "all-to-all" (tokens sharded over the ranks, dispatched to their experts' ranks and
  // combined back with all-to-alls, then all-gathered) or "combine-only" (the same without
  // sending the tokens, which every rank holds).
  std::string ep_dispatch = "all-reduce";
  // With --ep-dispatch all-to-all / combine-only: how the records travel
  // (runtime/engine/moe_dispatch.h, MoePayloadConfig): "fp32", a codec, or LOW/HIGH by
  // expert sensitivity.
  std::string ep_payload = "fp32";
  // Compressed all-reduce under --tp (runtime/comm/compressed_communicator.h): "none" or a
  // codec (int8, fp8, int4, with options like int4:g32:out2), the smallest all-reduce it
  // compresses, and layers kept exact ("0,29").
  std::string comm_compress = "none";
  int64_t comm_compress_min_elements = 16384;
  std::string comm_compress_exact_layers;
  // Adapters (runtime/engine/attn_correction.h, runtime/model/lora.h): a fitted KV
  // correction file for the --kv cache (refused for another --kv unless forced) and a PEFT
  // LoRA adapter directory or file.
  std::string kv_correction;
  bool kv_correction_force = false;
  std::string lora;
  // MoE: a dense model run as the experts of a split from `quantkv moefy`, and the number
  // of experts each token is routed to (0: the model's or the split's).
  std::string moe_split;
  int64_t moe_top_k = 0;
  // Router-aware elastic expert precision: the weight types every expert is held at
  // ("q4_0,q8_0"), the active bytes budget in MiB (0: all at the first), the policy's
  // EMA half-life and decision interval in tokens and its hysteresis.
  // Promoted tokens for a --kv codec with :keepN: key-norm or router-entropy (MoE).
  std::string kv_promote = "none";
  int64_t snapkv_window = 32;
  // Elastic precision: the spec --kv's oldest blocks are requantized to under pressure.
  std::string kv_floor;
  // Page selection (Quest) for decode: the share of encoded blocks attended, and a floor.
  double page_fraction = 1.0;
  // Where the forward runs (EngineConfig::device, gpu_weights, gpu_memory_fraction).
  std::string device = "auto";
  std::string gpu_weights = "bf16";
  double gpu_memory_fraction = 0.9;
  int64_t page_min_blocks = 2;
  std::string expert_levels;
  double expert_budget_mb = 0;
  double expert_half_life = 512;
  int64_t expert_decide_every = 64;
  double expert_hysteresis = 0.2;
};

// "q4_0,q8_0" -> {Q4_0, Q8_0}: the types ExpertStore can hold, lowest precision first.
absl::StatusOr<std::vector<kernels::GgmlType>> ParseExpertLevels(std::string_view text);

// One line: active expert bytes vs budget, experts per level, decisions and changes.
std::string ExpertPrecisionSummary(const Engine& engine);

struct ModelFlagOptions {
  // Defines --tp: for commands whose every rank runs the same engine Steps in the same
  // order (generate, perplexity), and that print only on rank 0.
  bool tensor_parallel = false;
};

void DefineModelFlags(FlagSet& flags, ModelFlags& options, ModelFlagOptions what = {});

// One line on a compressed all-reduce's work: calls compressed, bytes this rank sent raw
// vs on the wire, time in collectives and in the codec.
std::string CommStatsSummary(const CompressedCommunicator& comm);

class CommStatsReporter {
 public:
  explicit CommStatsReporter(const CompressedCommunicator* comm) : comm_(comm) {}
  CommStatsReporter(const CommStatsReporter&) = delete;
  CommStatsReporter& operator=(const CommStatsReporter&) = delete;
  ~CommStatsReporter();

 private:
  const CompressedCommunicator* comm_;
};

// This process's rank: --rank with --rendezvous, else mpirun's (0 without either).
int LaunchRank(const ModelFlags& flags);

struct ModelSession {
  std::string path;
  std::unique_ptr<Tokenizer> tokenizer;
  // Declared before the engine, which points to it: destroyed after it.
  std::unique_ptr<Communicator> comm;  // set with --tp > 1
  // comm itself when --comm-compress wraps the group in a compressed all-reduce; not owned.
  CompressedCommunicator* compressed_comm = nullptr;
  std::unique_ptr<Engine> engine;
  // Prints compressed_comm's statistics to stderr on rank 0 when the session ends, so every
  // --tp command reports them without code of its own. Declared last: destroyed first.
  std::unique_ptr<CommStatsReporter> comm_report;

  int rank() const { return comm ? comm->rank() : 0; }
  // Results are printed by rank 0 only: `out` there, a stream that drops them elsewhere.
  std::ostream& ResultStream(std::ostream& out) const;
};

// Resolves --model (path or known name), opens GGUF or an HF directory, builds the
// tokenizer and the engine. With --tp N (N > 1) the process must be one of N started by
// mpirun; the ranks check they opened the same model file and --kv policy, and a failure
// on any rank is returned on every rank (prefixed "rank R: ").
absl::StatusOr<ModelSession> OpenModelSession(const ModelFlags& flags,
                                              const EngineConfig& base = {});

// Reports a failure after the session opened, which may be this rank's alone (the others
// then wait in a collective forever): under tensor parallelism the whole job is aborted
// after the message. Otherwise ReportFailure.
int ReportSessionFailure(CommandContext& ctx, const ModelSession& session,
                         const absl::Status& status);

}  // namespace quantkv::launcher
