// Iteration-level continuous batching (vLLM/TGI-style) as pure bookkeeping: no model, no
// tensors. Each engine step the scheduler decides which sequences run and how many tokens
// each feeds, under a token budget, and it owns the KV block accounting of every pool so
// that the engine's KvCache::Reserve never fails once the scheduler said yes. Workers hold
// only batch state; they ask Schedule() for a plan, run it, and report back with Commit().
//
// Accounting: a sequence that has (or is about to have) n tokens written holds
// ceil(n / block_tokens) blocks of its pool. KvCache::Reserve needs only the full blocks
// (floor), so the count is conservative by at most one block per sequence. A sequence's
// whole prefill is reserved when it is admitted, so chunked prefill never waits for blocks.
//
// Preemption is by recompute: a preempted sequence loses all its blocks, goes back to the
// front of its priority's queue and, when readmitted, prefills prompt + tokens generated
// so far (the engine keeps the token ids; the scheduler only counts them).
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace quantkv {

// One KV cache (one preset) whose blocks the scheduler hands out.
struct KvPoolConfig {
  std::string name;          // the KV preset; unique among pools
  int32_t n_blocks = 0;      // the cache's BlockAllocator::num_blocks()
  int64_t block_tokens = 0;  // tokens of every layer in one block
  // Elastic precision (KvCache::Requantize): when decode runs out of blocks, the oldest
  // pairs of full blocks of running sequences are re-encoded to the pool's floor codecs,
  // one block freed per pair, before anything is preempted.
  bool elastic = false;
};

struct SchedulerConfig {
  std::vector<KvPoolConfig> pools;
  // Tokens fed in one engine step, decode and prefill together. Must be >= max_running so
  // that every running sequence can always decode (decodes are never deferred).
  int64_t max_step_tokens = 512;
  int64_t max_running = 64;    // sequences holding KV at once
  int64_t max_queued = 1024;   // Submit refuses new requests beyond this many waiting
  int64_t max_context = 4096;  // prompt_tokens + max_new_tokens of one request
};

struct RequestSpec {
  uint64_t id = 0;  // unique among live (queued or running) requests
  int pool = 0;     // index into SchedulerConfig::pools (the request's KV preset)
  int64_t prompt_tokens = 0;
  int64_t max_new_tokens = 0;
  int priority = 0;  // higher is served first; FCFS within a priority
};

// One sequence's share of a step: feed tokens [start_pos, start_pos + n_tokens). The
// engine reserves the cache to start_pos + n_tokens before writing.
struct SeqWork {
  uint64_t id = 0;
  int pool = 0;
  int64_t start_pos = 0;
  int64_t n_tokens = 0;
  bool prefill = false;
  bool samples = false;  // produces a token: a decode, or the last chunk of a prefill
};

// Re-encode `pairs` more pairs of a sequence's oldest full blocks (KvCache::Requantize).
struct SeqRequantize {
  uint64_t id = 0;
  int64_t pairs = 0;
};

struct StepPlan {
  uint64_t step = 0;  // identifies the plan to Commit
  // Done by the engine before the items run; the plan already counts their blocks free.
  std::vector<SeqRequantize> requantize;
  // Decodes first (admission order), then prefill chunks; every id appears at most once.
  std::vector<SeqWork> items;
  // Sequences preempted while building this plan: the engine frees their cache state.
  // They hold no blocks any more and have no item in this plan.
  std::vector<uint64_t> preempted;

  int64_t total_tokens() const;
};

// What the engine reports for one sampling item of a plan.
struct SeqResult {
  uint64_t id = 0;
  bool finished = false;  // stop token or stop string; max_new_tokens is detected here too
};

enum class SeqStatus { kQueued, kRunning };

// A live request. Finished and cancelled requests are forgotten (Find returns nullptr).
struct SeqState {
  RequestSpec spec;
  SeqStatus status = SeqStatus::kQueued;
  // Tokens the current prefill covers: the prompt, or prompt + generated after preemption.
  int64_t prefill_tokens = 0;
  int64_t computed_tokens = 0;   // tokens whose KV is written (committed)
  int64_t generated_tokens = 0;  // tokens sampled so far (survives preemption)
  int64_t blocks = 0;            // blocks of its pool held now
  int64_t floor_blocks = 0;      // of its logical blocks, requantized (in pairs, one held each)
  int64_t preemptions = 0;
  uint64_t admit_order = 0;  // larger is newer; reassigned on every admission

  bool prefill_done() const {
    return status == SeqStatus::kRunning && computed_tokens >= prefill_tokens;
  }
};

struct PoolStats {
  std::string name;
  int64_t n_blocks = 0;
  int64_t blocks_used = 0;
  int64_t blocks_free = 0;
};

struct SchedulerStats {
  int64_t running = 0;
  int64_t queued = 0;
  std::vector<PoolStats> pools;
  int64_t preemptions = 0;
  int64_t finished = 0;
  int64_t cancelled = 0;
  int64_t requantized_blocks = 0;  // two per block freed
};

class Scheduler {
 public:
  // INVALID_ARGUMENT naming the field for a bad config.
  static absl::StatusOr<std::unique_ptr<Scheduler>> Create(const SchedulerConfig& config);

  // Queues a request. INVALID_ARGUMENT (naming the field) for an unknown pool, a
  // non-positive prompt_tokens or max_new_tokens, a request over max_context, one that
  // could never fit in its pool even alone, or a duplicate id; RESOURCE_EXHAUSTED when
  // max_queued requests are already waiting.
  absl::Status Submit(const RequestSpec& spec);

  // Builds the next step. Blocks for the plan are taken at once. A plan with items is
  // outstanding until committed; calling Schedule again before that returns the same plan
  // (less sequences cancelled since). A plan without items needs no Commit.
  StepPlan Schedule();

  // Applies the outstanding plan: positions advance, and every sampling item must have
  // exactly one result (items of sequences cancelled since Schedule may have one or not).
  // Sequences that finished, or reached max_new_tokens, release their blocks at once.
  // INVALID_ARGUMENT, with the state unchanged, for a plan that is not the outstanding
  // one or results that do not match its sampling items.
  absl::Status Commit(const StepPlan& plan, absl::Span<const SeqResult> results);

  // Removes a queued or running request and frees its blocks; NOT_FOUND otherwise. A
  // request cancelled while in the outstanding plan is skipped by its Commit.
  absl::Status Cancel(uint64_t id);

  // The live request, or nullptr once it finished or was cancelled (or never existed).
  // The pointer is valid until the next call of a non-const method.
  const SeqState* Find(uint64_t id) const;

  SchedulerStats Stats() const;
  const SchedulerConfig& config() const { return config_; }
  // Blocks of `pool` that hold n_tokens.
  int64_t BlocksFor(int pool, int64_t n_tokens) const;
  bool has_outstanding_plan() const { return outstanding_.has_value(); }
  // Nothing queued or running.
  bool idle() const { return running_.empty() && queued_ == 0; }

 private:
  explicit Scheduler(const SchedulerConfig& config);

  void ScheduleDecodes(StepPlan& plan, int64_t& budget);
  void ScheduleContinuedPrefills(StepPlan& plan, int64_t& budget);
  void Admit(StepPlan& plan, int64_t& budget);
  void Preempt(uint64_t id, StepPlan& plan);
  // Requantizes one pair of blocks of the oldest running sequence of `pool` that has one
  // (elastic pools); false when none has.
  bool RequantizeOnePair(int pool, StepPlan& plan);
  // Blocks `s` holds once it has n_tokens (its requantized pairs count one block each).
  int64_t HeldFor(const SeqState& s, int64_t n_tokens) const;
  // Frees the blocks of a running sequence and takes it off the running list.
  void Release(SeqState& s);
  void RemoveQueued(const SeqState& s);

  SchedulerConfig config_;
  std::vector<int64_t> free_blocks_;  // per pool
  absl::flat_hash_map<uint64_t, SeqState> seqs_;
  std::vector<uint64_t> running_;  // in admission order: the back is the newest
  std::map<int, std::deque<uint64_t>, std::greater<int>> queue_;  // no empty deques
  int64_t queued_ = 0;
  std::optional<StepPlan> outstanding_;
  absl::flat_hash_set<uint64_t> cancelled_in_flight_;  // cancelled while outstanding
  uint64_t next_step_ = 1;
  uint64_t next_admit_ = 1;
  int64_t preemptions_ = 0;
  int64_t requantized_blocks_ = 0;
  int64_t finished_ = 0;
  int64_t cancelled_ = 0;
};

}  // namespace quantkv
