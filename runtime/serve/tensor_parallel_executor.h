// The coordinator's side of `quantkv serve --tp N` (rank 0): its own engine shard plus the
// workers of ranks 1..N-1 (worker_server.h), driven over gRPC (proto/quantkv/v1/worker.proto).
// Each Step is sent to every worker before rank 0 runs its own part, so all ranks enter the
// step's collectives together; sequence creations and releases ride along with the next
// step. Rank 0's scheduler owns the block accounting: at Create every worker must show at
// least rank 0's blocks in each cache (ranks with fewer KV heads hold more).
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "runtime/serve/step_executor.h"

namespace quantkv {

struct TensorParallelExecutorConfig {
  std::vector<std::string> worker_addresses;  // HOST:PORT of ranks 1..N-1, in rank order
  std::string token;                          // the job's worker token
  absl::Duration connect_timeout = absl::Seconds(60);
  // A step's RPC deadline. The collectives' own timeout (QUANTKV_COMM_TIMEOUT_S) normally
  // ends a hung step first; this is the backstop.
  absl::Duration step_timeout = absl::Minutes(10);
  // How long a worker's reply may lag rank 0's own part of a step. By then the worker has
  // been through the step's collectives too, so only its short tail is left; a worker stopped
  // or hung in that window would otherwise hold the step until step_timeout. Past it the job
  // is ended as a collective timeout ends it: RunBeforeJobAbortHook (communicator.h) with the
  // reason, then the communicator's Abort(kCommTimeoutExitCode). Infinite: no limit.
  absl::Duration reply_timeout = absl::Seconds(30);
};

class TensorParallelExecutor final : public StepExecutor {
 public:
  // `engine` is rank 0's shard (its communicator spans the workers). Connects to every
  // worker and checks its rank, architecture and KV capacity; then clears its cache.
  static absl::StatusOr<std::unique_ptr<TensorParallelExecutor>> Create(
      std::unique_ptr<Engine> engine, const TensorParallelExecutorConfig& config);
  ~TensorParallelExecutor() override;  // Shutdown()

  const Engine& engine() const override { return *engine_; }
  int world_size() const override;
  absl::StatusOr<SequenceId> NewSequenceIn(int kv_cache) override;
  absl::Status Release(SequenceId seq) override;
  absl::Status RequantizeOldest(SequenceId seq, int64_t pairs) override;
  absl::Status Step(std::span<const StepInput> inputs, std::vector<float>* logits) override;
  std::vector<RankStepTotals> StepTotals() const override;
  // A Health call to each worker, all under one deadline `timeout` from now.
  absl::Status ProbeWorkers(absl::Duration timeout) override;
  // Tells every worker to stop serving (their processes then end). Idempotent.
  void Shutdown() override;

 private:
  struct Worker;
  TensorParallelExecutor() = default;

  std::unique_ptr<Engine> engine_;
  TensorParallelExecutorConfig config_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<std::pair<SequenceId, int>> pending_create_;  // (sequence, KV cache)
  std::vector<SequenceId> pending_release_;
  std::vector<std::pair<SequenceId, int64_t>> pending_requantize_;  // (sequence, pairs)
  uint64_t step_id_ = 0;
  RankStepTotals local_;
  // After a worker failed a step the ranks no longer agree: every later step fails.
  absl::Status broken_;
  bool shut_down_ = false;
  // Calls every worker's Health every few seconds, so that a worker can tell a live but idle
  // coordinator from a dead one (WorkerServer::last_call).
  void Heartbeat();
  // reply_timeout passed with worker w's reply missing: ends the job (does not return).
  [[noreturn]] void AbortJobForLateWorker(const Worker& w, int64_t local_end_ns);
  std::thread heartbeat_;
  std::mutex heartbeat_mu_;
  std::condition_variable heartbeat_cv_;
  bool heartbeat_stop_ = false;
};

}  // namespace quantkv
