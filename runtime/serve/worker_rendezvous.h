// Start-up of a tensor-parallel server under mpirun, over the ranks' Communicator: rank 0
// makes the job's worker token and broadcasts it, every worker binds its Worker service and
// the addresses are all-gathered so rank 0 can dial them (DESIGN: "each worker's gRPC address
// is exchanged with an MPI all-gather at start-up"). All functions are collective.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/comm/communicator.h"

namespace quantkv {

// Rank 0's MakeWorkerToken(), on every rank.
absl::StatusOr<std::string> ShareWorkerToken(Communicator& comm);

// The host a worker listening on `listen_host` is reached at from other ranks: the host
// itself, or this machine's hostname for a wildcard (0.0.0.0, [::]).
std::string AdvertisedWorkerHost(const std::string& listen_host);

// INVALID_ARGUMENT on every rank when the ranks run on more than one machine (by hostname)
// and `listen_host` is a loopback address, which the coordinator could not reach.
absl::Status CheckWorkerHostReachable(Communicator& comm, const std::string& listen_host);

// Each rank passes its Worker address (rank 0: empty); every rank gets ranks 1..N-1's.
absl::StatusOr<std::vector<std::string>> GatherWorkerAddresses(Communicator& comm,
                                                               const std::string& mine);

}  // namespace quantkv
