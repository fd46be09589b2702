// The CPU forward pass of a LLaMA-family decoder over the paged KV cache. One Step runs
// any mix of prefill chunks and decode tokens from several sequences as one batch: the
// linear layers see all rows at once, attention runs per sequence over its own blocks.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "kernels/matmul.h"
#include "kernels/rope.h"
#include "kernels/thread_pool.h"
#include "moe/expert_precision_policy.h"
#include "runtime/comm/communicator.h"
#include "runtime/comm/tensor_shard.h"
#include "runtime/engine/attn_correction.h"
#include "runtime/engine/device_forward.h"
#include "runtime/engine/expert_store.h"
#include "runtime/engine/moe_dispatch.h"
#include "runtime/engine/moe_ffn.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/model/lora.h"
#include "runtime/model/weight_source.h"

namespace quantkv {

// What EngineConfig::attn_observer sees of one layer of a step: every row's attention output
// (concatenated heads, before o_proj; corrected when a correction applies) and the output of
// the same queries over an exact shadow cache holding the same K/V.
struct AttnObservation {
  int64_t layer = 0;
  int64_t n = 0;  // rows, in step input order
  const int32_t* positions = nullptr;
  const float* attn = nullptr;        // [n][n_heads * head_dim]
  const float* attn_exact = nullptr;  // [n][n_heads * head_dim]
  // 1 where the row's attention read encoded (quantized) blocks, 0 where everything it
  // attended to was still in the protected fp16 tokens (sinks, window, tail).
  const uint8_t* reads_encoded = nullptr;
};

struct EngineConfig {
  int threads = 1;
  // Where the forward runs: "cpu"; "cuda" (runtime/engine/device_forward.h: weights and KV
  // pool in GPU memory, the bookkeeping here); "auto": cuda when this build has it, a GPU is
  // usable and the configuration is one the GPU path runs, else cpu.
  std::string device = "cpu";
  // --device cuda: weights dequantized at load to "bf16" or "f32" (DeviceForwardConfig).
  std::string gpu_weights = "bf16";
  // --device cuda: the KV pool takes at most this fraction of the device memory free after
  // the weights (and at most kv_max_bytes).
  double gpu_memory_fraction = 0.9;
  // KV cache policy: a preset ("fp16", "int4-comp", ...), a spec or "@policy.json"
  // (runtime/kv/kv_policy.h).
  std::string kv_spec = "fp16";
  int64_t kv_max_bytes = int64_t{1} << 30;
  // RoPE scaling to run past the trained window (runtime/model/rope_scaling.h): "" keeps the
  // model's; "linear:4", "ntk:4", "yarn:4" replace it and scale model_config().context_length.
  std::string rope_scaling;
  // Further KV caches, one per spec, that sequences may be created in (NewSequence(i) puts
  // a sequence in cache i; kv_spec is cache 0): a server offering several presets. The
  // caches share kv_max_bytes evenly.
  std::vector<std::string> more_kv_specs = {};
  // Elastic precision under memory pressure for cache 0: the codecs its oldest blocks may be
  // re-encoded to (KvCacheConfig::floor; e.g. the preset "int2-floor" under int4-comp).
  // "": none.
  std::string kv_floor;
  // Longest run of tokens of one sequence in a Step; longer inputs are split.
  int64_t max_chunk_tokens = 512;
  // kInt8 is llama.cpp's decode path (int8 activations against Q4/Q8 weights); kFloat32
  // keeps activations exact for bit-for-bit comparisons with a float reference.
  kernels::ActivationPrecision decode_activations = kernels::ActivationPrecision::kInt8;
  // The lm_head decides the next token: int16 activations there keep near-ties as the
  // float model has them (int8 flips logit gaps below ~0.1) at int8 speed.
  kernels::ActivationPrecision lm_head_activations = kernels::ActivationPrecision::kInt16;
  // From this many rows in a step the linear layers use tiled SGEMM. Tests set it out of
  // reach so a prefilled row is computed exactly like a decoded one.
  int64_t gemm_min_rows = 8;
  // Decode steps use the fused decode attention kernels (kernels/attention.h); false keeps
  // them on the tiled kernel, bit-identical to prefill (for tests that compare the two).
  bool fused_decode_attention = true;
  // Repack Q4 layer weights for the batched int8 kernel (kernels::PackWeights) where this
  // CPU has it: 3-4x faster matmuls for decode batches, ~2x for one row, at the cost of a
  // second copy of those weights in memory (the mapped file stays for the SGEMM path).
  bool pack_weights = true;
  // Sees every layer's K (rotated) and V rows of each step before they are cached, n rows
  // of n_kv_heads * head_dim with their positions; for KV calibration (`quantkv calibrate`).
  // Under tensor parallelism only this rank's KV heads (shard().kv_heads), unless
  // kv_observer_all_heads: then every rank's heads are all-gathered first (a collective per
  // layer) and the observer sees the model's n_kv_heads on every rank.
  std::function<void(int64_t layer, int64_t n, const int32_t* positions, const float* k,
                     const float* v)>
      kv_observer;
  bool kv_observer_all_heads = false;
  // Attention-output correction (runtime/engine/attn_correction.h) for sequences in KV
  // cache 0 (kv_spec's; the more_kv_specs caches stay uncorrected), added to the rows whose
  // attention read encoded blocks. Checked against the model's shape at Create.
  std::shared_ptr<const AttnCorrection> attn_correction;
  // LoRA adapters on q/k/v/o (runtime/model/lora.h), applied to every sequence.
  std::shared_ptr<const LoraAdapters> lora;
  // For fitting corrections (`quantkv fit-correction`): called per layer of every step with
  // the attention output and that over an exact shadow cache of spec attn_observer_exact_kv,
  // which the engine then keeps beside each sequence (it costs a second cache and a second
  // attention per layer; nothing when unset).
  std::function<void(const AttnObservation&)> attn_observer;
  std::string attn_observer_exact_kv = "fp32";
  // Tensor parallelism (Megatron): with a group of N > 1 ranks this engine computes rank
  // comm->rank()'s shard (runtime/comm/tensor_shard.h) and sums partial outputs over the
  // group after the attention output and down projections. Every rank must run the same
  // Steps. nullptr (or a group of 1): the whole model. Not owned; must outlive the engine.
  // Sums go through AllReduceSumForLayer, so a compressing group can keep layers exact.
  Communicator* comm = nullptr;
  // Sees each dense MLP layer's input (after ffn_norm) and its SwiGLU activations, n rows of
  // hidden and of intermediate values; for splitting a dense model into experts
  // (`quantkv moefy`). Not called for MoE layers.
  std::function<void(int64_t layer, int64_t n, const float* x, const float* act)> mlp_observer;
  // Sees each MoE layer's routing of every step's rows (stats, precision policies).
  std::function<void(int64_t layer, const moe::Routing& routing)> routing_observer;
  // MoE models: route to this many experts instead of the model's top_k (0: the model's).
  int64_t moe_top_k = 0;
  // Under tensor parallelism, MoE experts are split over the ranks whole (expert
  // parallelism, the default: rank r computes experts e with e % N == r) or, with this set,
  // every expert's neurons are split over the ranks (tensor parallelism inside experts).
  bool moe_tensor_parallel = false;
  // Expert parallelism's token dispatch (runtime/engine/moe_dispatch.h): kAllReduce (every
  // rank holds all tokens' activations, so dispatch needs no communication, and the combine
  // is the layer's all-reduce; the shared expert is split by neuron) or kAllToAll (rows
  // sharded over the ranks, sent to their experts' owners and back with all-to-alls, then
  // all-gathered; every rank holds the shared expert whole) or kCombineOnly (kAllToAll
  // without sending the rows: owners read them from their own copy). The last two need an
  // MoE model and expert parallelism (not moe_tensor_parallel); on one rank all three are
  // the whole layer.
  MoeDispatch moe_dispatch = MoeDispatch::kAllReduce;
  // With kAllToAll / kCombineOnly: how the dispatched rows and returned partial sums are
  // encoded (--ep-payload; exact fp32 by default). A LOW/HIGH payload sends the records of
  // the experts that elastic precision holds at its highest level with HIGH, needing
  // expert_levels.
  MoePayloadConfig moe_payload;
  // Promoted tokens: with a KV codec that keeps rows (":keepN"), which tokens of each
  // filled block get the exact slots (KvCache::PromoteRow), decided at the end of the step
  // that fills the block: "key-norm" (per layer, the largest ||k||: the attention-sink-like
  // tokens), "attention" (per layer, the most attention mass received from the queries so
  // far, summed over heads: H2O's heavy hitters; kernels/attention_mass.h), "router-entropy" (MoE
  // models: the tokens whose routing is most uncertain, mean entropy over layers, for all layers),
  // "snapkv" (SnapKV: a prompt's blocks are decided at its end, by the attention of its last
  // snapkv_window tokens, runtime/engine/snapkv.h; blocks filled later as "attention"). The
  // prompt ends at a sequence's first one-token step; until then its exact rows are retained
  // (an fp16 copy of the prompt, outside the KV budget) and the prompt attends to them, as
  // SnapKV prefills at full precision and compresses afterwards. "" promotes nothing.
  std::string kv_promote;
  int64_t snapkv_window = 32;
  int snapkv_pool = 7;  // odd max-pooling width over the scores
  // Page selection (Quest): decode steps (a sequence's input of at most 4 tokens) attend,
  // per KV head, only to this fraction of the encoded blocks (at least page_min_blocks),
  // those whose key min/max bound q·k highest; sinks and the recent window are always
  // read. 1: every block (and no summaries are kept).
  double page_fraction = 1.0;
  int64_t page_min_blocks = 2;
  // MoE router-aware elastic precision: every expert held at each of these weight types
  // (lowest precision first, e.g. {Q4_0, Q8_0}; runtime/engine/expert_store.h), and each
  // expert's active type chosen from recent routing under expert_budget_bytes by
  // moe/expert_precision_policy.h, re-decided every expert_decide_every_tokens tokens with
  // hysteresis. Empty: experts computed as loaded.
  std::vector<kernels::GgmlType> expert_levels = {};
  int64_t expert_budget_bytes = 0;  // 0: every expert at the lowest level
  double expert_half_life_tokens = 512;
  int64_t expert_decide_every_tokens = 64;
  double expert_hysteresis = 0.2;
  int expert_min_dwell = 0;
  // Weigh each expert's routing score by how much its weights lose at the lowest level
  // (relative squared error of the lowest against the highest copy, normalised to mean 1):
  // a measured sensitivity, so the budget goes where traffic meets quantization error.
  bool expert_weight_error_sensitivity = false;
  // Fixed levels instead of the policy, [n_layers * n_experts] layer-major (benchmark
  // controls: random or uniform assignments at the same bytes).
  std::vector<int> expert_fixed_levels = {};
};

using SequenceId = int64_t;

// Tokens to append to one sequence in a Step, and which logits to return for them.
struct StepInput {
  SequenceId seq = 0;
  std::span<const int32_t> tokens;
  bool all_logits = false;  // false: only the last token's logits
};

struct StepTimings {
  int64_t forward_ns = 0;
  // Of forward_ns, the time in the tensor-parallel group's collectives (0 on one rank).
  int64_t comm_ns = 0;
  int64_t tokens = 0;
  // Bytes this rank sent to other ranks in the MoE layers' exchanges (the MoE output's
  // all-reduce, or the all-to-all dispatch, combine and all-gather), as
  // Communicator::bytes_sent counts them; 0 on one rank and for dense models.
  int64_t moe_bytes_sent = 0;
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(std::unique_ptr<WeightSource> weights,
                                                        const EngineConfig& config);
  ~Engine();

  // The model's config with EngineConfig::rope_scaling applied.
  const ModelConfig& model_config() const { return model_config_; }
  const EngineConfig& config() const { return config_; }
  const WeightSource& weights() const { return *weights_; }
  // Cache 0 is kv_spec's, 1.. more_kv_specs'.
  int kv_cache_count() const { return static_cast<int>(kv_.size()); }
  const KvCache& kv_cache(int index = 0) const { return *kv_[index]; }
  const kernels::RopeTable& rope() const { return *rope_; }
  // MoE models: the router as this engine runs it (top_k may be EngineConfig::moe_top_k).
  const moe::RouterConfig& router() const { return router_; }
  // With EngineConfig::expert_levels: the policy (null under expert_fixed_levels) and the
  // active level of each expert; expert bytes at the active levels.
  const moe::ExpertPrecisionPolicy* expert_policy() const { return expert_policy_.get(); }
  int expert_level(int64_t layer, int64_t expert) const;
  int64_t active_expert_bytes() const;
  // The heads and MLP columns this engine computes (everything without tensor parallelism).
  const TensorShard& shard() const { return shard_; }
  // The device the forward runs on (EngineConfig::device), nullptr on the CPU.
  const DeviceForward* device() const { return device_.get(); }

  // A new empty sequence in KV cache `kv_cache` (< kv_cache_count(), else OUT_OF_RANGE).
  absl::StatusOr<SequenceId> NewSequenceIn(int kv_cache);
  SequenceId NewSequence() { return *NewSequenceIn(0); }
  // Which KV cache `seq` lives in; NOT_FOUND for an unknown sequence.
  absl::StatusOr<int> SequenceCache(SequenceId seq) const;
  absl::Status Release(SequenceId seq);
  absl::StatusOr<int64_t> SequenceLength(SequenceId seq) const;
  // Elastic precision (EngineConfig::kv_floor): re-encodes the oldest `pairs` pairs of
  // seq's full blocks to the floor codecs, freeing one block per pair (KvCache::Requantize);
  // returns the pairs done.
  absl::StatusOr<int64_t> RequantizeOldest(SequenceId seq, int64_t pairs);
  // Benchmarks only: appends n_tokens positions of random K/V (unit normal, from `seed`) to
  // every layer of seq's cache without running the model, so decode speed can be measured
  // at long contexts without their quadratic prefill. The sequence's outputs are then
  // meaningless. On error (no room in the cache) seq is unchanged.
  absl::Status FillSyntheticKv(SequenceId seq, int64_t n_tokens, uint32_t seed);
  // The bits per element seq's cache holds now (KvCache::SequenceBitsPerElement).
  absl::StatusOr<double> SequenceKvBits(SequenceId seq) const;

  // Runs the inputs (at most max_chunk_tokens each) as one batch. Logits rows are appended
  // to `logits` in input order: every token's row for all_logits inputs, else the last one.
  // On error no sequence is changed.
  absl::Status Step(std::span<const StepInput> inputs, std::vector<float>* logits);
  // Step's checks of its inputs (known sequences, each once, token counts and ids, length),
  // without running anything; the number of tokens. Lets a tensor-parallel coordinator
  // refuse a step before the other ranks start its collectives.
  absl::StatusOr<int64_t> CheckStep(std::span<const StepInput> inputs) const;

  // Convenience: appends `tokens` to `seq` in chunks; returns the logits of the last token,
  // or of every token when all_logits.
  absl::Status Forward(SequenceId seq, std::span<const int32_t> tokens, bool all_logits,
                       std::vector<float>* logits);

  const StepTimings& last_step() const { return last_step_; }
  // Time in the tensor-parallel collectives over the engine's life (0 on one rank).
  int64_t comm_ns_total() const { return comm_ns_total_; }
  // StepTimings::moe_bytes_sent over the engine's life.
  int64_t moe_bytes_sent_total() const { return moe_bytes_sent_total_; }

  // Bytes of weights a decode step reads (all linear layers, the lm_head, one embedding row);
  // this rank's shards under tensor parallelism.
  int64_t WeightBytesPerToken() const;

 private:
  struct Layer {
    kernels::WeightMatrix q, k, v, o, gate, up, down;
    MoeFfnWeights moe;  // MoE models: the FFN (gate/up/down unused)
    std::vector<float> attn_norm, ffn_norm, q_bias, k_bias, v_bias, o_bias;
    std::vector<float> q_norm, k_norm;  // [head_dim], qk_norm models
  };
  Engine() = default;
  absl::Status PlanShard();
  absl::Status LoadWeights();
  absl::Status PackWeights();  // config_.pack_weights
  absl::Status LoadMoeLayer(int64_t layer, Layer& l);
  // Sums a row-parallel layer's partial output over the tensor-parallel group; `layer`
  // lets a compressing group keep that layer's sums exact.
  absl::Status ReduceSum(std::vector<float>& x, int64_t n, int64_t layer);
  // kv_observer_all_heads: this rank's K or V rows ([n][shard kv heads][head_dim]) gathered
  // with every other rank's into out ([n][n_kv_heads][head_dim]).
  absl::Status GatherKvHeads(const float* mine, int64_t n, std::vector<float>* out);
  void Embed(std::span<const int32_t> tokens, float* out) const;

  // EngineConfig::device: the features the CUDA forward does not run, named; OK otherwise.
  absl::Status CheckDeviceSupports() const;
  // Creates device_ for cache 0 when the config asks for a device; false when the forward
  // stays on the CPU ("auto" without a usable device or with a configuration it cannot run).
  absl::StatusOr<bool> SetUpDevice();

  EngineConfig config_;
  std::unique_ptr<DeviceForward> device_;
  std::unique_ptr<WeightSource> weights_;
  ModelConfig model_config_;
  std::unique_ptr<kernels::ThreadPool> pool_;
  std::vector<std::unique_ptr<KvCache>> kv_;
  std::unique_ptr<kernels::RopeTable> rope_;
  TensorShard shard_;
  std::vector<Layer> layers_;
  // Column slices of row-parallel weights (attn_output, ffn_down), copied at load time
  // because a row's blocks are contiguous; the Layer matrices point into them.
  std::vector<std::vector<uint8_t>> sliced_;
  std::vector<std::unique_ptr<kernels::PackedWeights>> packed_;  // see pack_weights
  struct StepBuffers {
    std::vector<float> h, xn, q, k, v, attn, proj, gate, up;
    std::vector<float> attn_exact, adapter_scratch;  // attn_observer, adapters
    std::vector<uint8_t> reads_encoded;
    MoeFfnScratch moe;
    MoeAllToAllScratch moe_a2a;
    std::vector<uint8_t> moe_sensitive;  // one layer's experts at their highest level
    moe::Routing routing;
    std::vector<float> promote;               // [n_layers][rows], kv_promote scores
    std::vector<float> all_k, all_v, gather;  // kv_observer_all_heads
    // kv_promote "attention", per input: mass [n_layers][span] and lse [rows][n_heads]
    std::vector<std::vector<float>> mass, lse;
  };
  // Adds the attention correction and collects what attn_observer sees, for one layer.
  absl::Status CorrectAndObserve(std::span<const StepInput> inputs, int64_t layer,
                                 const std::vector<int32_t>& positions,
                                 const std::vector<int64_t>& input_rows);
  StepBuffers buffers_;  // Step's activations, reused
  std::vector<float> output_norm_;
  kernels::WeightMatrix embedding_, lm_head_;
  moe::RouterConfig router_;  // MoE models
  absl::Status SetUpExpertPrecision();
  absl::Status SetExpertLevel(int64_t layer, int64_t expert, int level);
  std::unique_ptr<ExpertStore> expert_store_;
  std::unique_ptr<moe::ExpertPrecisionPolicy> expert_policy_;
  std::vector<int> expert_levels_;  // [n_layers * n_experts]
  struct Sequence {
    SequenceKv kv;
    int cache = 0;      // index into kv_
    SequenceKv shadow;  // in shadow_kv_, when attn_observer is set
    // kv_promote: per layer, the priorities of positions [promote_base, length) whose block
    // is not full yet.
    std::vector<std::vector<float>> promote_pending;
    int64_t promote_base = 0;
    // kv_promote "snapkv" until the prompt ends: per layer the q rows ([w][q_dim], RoPE
    // applied) of the last w <= snapkv_window prompt tokens, at snap_positions.
    bool snap_pending = false;
    std::vector<std::vector<float>> snap_q;
    std::vector<int32_t> snap_positions;
  };
  enum class Promote { kNone, kKeyNorm, kAttention, kRouterEntropy, kSnapKv };
  // kv_promote "snapkv": promotes the rows of seq's full blocks by their SnapKV scores and
  // stops retaining its rows (the prompt has ended).
  absl::Status SnapPromote(Sequence& seq);
  // Keeps the last snapkv_window q rows of layer `layer` of each input whose prompt is still
  // going on (q: the step's rows, [rows][q_dim]).
  void KeepSnapQueries(std::span<const StepInput> inputs, int64_t layer,
                       const std::vector<float>& q, const std::vector<int32_t>& positions,
                       int64_t q_dim);
  Promote promote_ = Promote::kNone;
  // Offers the blocks `inputs` filled in this step to the promoted-row slots; `scores` is
  // [n_layers][step rows], lengths_before each input's sequence length before the step.
  void PromoteFilledBlocks(std::span<const StepInput> inputs,
                           const std::vector<int64_t>& lengths_before);
  std::unique_ptr<KvCache> shadow_kv_;  // exact cache for attn_observer
  absl::flat_hash_map<SequenceId, Sequence> sequences_;
  SequenceId next_seq_ = 1;
  StepTimings last_step_;
  int64_t comm_ns_total_ = 0;
  int64_t moe_bytes_sent_total_ = 0;
};

}  // namespace quantkv
