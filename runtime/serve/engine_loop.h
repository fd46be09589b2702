// The serving engine loop: one thread owns the Engine (one KvCache, one KV preset) and a
// Scheduler whose single pool mirrors that cache's block allocator. Requests arrive from
// any thread through Submit(); each iteration the loop admits them, asks the scheduler for a
// plan, runs every plan item (prefill chunks and decodes together) as one Engine::Step,
// samples each request with its own Sampler, detokenizes incrementally, applies the stop
// conditions and pushes the output to the request's RequestStream, then commits the plan.
//
// Preemption is by recompute: the engine sequence is released and, on readmission, prompt +
// generated ids are prefilled again. With the engine's per-row matmul path (gemm_min_rows
// out of reach) a recomputed or batched row is bit-identical to a decoded one, so greedy
// output does not depend on what else runs.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "runtime/engine/engine.h"
#include "runtime/engine/sampler.h"
#include "runtime/serve/scheduler.h"
#include "runtime/serve/step_executor.h"
#include "runtime/tokenizer/tokenizer.h"

namespace quantkv {

class ServingMetrics;

enum class FinishReason { kStop, kLength, kAbort };

struct TopLogprob {
  int32_t token_id = 0;
  float logprob = 0.0f;
};

struct TokenLogprobs {
  int32_t token_id = 0;
  float logprob = 0.0f;
  std::vector<TopLogprob> top;
};

// One request as the loop runs it; token ids are final (templates already applied).
struct GenerationParams {
  std::string request_id;  // empty: the loop assigns one
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int64_t max_tokens = 16;
  std::vector<std::string> stop;        // stop strings (the match is not emitted)
  std::vector<int32_t> stop_token_ids;  // besides the vocabulary's end-of-turn tokens
  bool ignore_eos = false;
  int32_t logprobs = 0;  // top n per token; 0: none
  int priority = 0;
  // Teacher-forced scoring of `prompt` instead of generation: the final event carries the
  // summed log-likelihood of every token after the first.
  bool score = false;
  // Which of the loop's KV presets (caches) holds the request: an index into
  // EngineLoop::kv_presets(); see KvPresetIndex.
  int kv_cache = 0;
};

struct GenerationFinal {
  FinishReason reason = FinishReason::kStop;
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  double ttft_ms = 0;
  double tokens_per_s = 0;
  double kv_bits_per_element = 0;
  int64_t preemptions = 0;
  double total_logprob = 0;   // score requests
  int64_t scored_tokens = 0;  // score requests
};

struct StreamEvent {
  enum class Kind { kChunk, kFinal, kError };
  Kind kind = Kind::kChunk;
  std::string text;  // kChunk: valid UTF-8
  std::vector<int32_t> token_ids;
  std::vector<TokenLogprobs> logprobs;
  GenerationFinal final;  // kFinal
  absl::Status error;     // kError
};

// One request's output, produced by the loop thread and consumed by one reader. Ends with
// exactly one kFinal or kError event: pushes after it are dropped (EngineLoop::FailAllNow
// may end a stream from another thread while the loop thread still works on it).
class RequestStream {
 public:
  explicit RequestStream(std::string request_id) : request_id_(std::move(request_id)) {}
  const std::string& request_id() const { return request_id_; }

  // Events ready now, waiting up to `timeout` for the first one; empty on timeout.
  std::vector<StreamEvent> Wait(absl::Duration timeout);

  // Producer side (the loop).
  void Push(StreamEvent event);

 private:
  std::string request_id_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<StreamEvent> events_;
  bool ended_ = false;  // a kFinal or kError was pushed
};

struct EngineLoopConfig {
  int64_t max_running = 16;
  int64_t max_queued = 256;
  // Tokens per engine step, prefill and decode together; the engine's max_chunk_tokens must
  // be at least this (a prefill chunk is one StepInput).
  int64_t max_step_tokens = 256;
  // Names of the engine's KV caches, for ModelInfo, Stats and per-request choice:
  // kv_preset is cache 0 (the default), more_kv_presets caches 1.. (the engine's
  // more_kv_specs, in order).
  std::string kv_preset;
  std::vector<std::string> more_kv_presets = {};
  // Not owned; must outlive the loop. The loop thread records request latencies, token
  // counts and its queue and KV state into it; null: no metrics.
  ServingMetrics* metrics = nullptr;
};

struct EngineLoopStats {
  SchedulerStats scheduler;  // one pool per KV preset, in kv_presets() order
  int64_t generated_tokens = 0;
  double generated_tokens_per_s = 0;         // over the last few seconds
  double kv_bytes_per_token = 0;             // the default preset's, at the full context
  std::vector<double> pool_bytes_per_token;  // per preset, at the full context
  // MoE with elastic expert precision (EngineConfig::expert_levels), else empty.
  struct Expert {
    int layer = 0, expert = 0;
    double load = 0, mean_weight = 0;
    std::string precision;
    int64_t bytes = 0, changes = 0;
  };
  std::vector<Expert> experts;
  int64_t expert_bytes_active = 0, expert_budget_bytes = 0, expert_changes = 0;
  // Elastic precision: bytes of KV blocks freed by requantization (rank 0's share of the
  // heads; the count is scheduler.requantized_blocks).
  int64_t kv_requantized_bytes_freed = 0;
  // Cumulative step times per rank (one entry without tensor parallelism).
  std::vector<RankStepTotals> ranks;
};

class EngineLoop {
 public:
  // Takes the engine (or the group of tensor-parallel engines, step_executor.h); `tokenizer`
  // must outlive the loop (it is only read, and is safe to share with other threads).
  // Starts the loop thread.
  static absl::StatusOr<std::unique_ptr<EngineLoop>> Create(std::unique_ptr<Engine> engine,
                                                            const Tokenizer* tokenizer,
                                                            const EngineLoopConfig& config);
  static absl::StatusOr<std::unique_ptr<EngineLoop>> Create(std::unique_ptr<StepExecutor> executor,
                                                            const Tokenizer* tokenizer,
                                                            const EngineLoopConfig& config);
  ~EngineLoop();  // Shutdown()
  EngineLoop(const EngineLoop&) = delete;
  EngineLoop& operator=(const EngineLoop&) = delete;

  // Queues a request. INVALID_ARGUMENT naming the field (empty prompt, prompt or
  // max_tokens beyond the context or the KV pool, duplicate request_id, ...),
  // RESOURCE_EXHAUSTED when max_queued requests wait, UNAVAILABLE after Shutdown.
  absl::StatusOr<std::shared_ptr<RequestStream>> Submit(GenerationParams params);

  // Ends a live request now (its stream gets a kAbort final) and frees its KV blocks.
  // False when no live request has the id.
  bool Abort(const std::string& request_id);

  // Refuses new requests, aborts every live one, joins the loop thread and shuts the
  // executor down (other tensor-parallel ranks stop serving). Idempotent.
  void Shutdown();

  // For a stop that cannot wait for the loop thread (a signal while a tensor-parallel step
  // may be stuck in a collective with a dead rank, before the launcher kills this process):
  // refuses new requests and ends every queued and running request's stream with `error`
  // at once, from the calling thread. The loop's own later events for them are dropped.
  // Shutdown() is still needed to stop the loop.
  void FailAllNow(const absl::Status& error);
  // The executor's ProbeWorkers: whether every other rank answers within `timeout`.
  absl::Status ProbeRanks(absl::Duration timeout) { return executor_->ProbeWorkers(timeout); }

  EngineLoopStats Stats() const;

  // Immutable after Create; safe from any thread.
  const ModelConfig& model_config() const { return model_config_; }
  const EngineLoopConfig& config() const { return config_; }
  // The default preset's cache geometry.
  int64_t block_tokens() const { return block_tokens_; }
  int64_t capacity_tokens() const { return capacity_tokens_; }
  int32_t n_blocks() const { return n_blocks_; }
  // Every preset's name (cache i of the engine) and token capacity.
  const std::vector<std::string>& kv_presets() const { return kv_presets_; }
  int64_t capacity_tokens(int kv_cache) const;
  // The cache index of a preset name; an empty name is the default (0). NOT_FOUND, listing
  // the served presets, for another name.
  absl::StatusOr<int> KvPresetIndex(const std::string& name) const;
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  // Ranks every step runs on (tensor parallelism); 1 for one process.
  int tp_degree() const { return tp_degree_; }

 private:
  struct Request;
  struct Pending {
    uint64_t id;
    GenerationParams params;
    std::shared_ptr<RequestStream> stream;
    int64_t submit_ns;
  };

  EngineLoop(std::unique_ptr<StepExecutor> executor, const Tokenizer* tokenizer,
             const EngineLoopConfig& config, std::unique_ptr<Scheduler> scheduler);
  void Run();
  // One Schedule/Step/Commit round; false when the plan had no items.
  bool RunStep();
  void Admit(Pending p);
  void AbortLive(uint64_t id);
  // Sends the final event, frees the engine sequence and forgets the request.
  void Finish(Request& r, FinishReason reason);
  void Fail(Request& r, const absl::Status& status);
  void ReleaseEngineSequence(Request& r);
  // Samples the next token of a generating request from its logits row; true when the
  // request is finished.
  bool SampleNext(Request& r, std::span<float> row);
  void PublishStats();

  std::unique_ptr<StepExecutor> executor_;
  const Engine& engine() const { return executor_->engine(); }
  const Tokenizer* tokenizer_;
  EngineLoopConfig config_;
  ModelConfig model_config_;
  int64_t block_tokens_ = 0;
  int64_t capacity_tokens_ = 0;
  int32_t n_blocks_ = 0;
  int tp_degree_ = 1;
  std::vector<std::string> kv_presets_;
  std::vector<float> logits_;  // RunStep's, on the loop thread

  // Loop-thread state.
  std::unique_ptr<Scheduler> scheduler_;
  absl::flat_hash_map<uint64_t, std::unique_ptr<Request>> requests_;
  std::deque<std::pair<int64_t, int64_t>> recent_tokens_;  // (time ns, tokens) of recent steps
  int64_t generated_total_ = 0;

  // Shared with submitting threads.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::vector<Pending> pending_;
  std::vector<uint64_t> aborts_;
  struct Live {
    uint64_t id;                            // internal id
    std::shared_ptr<RequestStream> stream;  // for FailAllNow
  };
  absl::flat_hash_map<std::string, Live> live_ids_;  // by request_id
  int64_t waiting_ = 0;  // queued in the scheduler, as of the last iteration
  uint64_t next_id_ = 1;
  EngineLoopStats stats_;

  std::thread thread_;
};

}  // namespace quantkv
