// What the serving engine loop drives: the engine of this process and, under tensor
// parallelism, the other ranks' engines, which must run the same sequence of steps. The
// loop reads configuration, cache geometry and statistics from engine() (rank 0's).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "runtime/engine/engine.h"

namespace quantkv {

// Cumulative step times of one rank of the group, for Stats.
struct RankStepTotals {
  int rank = 0;
  int64_t steps = 0;
  int64_t forward_ns = 0;  // the engine's Step, collectives included
  int64_t comm_ns = 0;     // of which in collectives
  int64_t total_ns = 0;    // from the coordinator's view: the step's round trip to that rank
};

class StepExecutor {
 public:
  virtual ~StepExecutor() = default;

  virtual const Engine& engine() const = 0;
  // Ranks that run every step (1 without tensor parallelism).
  virtual int world_size() const = 0;

  virtual absl::StatusOr<SequenceId> NewSequenceIn(int kv_cache) = 0;
  virtual absl::Status Release(SequenceId seq) = 0;
  // Engine::RequantizeOldest on every rank, before the next Step; an error when fewer
  // pairs could be re-encoded (the scheduler's accounting and the cache disagree).
  virtual absl::Status RequantizeOldest(SequenceId seq, int64_t pairs) = 0;
  // Engine::Step's contract; logits are rank 0's.
  virtual absl::Status Step(std::span<const StepInput> inputs, std::vector<float>* logits) = 0;

  // One entry per rank, rank order.
  virtual std::vector<RankStepTotals> StepTotals() const = 0;
  // The loop's last call: lets other ranks stop serving. Idempotent.
  virtual void Shutdown() {}
  // Whether every other rank's process answers now, within `timeout` in all: UNAVAILABLE
  // naming the first that does not (rank, address, the call's error). Safe from any thread
  // while a Step runs, so that a signal handler can learn why a step may never return (a
  // peer died mid-collective). OK without other ranks.
  virtual absl::Status ProbeWorkers(absl::Duration timeout) {
    (void)timeout;
    return absl::OkStatus();
  }
};

// One process, one engine.
class LocalStepExecutor final : public StepExecutor {
 public:
  explicit LocalStepExecutor(std::unique_ptr<Engine> engine) : engine_(std::move(engine)) {}

  const Engine& engine() const override { return *engine_; }
  int world_size() const override { return 1; }
  absl::StatusOr<SequenceId> NewSequenceIn(int kv_cache) override {
    return engine_->NewSequenceIn(kv_cache);
  }
  absl::Status Release(SequenceId seq) override { return engine_->Release(seq); }
  absl::Status RequantizeOldest(SequenceId seq, int64_t pairs) override {
    absl::StatusOr<int64_t> done = engine_->RequantizeOldest(seq, pairs);
    if (!done.ok()) return done.status();
    if (*done != pairs) {
      return absl::InternalError(absl::StrFormat(
          "engine: sequence %d had %d block pairs to requantize, the scheduler asked for %d", seq,
          *done, pairs));
    }
    return absl::OkStatus();
  }
  absl::Status Step(std::span<const StepInput> inputs, std::vector<float>* logits) override {
    absl::Status s = engine_->Step(inputs, logits);
    if (s.ok()) {
      ++totals_.steps;
      totals_.forward_ns += engine_->last_step().forward_ns;
      totals_.total_ns += engine_->last_step().forward_ns;
    }
    return s;
  }
  std::vector<RankStepTotals> StepTotals() const override { return {totals_}; }

 private:
  std::unique_ptr<Engine> engine_;
  RankStepTotals totals_;
};

}  // namespace quantkv
