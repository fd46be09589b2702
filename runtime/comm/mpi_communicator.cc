#include "runtime/comm/mpi_communicator.h"

#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "runtime/comm/collective_wait.h"

namespace quantkv {
namespace {

using Clock = std::chrono::steady_clock;

// WaitBounded polls with CollectiveBackoff (collective_wait.h).

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

// For FinalizeAtExit: the longest timeout of the communicators made, in seconds (0 before
// the first, -1 once one waits forever).
std::atomic<double> finalize_timeout_s{0};

void FinalizeAtExit() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  // MPI_Finalize waits for every rank (Open MPI fences through the launcher), so a peer that
  // hangs after the last collective would hold this rank here forever. A watchdog thread
  // (it makes no MPI calls) ends the process after the timeout instead; its
  // non-zero exit makes mpirun end the job, the hung peer included.
  if (const double t = finalize_timeout_s.load(); t > 0) {
    int rank = -1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    std::thread([t, rank] {
      std::this_thread::sleep_for(std::chrono::duration<double>(t));
      absl::FPrintF(stderr,
                    "quantkv: rank %d (pid %d): MPI_Finalize not complete after %g s: another "
                    "rank may have died or hung; exiting\n",
                    rank, static_cast<int>(getpid()), t);
      std::fflush(stderr);
      std::_Exit(kCommTimeoutExitCode);
    }).detach();
  }
  MPI_Finalize();
}

absl::Status EnsureInitialized() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) return absl::OkStatus();
  int provided = 0;
  // Errors of MPI_Init itself always abort (no communicator to carry a handler yet).
  // SERIALIZED: a server's collectives run on its engine-loop thread (rank 0) or on gRPC
  // handler threads (workers), one at a time, not on the thread that initialised MPI.
  const int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided);
  if (rc != MPI_SUCCESS) return MpiStatus(rc, "Init_thread");
  std::atexit(FinalizeAtExit);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  if (provided < MPI_THREAD_SERIALIZED) {
    return absl::FailedPreconditionError(
        absl::StrFormat("MPI provides thread level %d, below MPI_THREAD_SERIALIZED", provided));
  }
  return absl::OkStatus();
}

// Polls `request` until it completes (ok), MPI reports an error (its status), or `timeout`
// passes with the collective still open: then prints why on stderr and aborts every rank
// (no return), since the peer that never arrived cannot be told anything else and the
// request cannot be cancelled (collectives have no MPI_Cancel). timeout 0: no limit.
// `rank`, `size` and `seq` are only for the message.
absl::Status WaitBounded(MPI_Request* request, const char* what, Clock::duration timeout, int rank,
                         int size, int64_t seq) {
  const Clock::time_point start = Clock::now();
  CollectiveBackoff backoff;
  for (;;) {
    int done = 0;
    if (const int rc = MPI_Test(request, &done, MPI_STATUS_IGNORE); rc != MPI_SUCCESS) {
      return MpiStatus(rc, what);
    }
    if (done) return absl::OkStatus();
    const Clock::duration waited = Clock::now() - start;
    if (timeout > Clock::duration::zero() && waited >= timeout) {
      // One line, flushed before MPI_Abort (whose own banner follows). The rank printing it
      // is the one that waited, not the culprit; other ranks that arrived may print the same
      // line before the abort reaches them, and the rank that never does is the one to debug.
      const std::string line = absl::StrFormat(
          "rank %d of %d (pid %d): MPI %s (collective #%d) not complete after %.1f s: another "
          "rank may have died or hung; aborting all ranks (timeout %g s; QUANTKV_COMM_TIMEOUT_S "
          "sets it, 0 waits forever)",
          rank, size, static_cast<int>(getpid()), what, seq,
          std::chrono::duration<double>(waited).count(),
          std::chrono::duration<double>(timeout).count());
      absl::FPrintF(stderr, "quantkv: %s\n", line);
      std::fflush(stderr);
      RunBeforeJobAbortHook(line);
      MPI_Abort(MPI_COMM_WORLD, kCommTimeoutExitCode);
      std::_Exit(kCommTimeoutExitCode);  // MPI_Abort does not return
    }
    backoff.Pause(waited);
  }
}

// Capped so that a huge timeout (as good as none) cannot overflow the clock's ticks.
Clock::duration ToDuration(double seconds) {
  seconds = std::min(seconds, 1e9);
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, int rank, int size, Clock::duration timeout,
                  int64_t reduce_scatter_min_elements)
      : comm_(comm),
        rank_(rank),
        size_(size),
        timeout_(timeout),
        reduce_scatter_min_elements_(reduce_scatter_min_elements) {}
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }

  // Ranks must end with bit-identical activations, and MPI_Allreduce's algorithms may add
  // in a different order on different ranks (and between runs), so the sum is always taken
  // in rank order by this code. Small vectors (decode steps: latency-bound) gather every
  // rank's partial sums and add them on each rank: one collective, size() times the bytes
  // of a ring all-reduce. From options.reduce_scatter_min_elements values they go as a
  // reduce-scatter (each rank adds only its chunk) and an all-gather of the chunks:
  // 2 (size-1)/size of the vector on the wire per rank instead of size-1, and the same bits,
  // since each chunk is still added in rank order.
  absl::Status AllReduceSum(float* data, int64_t n) override {
    if (absl::Status s = CheckCount(n, "AllReduceSum"); !s.ok()) return s;
    if (size_ == 1 || n == 0) return absl::OkStatus();
    if (n >= reduce_scatter_min_elements_) return ReduceScatterAllGather(data, n);
    scratch_.resize(static_cast<size_t>(n) * size_);
    MPI_Request request;
    const char* what = "Iallgather (sum all-reduce)";
    bytes_sent_ += (size_ - 1) * n * static_cast<int64_t>(sizeof(float));
    if (absl::Status s = Start(MPI_Iallgather(data, static_cast<int>(n), MPI_FLOAT, scratch_.data(),
                                              static_cast<int>(n), MPI_FLOAT, comm_, &request),
                               &request, what);
        !s.ok()) {
      return s;
    }
    SumGatheredInRankOrder(scratch_.data(), n, size_, data);
    return absl::OkStatus();
  }

  // The ranks first agree on n (a small all-gather), so that a rank passing another n gets
  // an error naming it rather than MPI truncating a message or waiting for one. (The
  // all-reduce's own reduce-scatter skips that round trip, like its all-gather path.)
  absl::Status ReduceScatterSum(const float* send, int64_t n, float* recv) override {
    // A rank with a negative n takes part in the check too, so no rank waits for it.
    if (absl::Status s = CheckSameCount(*this, n, INT_MAX, "ReduceScatterSum"); !s.ok()) return s;
    return ReduceScatterUnchecked(send, n, recv, "Ialltoallv (reduce-scatter)");
  }

  absl::Status AllToAllV(const void* send, std::span<const int64_t> send_bytes,
                         std::vector<uint8_t>* recv, std::vector<int64_t>* recv_bytes) override {
    std::vector<int64_t> matrix;
    // MPI counts and displacements are ints: a rank's total must fit one.
    if (absl::Status s = ExchangeAllToAllCounts(*this, send_bytes, INT_MAX, &matrix); !s.ok()) {
      return s;
    }
    std::vector<int> scounts(size_), sdispls(size_), rcounts(size_), rdispls(size_);
    int64_t out = 0, in = 0;
    recv_bytes->resize(static_cast<size_t>(size_));
    for (int q = 0; q < size_; ++q) {
      scounts[q] = static_cast<int>(matrix[static_cast<size_t>(rank_) * size_ + q]);
      sdispls[q] = static_cast<int>(out);
      out += scounts[q];
      if (q != rank_) bytes_sent_ += scounts[q];
      rcounts[q] = static_cast<int>(matrix[static_cast<size_t>(q) * size_ + rank_]);
      rdispls[q] = static_cast<int>(in);
      in += rcounts[q];
      (*recv_bytes)[q] = rcounts[q];
    }
    recv->resize(static_cast<size_t>(in));
    MPI_Request request;
    return Start(MPI_Ialltoallv(send, scounts.data(), sdispls.data(), MPI_BYTE, recv->data(),
                                rcounts.data(), rdispls.data(), MPI_BYTE, comm_, &request),
                 &request, "Ialltoallv");
  }

  absl::Status AllGather(const void* send, int64_t bytes, void* recv) override {
    if (absl::Status s = CheckCount(bytes, "AllGather"); !s.ok()) return s;
    bytes_sent_ += (size_ - 1) * bytes;
    MPI_Request request;
    return Start(MPI_Iallgather(send, static_cast<int>(bytes), MPI_BYTE, recv,
                                static_cast<int>(bytes), MPI_BYTE, comm_, &request),
                 &request, "Iallgather");
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root) override {
    if (absl::Status s = CheckCount(bytes, "Broadcast"); !s.ok()) return s;
    if (root < 0 || root >= size_) {
      return absl::InvalidArgumentError(
          absl::StrFormat("Broadcast: root %d outside a group of %d", root, size_));
    }
    if (rank_ == root) bytes_sent_ += (size_ - 1) * bytes;
    MPI_Request request;
    return Start(MPI_Ibcast(data, static_cast<int>(bytes), MPI_BYTE, root, comm_, &request),
                 &request, "Ibcast");
  }

  absl::Status Barrier() override {
    MPI_Request request;
    return Start(MPI_Ibarrier(comm_, &request), &request, "Ibarrier");
  }

  int64_t bytes_sent() const override { return bytes_sent_; }

  void Abort(int exit_code) override {
    MPI_Abort(MPI_COMM_WORLD, exit_code);
    std::exit(exit_code);  // MPI_Abort does not return; this keeps [[noreturn]] honest
  }

 private:
  // The start call's code, then the bounded wait for the request it made.
  absl::Status Start(int rc, MPI_Request* request, const char* what) {
    if (rc != MPI_SUCCESS) return MpiStatus(rc, what);
    return WaitBounded(request, what, timeout_, rank_, size_, ++collectives_);
  }

  // Every rank sends chunk q of its vector to rank q (MPI_Ialltoallv: each rank receives the
  // size() - 1 other partials of its own chunk only), then adds the partials of its chunk in
  // rank order into recv. n must be the same on every rank and fit an int.
  absl::Status ReduceScatterUnchecked(const float* send, int64_t n, float* recv, const char* what) {
    const ChunkRange mine = ReduceScatterChunk(n, size_, rank_);
    const int64_t len = mine.size();
    std::vector<int> scounts(size_), sdispls(size_), rcounts(size_), rdispls(size_);
    for (int q = 0; q < size_; ++q) {
      const ChunkRange c = ReduceScatterChunk(n, size_, q);
      scounts[q] = static_cast<int>(c.size());
      sdispls[q] = static_cast<int>(c.begin);
      rcounts[q] = static_cast<int>(len);
      rdispls[q] = static_cast<int>(q * len);
    }
    bytes_sent_ += (n - len) * static_cast<int64_t>(sizeof(float));
    scratch_.resize(static_cast<size_t>(len) * size_);
    MPI_Request request;
    if (absl::Status s =
            Start(MPI_Ialltoallv(send, scounts.data(), sdispls.data(), MPI_FLOAT, scratch_.data(),
                                 rcounts.data(), rdispls.data(), MPI_FLOAT, comm_, &request),
                  &request, what);
        !s.ok()) {
      return s;
    }
    SumGatheredInRankOrder(scratch_.data(), len, size_, recv);
    return absl::OkStatus();
  }

  // AllReduceSum as a reduce-scatter into this rank's chunk of data, then an all-gather of
  // the chunks in place.
  absl::Status ReduceScatterAllGather(float* data, int64_t n) {
    const ChunkRange mine = ReduceScatterChunk(n, size_, rank_);
    if (absl::Status s = ReduceScatterUnchecked(data, n, data + mine.begin,
                                                "Ialltoallv (sum all-reduce's reduce-scatter)");
        !s.ok()) {
      return s;
    }
    std::vector<int> counts(size_), displs(size_);
    for (int q = 0; q < size_; ++q) {
      const ChunkRange c = ReduceScatterChunk(n, size_, q);
      counts[q] = static_cast<int>(c.size());
      displs[q] = static_cast<int>(c.begin);
    }
    bytes_sent_ += (size_ - 1) * mine.size() * static_cast<int64_t>(sizeof(float));
    MPI_Request request;
    return Start(MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, data, counts.data(),
                                 displs.data(), MPI_FLOAT, comm_, &request),
                 &request, "Iallgatherv (sum all-reduce's all-gather)");
  }

  MPI_Comm comm_;
  int rank_;
  int size_;
  Clock::duration timeout_;  // zero: no limit
  int64_t reduce_scatter_min_elements_;
  int64_t collectives_ = 0;  // collectives started, for the timeout message
  int64_t bytes_sent_ = 0;
  std::vector<float> scratch_;
};

}  // namespace

absl::StatusOr<double> CommTimeoutFromEnv() {
  const char* v = std::getenv("QUANTKV_COMM_TIMEOUT_S");
  if (v == nullptr || *v == '\0') return kDefaultCommTimeoutS;
  double s = 0;
  if (!absl::SimpleAtod(v, &s) || !std::isfinite(s) || s < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "QUANTKV_COMM_TIMEOUT_S='%s' is not a number of seconds >= 0 (0: no timeout)", v));
  }
  return s;
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateMpiCommunicator(
    const MpiCommunicatorOptions& options) {
  double timeout_s = options.timeout_s;
  if (timeout_s < 0) {
    absl::StatusOr<double> env = CommTimeoutFromEnv();
    if (!env.ok()) return env.status();
    timeout_s = *env;
  }
  if (!std::isfinite(timeout_s)) {
    return absl::InvalidArgumentError("MPI communicator timeout must be finite (0: no timeout)");
  }
  const Clock::duration timeout = ToDuration(timeout_s);
  // Finalize waits as long as the most patient communicator, and forever if one does.
  if (double t = finalize_timeout_s.load(); t >= 0 && (timeout_s == 0 || timeout_s > t)) {
    finalize_timeout_s.store(timeout_s == 0 ? -1 : std::min(timeout_s, 1e9));
  }
  if (absl::Status s = EnsureInitialized(); !s.ok()) return s;
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  // A duplicate keeps our messages apart from any other MPI user in the process. Duplicating
  // is collective too, so it is bounded like the others (a peer may already be stuck).
  MPI_Comm comm;
  MPI_Request request;
  if (absl::Status s = MpiStatus(MPI_Comm_idup(MPI_COMM_WORLD, &comm, &request), "Comm_idup");
      !s.ok()) {
    return s;
  }
  if (absl::Status s = WaitBounded(&request, "Comm_idup", timeout, rank, size, 0); !s.ok()) {
    return s;
  }
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  return std::make_unique<MpiCommunicator>(
      comm, rank, size, timeout,
      options.reduce_scatter_min_elements < 0 ? INT64_MAX : options.reduce_scatter_min_elements);
}

}  // namespace quantkv
