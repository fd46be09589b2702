// Collectives between the ranks of a tensor-parallel group. The engine only needs a sum
// all-reduce; start-up checks and tests also gather and broadcast bytes. LocalCommunicator
// is the one-rank group (every collective is the identity); MpiCommunicator
// (mpi_communicator.h) spans the processes mpirun started. Every call is collective: all
// ranks must make the same calls in the same order.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace quantkv {

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // "local" or "mpi", for messages.
  virtual std::string name() const = 0;

  // data[0..n) becomes the element-wise sum over ranks, bit-identical on every rank (ranks
  // sample from these values, so they must agree exactly, not just within rounding).
  virtual absl::Status AllReduceSum(float* data, int64_t n) = 0;
  // The same, for the engine's sum after one of `layer`'s row-parallel projections: a
  // compressing group (compressed_communicator.h) may keep some layers exact.
  virtual absl::Status AllReduceSumForLayer(float* data, int64_t n, int64_t layer) {
    (void)layer;
    return AllReduceSum(data, n);
  }
  // Each rank sends `bytes` bytes; `recv` receives size() * bytes, rank r's at r * bytes.
  virtual absl::Status AllGather(const void* send, int64_t bytes, void* recv) = 0;
  // Rank `root`'s data[0..bytes) is copied to every rank's `data`.
  virtual absl::Status Broadcast(void* data, int64_t bytes, int root) = 0;
  virtual absl::Status Barrier() = 0;
  // Ends every rank of the group at once, for an error on one rank while the others may be
  // waiting in a collective (a peer that dies or hangs is detected by the MPI
  // communicator's per-collective timeout instead). Does not return.
  [[noreturn]] virtual void Abort(int exit_code) = 0;
};

// The group of one: collectives copy or do nothing.
class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string name() const override { return "local"; }
  absl::Status AllReduceSum(float* data, int64_t n) override;
  absl::Status AllGather(const void* send, int64_t bytes, void* recv) override;
  absl::Status Broadcast(void* data, int64_t bytes, int root) override;
  absl::Status Barrier() override { return absl::OkStatus(); }
  [[noreturn]] void Abort(int exit_code) override;
};

// The number of processes the launcher started, from its environment (Open MPI's
// OMPI_COMM_WORLD_SIZE; PMI_SIZE / PMIX_SIZE for MPICH / Slurm-style launchers); 0 when
// this process was not started by an MPI launcher.
int LauncherWorldSize();
// This process's rank among them, from the same environment (0 when not launched so).
int LauncherRank();

// An MpiCommunicator over all processes when started by mpirun (LauncherWorldSize() > 0),
// else a LocalCommunicator.
absl::StatusOr<std::unique_ptr<Communicator>> CreateCommunicator();

// data[i] = sum over ranks r = 0..size-1, in that order, of gathered[r * n + i]: the sum
// all-reduce of communicators built on an all-gather, the same bits on every rank.
void SumGatheredInRankOrder(const float* gathered, int64_t n, int size, float* data);

// Collective: every rank passes its own status and all get the same result, the first
// failing rank's error prefixed with "rank R: " (ok when all are ok). Lets one rank's failure
// (a missing file, a bad flag) stop every rank instead of leaving them in a collective.
absl::Status AgreeOnStatus(Communicator& comm, const absl::Status& local);

}  // namespace quantkv
