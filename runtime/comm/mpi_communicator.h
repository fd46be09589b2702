// A Communicator over MPI_COMM_WORLD (a private duplicate of it). MPI is initialized on the
// first Create (MPI_THREAD_FUNNELED: only the calling thread communicates; the engine's
// worker threads never do) and finalized at exit. Errors return as absl::Status: the
// communicator sets MPI_ERRORS_RETURN instead of MPI's default abort-on-error.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "runtime/comm/communicator.h"

namespace quantkv {

absl::StatusOr<std::unique_ptr<Communicator>> CreateMpiCommunicator();

}  // namespace quantkv
