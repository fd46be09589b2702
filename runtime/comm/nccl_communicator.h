// A Communicator over NCCL (one CUDA device per rank), for tensor-parallel ranks on GPUs.
// The header has no CUDA or NCCL types and no build flags: with QUANTKV_CUDA=OFF the same
// functions exist and CreateNcclCommunicator returns UNIMPLEMENTED, so callers (the
// launcher's --comm-backend nccl) need no #ifdef.
//
// Set-up is collective over a `bootstrap` group the ranks already share (MPI under mpirun, or
// TCP): every rank picks its device, rank 0 calls ncclGetUniqueId, the ranks agree that all of
// them succeeded (AgreeOnStatus: a rank without a GPU makes every rank return its error instead
// of leaving the others in ncclCommInitRank), the id goes to every rank by bootstrap.Broadcast,
// and each calls ncclCommInitRankConfig. Two ranks that would share one GPU are refused before
// NCCL sees them (NCCL does not support it).
//
// Data: the interface takes host pointers (today's engine runs on the CPU), so every collective
// copies its input to device scratch buffers (grown as needed, kept), runs NCCL on one stream
// and copies the result back before it returns. Collectives are synchronous: when one returns,
// nothing of it is left on the device.
//
// Numerics: AllReduceSum is ncclAllReduce. Every rank gets the same bits (NCCL reduces each
// element once and sends that result to every rank, for ring, tree and NVLS alike: the
// maintainers' word in NVIDIA/nccl#855), which is what the engine needs, but the order of the
// additions is NCCL's (it depends on the algorithm, the topology and the size), not the rank
// order 0..size-1 of the MPI and TCP communicators: the bits can differ from theirs and between
// machines. ReduceScatterSum keeps the interface's exact contract (the rank-ordered fp32 sum, as
// SumGatheredInRankOrder) by all-gathering the inputs and summing on the host, so it moves
// size() times the bytes of ncclReduceScatter.
//
// Failure: nothing waits forever. The NCCL communicator is non-blocking (no NCCL call blocks
// the host); after enqueueing, a collective polls the stream and ncclCommGetAsyncError until it
// completes, NCCL reports an error, or timeout_s passes. On a timeout or an error it calls
// ncclCommAbort, marks the communicator broken and returns DEADLINE_EXCEEDED or INTERNAL naming
// this rank, the collective and the seconds waited; every later call returns
// FAILED_PRECONDITION. As with MPI, the caller then ends the job (Abort).
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "runtime/comm/communicator.h"

namespace quantkv {

struct NcclCommunicatorOptions {
  // The CUDA device of this rank. -1: the node-local rank (OMPI_COMM_WORLD_LOCAL_RANK,
  // MPI_LOCALRANKID or SLURM_LOCALID, else the bootstrap rank) modulo the device count, so
  // that the ranks mpirun puts on one node take its GPUs in turn.
  int device = -1;
  // Seconds one collective (and the set-up) may wait for the other ranks; 0 waits forever.
  // Negative: from QUANTKV_COMM_TIMEOUT_S, else kDefaultCommTimeoutS (as
  // MpiCommunicatorOptions).
  double timeout_s = -1;
};

// Collective over `bootstrap` (every rank of it calls this with the same options): the NCCL
// group has its ranks and size. On failure every rank returns the same error. `bootstrap`
// must outlive the result, which uses it for Abort only.
absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(
    Communicator& bootstrap, const NcclCommunicatorOptions& options = {});
// The same, the result owning `bootstrap` (destroyed after the NCCL communicator).
absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(
    std::unique_ptr<Communicator> bootstrap, const NcclCommunicatorOptions& options = {});

// Whether this build has the NCCL communicator (built with CUDA and NCCL); says nothing about
// whether a GPU is present.
bool NcclAvailable();

}  // namespace quantkv
