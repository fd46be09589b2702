// A Communicator over MPI_COMM_WORLD (a private duplicate of it). MPI is initialized on the
// first Create (MPI_THREAD_SERIALIZED: one thread at a time communicates — the engine's
// stepping thread, which in a server is not the main thread; the engine's pool threads never
// do) and finalized at exit. Errors return as absl::Status: the
// communicator sets MPI_ERRORS_RETURN instead of MPI's default abort-on-error.
//
// Failure: every collective is bounded in time. Each one is started non-blocking and polled
// until it completes or the timeout passes; then the waiting rank prints one line to stderr
// (its rank, the collective, the seconds waited, that another rank may have died or hung) and
// MPI_Aborts the whole job with kCommTimeoutExitCode, so no rank waits forever for a peer that
// is stopped (SIGSTOP), deadlocked or gone. A rank that dies is normally noticed first by
// mpirun, which then ends the job (Open MPI's default); the timeout is for what the launcher
// cannot see. The timeout must exceed the longest legitimate wait between ranks (start-up skew,
// a rank behind by a long prefill), which the 30 s default does for the models here.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "runtime/comm/communicator.h"

namespace quantkv {

// Seconds a collective may wait when neither the options nor QUANTKV_COMM_TIMEOUT_S say.
inline constexpr double kDefaultCommTimeoutS = 30;
// mpirun's exit status after a collective timed out (MPI_Abort's code): apart from the
// commands' 1 (failed) and 2 (usage) so scripts can tell a hung peer from an ordinary error.
inline constexpr int kCommTimeoutExitCode = 3;
// See MpiCommunicatorOptions::reduce_scatter_min_elements. Measured here (Open MPI 4.1,
// shared memory, 2 and 3 ranks on 2 cores; median of 300 calls): at 16384 values the
// reduce-scatter form is as fast or faster (2 ranks 22-29 vs 36-41 us, 3 ranks 54-99 vs
// 60-114 us) and it wins from there on (294912 values, a 512-token prefill of SmolLM2: 382
// vs 437 us at 2 ranks, 1.03 vs 1.63 ms at 3); below it its second collective's latency
// costs more than the bytes it saves (576 values, one decode row: 4.8 vs 2.8 us at 2 ranks).
inline constexpr int64_t kDefaultReduceScatterMinElements = 16384;

struct MpiCommunicatorOptions {
  // Seconds one collective may wait for the other ranks before the job is aborted; 0 waits
  // forever (the old blocking behaviour, for debuggers that stop a rank). Negative: from
  // QUANTKV_COMM_TIMEOUT_S, else kDefaultCommTimeoutS.
  double timeout_s = -1;
  // AllReduceSum of at least this many values runs as a reduce-scatter plus an all-gather
  // (the same bits; fewer bytes from 3 ranks on), smaller ones as one all-gather of the
  // partial sums (one collective's latency). Negative: never.
  int64_t reduce_scatter_min_elements = kDefaultReduceScatterMinElements;
};

// QUANTKV_COMM_TIMEOUT_S: unset or empty gives kDefaultCommTimeoutS, a finite number >= 0
// gives itself (0: no timeout), anything else is an InvalidArgument error naming the value.
absl::StatusOr<double> CommTimeoutFromEnv();

absl::StatusOr<std::unique_ptr<Communicator>> CreateMpiCommunicator(
    const MpiCommunicatorOptions& options = {});

}  // namespace quantkv
