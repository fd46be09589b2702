// Collectives between the ranks of a tensor-parallel group. The engine needs a sum
// all-reduce (the row-parallel layers), and for expert parallelism with all-to-all dispatch
// an all-to-all of bytes and an all-gather; start-up checks and tests also gather and
// broadcast bytes. LocalCommunicator is the one-rank group (every collective is the
// identity); MpiCommunicator (mpi_communicator.h) spans the processes mpirun started,
// TcpCommunicator (tcp_communicator.h) ranks started without it. Every call is collective:
// all ranks must make the same calls in the same order. After a collective fails the group
// is unusable (ranks may disagree on how far it got): callers end the job.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace quantkv {

// The elements [begin, end) of rank r's chunk when n values are split over `ranks` ranks in
// contiguous chunks, as evenly as possible: the first n % ranks chunks hold n / ranks + 1
// values, the others n / ranks (so chunks of n < ranks values are 1 or empty). The split of
// ReduceScatterSum, and of the rows of a step among the ranks in the MoE all-to-all dispatch.
struct ChunkRange {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};
ChunkRange ReduceScatterChunk(int64_t n, int ranks, int r);

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
  // Reduce-scatter: send[0..n) holds this rank's partial values (n the same on every rank);
  // recv[0..c) receives this rank's chunk c = ReduceScatterChunk(n, size(), rank()) summed
  // over the ranks in rank order 0..size()-1, in fp32: the same bits as
  // SumGatheredInRankOrder gives for those elements (so an all-gather of the chunks
  // reproduces AllReduceSum exactly). recv may be send + chunk begin (in place) or a buffer
  // apart from send. Bandwidth-optimal where the transport allows: each rank receives only
  // the other ranks' parts of its own chunk. A negative n on any rank, or ranks passing
  // different n, give every rank INVALID_ARGUMENT naming the rank and its n (MPI and TCP
  // check collectively; the compressing wrapper relies on its wrapped group's checks and on
  // its payload headers, which fail to decode on a rank whose chunk size differs).
  virtual absl::Status ReduceScatterSum(const float* send, int64_t n, float* recv) = 0;
  // Each rank sends `bytes` bytes; `recv` receives size() * bytes, rank r's at r * bytes.
  virtual absl::Status AllGather(const void* send, int64_t bytes, void* recv) = 0;
  // All-to-all of byte buffers of any sizes (MoE token dispatch and combine): this rank sends
  // send_bytes[q] bytes to rank q (its own entry included), the pieces consecutive in `send`
  // in rank order; *recv receives (resized to fit) the piece every rank p sent to this one,
  // consecutive in rank order, and (*recv_bytes)[p] its size. The counts are exchanged inside
  // the call (an all-gather of every rank's send counts, then the data), so a receiver needs
  // no prior knowledge, and every rank checks every rank's counts before any data moves: a
  // count list that is not size() long or a negative count on any rank makes every rank
  // return INVALID_ARGUMENT (the bad rank naming the argument, the others that rank), not
  // a rank left waiting for data.
  virtual absl::Status AllToAllV(const void* send, std::span<const int64_t> send_bytes,
                                 std::vector<uint8_t>* recv, std::vector<int64_t>* recv_bytes) = 0;
  // Rank `root`'s data[0..bytes) is copied to every rank's `data`.
  virtual absl::Status Broadcast(void* data, int64_t bytes, int root) = 0;
  virtual absl::Status Barrier() = 0;
  // Bytes this rank has sent to other ranks over its life (payloads, as the algorithm here
  // moves them: an all-gather of b bytes counts (size() - 1) * b, an all-to-all the pieces
  // for other ranks, a star topology what actually goes over each socket). For
  // measurements such as the MoE dispatch's bytes per step; 0 on one rank.
  virtual int64_t bytes_sent() const { return 0; }
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
  absl::Status ReduceScatterSum(const float* send, int64_t n, float* recv) override;
  absl::Status AllGather(const void* send, int64_t bytes, void* recv) override;
  absl::Status AllToAllV(const void* send, std::span<const int64_t> send_bytes,
                         std::vector<uint8_t>* recv, std::vector<int64_t>* recv_bytes) override;
  absl::Status Broadcast(void* data, int64_t bytes, int root) override;
  absl::Status Barrier() override { return absl::OkStatus(); }
  [[noreturn]] void Abort(int exit_code) override;
};

// A process-wide callback run just before a communicator ends the whole job by itself (the
// MPI communicator's collective timeout), with the line it prints: a server sets it to tell
// its clients why, before the launcher kills the process. It runs on the thread that waited
// and must return within a fraction of a second. Null clears it.
void SetBeforeJobAbortHook(std::function<void(std::string_view reason)> hook);
// Runs the hook, if one is set (for Communicator implementations).
void RunBeforeJobAbortHook(std::string_view reason);

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

// For AllToAllV implementations: the collective exchange and check of the send counts.
// Every rank all-gathers every rank's send_bytes through comm.AllGather (a rank whose list
// is bad sends a marker instead), so that all ranks reach the same verdict: ok with
// (*matrix)[p * size + q] = bytes rank p sends to rank q, or the same INVALID_ARGUMENT on
// every rank. `max_rank_bytes` > 0 also refuses any rank's send or receive total above it
// (a transport's size limit), again on every rank alike.
absl::Status ExchangeAllToAllCounts(Communicator& comm, std::span<const int64_t> send_bytes,
                                    int64_t max_rank_bytes, std::vector<int64_t>* matrix);

// For ReduceScatterSum implementations: collective, every rank all-gathers every rank's n
// and all return the same INVALID_ARGUMENT when one is negative or above max_n, or the ranks
// disagree (naming the first rank that differs from rank 0 and both counts).
absl::Status CheckSameCount(Communicator& comm, int64_t n, int64_t max_n, const char* what);

// Collective: every rank passes its own status and all get the same result, the first
// failing rank's error prefixed with "rank R: " (ok when all are ok). Lets one rank's failure
// (a missing file, a bad flag) stop every rank instead of leaving them in a collective.
absl::Status AgreeOnStatus(Communicator& comm, const absl::Status& local);

}  // namespace quantkv
