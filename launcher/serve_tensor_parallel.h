// `quantkv serve --tp N` under `mpirun -np N`: rank 0 is the coordinator (gRPC front end,
// scheduler, its own engine shard) and drives ranks 1..N-1 as Workers
// (proto/quantkv/v1/worker.proto). Both sides make the same start-up collectives in the
// same order (runtime/serve/worker_rendezvous.h).
#pragma once

#include <signal.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "launcher/model_session.h"
#include "launcher/subcommand.h"
#include "runtime/serve/step_executor.h"

namespace quantkv::launcher {

// Rank 0: takes the session's engine and returns the executor that runs every step on all
// ranks. An error here is rank 0's alone (the workers wait): report it with
// ReportSessionFailure.
absl::StatusOr<std::unique_ptr<StepExecutor>> ConnectServeWorkers(ModelSession& session,
                                                                  const std::string& worker_listen);

// Ranks 1..N-1: serves this rank's shard until rank 0 calls Shutdown, or until 10 s after a
// stop signal (mpirun forwards SIGTERM to every rank; rank 0 then drains and ends the job).
int RunServeWorker(ModelSession& session, const std::string& worker_listen,
                   const sigset_t& stop_signals, CommandContext& ctx);

}  // namespace quantkv::launcher
