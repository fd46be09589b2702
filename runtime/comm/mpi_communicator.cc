#include "runtime/comm/mpi_communicator.h"

#include <mpi.h>

#include <climits>
#include <cstdlib>
#include <vector>

#include "absl/strings/str_format.h"

namespace quantkv {
namespace {

absl::Status MpiStatus(int code, const char* what) {
  if (code == MPI_SUCCESS) return absl::OkStatus();
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) len = 0;
  return absl::InternalError(
      absl::StrFormat("MPI %s failed: %s", what, std::string(text, static_cast<size_t>(len))));
}

absl::Status CheckCount(int64_t n, const char* what) {
  if (n < 0 || n > INT_MAX) {
    return absl::InvalidArgumentError(
        absl::StrFormat("MPI %s: count %d outside [0, INT_MAX]", what, n));
  }
  return absl::OkStatus();
}

void FinalizeAtExit() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

absl::Status EnsureInitialized() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) return absl::OkStatus();
  int provided = 0;
  // Errors of MPI_Init itself always abort (no communicator to carry a handler yet).
  const int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
  if (rc != MPI_SUCCESS) return MpiStatus(rc, "Init_thread");
  std::atexit(FinalizeAtExit);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  if (provided < MPI_THREAD_FUNNELED) {
    return absl::FailedPreconditionError(
        absl::StrFormat("MPI provides thread level %d, below MPI_THREAD_FUNNELED", provided));
  }
  return absl::OkStatus();
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, int rank, int size) : comm_(comm), rank_(rank), size_(size) {}
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }

  // Gathers every rank's partial sums and adds them in rank order on each rank, rather than
  // MPI_Allreduce, whose algorithms may add in a different order on different ranks (and
  // between runs): ranks must end with bit-identical activations. Costs size() times the
  // bytes of a ring all-reduce, which is small for hidden-size rows on a few ranks.
  absl::Status AllReduceSum(float* data, int64_t n) override {
    if (size_ == 1 || n == 0) return CheckCount(n, "AllReduceSum");
    if (absl::Status s = CheckCount(n, "AllReduceSum"); !s.ok()) return s;
    scratch_.resize(static_cast<size_t>(n) * size_);
    const int rc = MPI_Allgather(data, static_cast<int>(n), MPI_FLOAT, scratch_.data(),
                                 static_cast<int>(n), MPI_FLOAT, comm_);
    if (rc != MPI_SUCCESS) return MpiStatus(rc, "Allgather (sum all-reduce)");
    for (int64_t i = 0; i < n; ++i) {
      float sum = scratch_[i];
      for (int r = 1; r < size_; ++r) sum += scratch_[static_cast<size_t>(r) * n + i];
      data[i] = sum;
    }
    return absl::OkStatus();
  }

  absl::Status AllGather(const void* send, int64_t bytes, void* recv) override {
    if (absl::Status s = CheckCount(bytes, "AllGather"); !s.ok()) return s;
    return MpiStatus(MPI_Allgather(send, static_cast<int>(bytes), MPI_BYTE, recv,
                                   static_cast<int>(bytes), MPI_BYTE, comm_),
                     "Allgather");
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root) override {
    if (absl::Status s = CheckCount(bytes, "Broadcast"); !s.ok()) return s;
    if (root < 0 || root >= size_) {
      return absl::InvalidArgumentError(
          absl::StrFormat("Broadcast: root %d outside a group of %d", root, size_));
    }
    return MpiStatus(MPI_Bcast(data, static_cast<int>(bytes), MPI_BYTE, root, comm_), "Bcast");
  }

  absl::Status Barrier() override { return MpiStatus(MPI_Barrier(comm_), "Barrier"); }

  void Abort(int exit_code) override {
    MPI_Abort(MPI_COMM_WORLD, exit_code);
    std::exit(exit_code);  // MPI_Abort does not return; this keeps [[noreturn]] honest
  }

 private:
  MPI_Comm comm_;
  int rank_;
  int size_;
  std::vector<float> scratch_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> CreateMpiCommunicator() {
  if (absl::Status s = EnsureInitialized(); !s.ok()) return s;
  // A duplicate keeps our messages apart from any other MPI user in the process.
  MPI_Comm comm;
  if (absl::Status s = MpiStatus(MPI_Comm_dup(MPI_COMM_WORLD, &comm), "Comm_dup"); !s.ok()) {
    return s;
  }
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  int rank = 0, size = 0;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  return std::make_unique<MpiCommunicator>(comm, rank, size);
}

}  // namespace quantkv
