// A Communicator over plain TCP, for clusters that start the ranks themselves (Slurm,
// Kubernetes, a shell loop) instead of mpirun: every rank is given its rank, the world size,
// the rendezvous address HOST:PORT (rank 0 listens there, the others connect) and a shared
// secret. Like torchrun's MASTER_ADDR; the gRPC control plane on top is the same as under
// mpirun.
//
// Topology: a star through rank 0. An all-gather sends every rank's bytes to rank 0, which
// returns the concatenation to all. The sum all-reduce of small vectors is that all-gather
// and a rank-ordered sum on every rank; larger ones send every rank's partials to rank 0,
// which adds them in rank order and returns the sum (either way all ranks, and an MPI group
// of the same size, get the same bits); the reduce-scatter returns each rank only its chunk of that
// sum. An all-to-all sends rank 0 each rank's pieces for the others, and rank 0 forwards
// each rank the pieces addressed to it. Broadcasts from rank r go through rank 0. Fine for a
// few CPU ranks; NCCL or MPI are the data planes for more. When rank 0 finds a collective
// malformed (a rank's size differs, a rank passed a bad argument or left), it sends every
// rank an error frame with the reason, so they fail at once instead of at the timeout.
//
// Security: a connecting rank must present the secret (compared in constant time) before it
// joins; anyone else is refused. Nothing is encrypted: run it on a private network.
//
// Failure: every receive is bounded (QUANTKV_COMM_TIMEOUT_S, as for MPI); a peer that exits
// closes its sockets, which the others see at once. Either way the rank prints what happened
// and returns an error, and Abort() ends this process (the others then see it close).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "runtime/comm/communicator.h"

namespace quantkv {

struct TcpCommunicatorOptions {
  int rank = 0;
  int world_size = 1;
  std::string rendezvous;  // HOST:PORT of rank 0 (it binds it; HOST may be 0.0.0.0)
  std::string secret;      // must not be empty; the same on every rank
  // Seconds a collective may wait for a peer; negative: QUANTKV_COMM_TIMEOUT_S or 30.
  double timeout_s = -1;
  // Seconds rank 0 waits for everyone to join, and the others keep retrying to connect.
  double join_timeout_s = 120;
};

absl::StatusOr<std::unique_ptr<Communicator>> CreateTcpCommunicator(
    const TcpCommunicatorOptions& options);

}  // namespace quantkv
