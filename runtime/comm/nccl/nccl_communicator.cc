// The NCCL communicator (runtime/comm/nccl_communicator.h). A host .cc: it calls the CUDA
// runtime and NCCL but launches no kernels of its own, so nvcc is not needed for it.
//
// Every collective has the same shape: validate the arguments (INVALID_ARGUMENT, the group
// untouched), Begin (refuse a broken group, select this rank's device on the calling thread),
// copy the host input to device scratch, enqueue NCCL, wait (bounded) until the stream is idle,
// copy the result back, wait again. The copy back is enqueued only after NCCL's work is known
// to be done, for two reasons: a device-to-pageable-host cudaMemcpyAsync returns only once the
// copy completes, so enqueued behind a collective that never finishes it would block this
// thread beyond any timeout; and a non-blocking NCCL communicator may not have put its work on
// the stream yet when its call returns ncclInProgress (NCCL's rule: poll the communicator until
// ncclSuccess before issuing more work on its stream).
#include "runtime/comm/nccl_communicator.h"
#include "runtime/comm/collective_wait.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "runtime/comm/mpi_communicator.h"  // CommTimeoutFromEnv

namespace quantkv {
namespace {

using Clock = std::chrono::steady_clock;

// WaitFor polls with CollectiveBackoff (collective_wait.h), as the MPI communicator does.

// Capped so that a huge timeout (as good as none) cannot overflow the clock's ticks.
Clock::duration ToDuration(double seconds) {
  seconds = std::min(seconds, 1e9);
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

std::string CudaText(cudaError_t err) {
  return absl::StrFormat("%s (%s)", cudaGetErrorString(err), cudaGetErrorName(err));
}

absl::Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  const std::string message = absl::StrFormat("NCCL communicator: %s: %s", what, CudaText(err));
  return err == cudaErrorMemoryAllocation ? absl::ResourceExhaustedError(message)
                                          : absl::InternalError(message);
}

// NCCL's name for `result` and, when there is one, its last error message (which NCCL keeps
// per thread and may belong to an earlier call; it is the detail worth having anyway).
std::string NcclText(ncclResult_t result, ncclComm_t comm) {
  std::string text = ncclGetErrorString(result);
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && *last != '\0') text += absl::StrFormat(" (%s)", last);
  return text;
}

// How a bounded wait ended.
struct WaitResult {
  enum Kind { kDone, kNcclError, kCudaError, kTimeout } kind = kDone;
  ncclResult_t nccl = ncclSuccess;
  cudaError_t cuda = cudaSuccess;
  Clock::duration waited{};
};

// Polls until `comm` leaves ncclInProgress (stream == nullptr) or, in addition, `stream` is
// idle; stops at an NCCL or CUDA error, or when `timeout` (zero: none) has passed since
// `start`. Does not abort anything itself.
WaitResult WaitFor(ncclComm_t comm, cudaStream_t stream, Clock::time_point start,
                   Clock::duration timeout) {
  CollectiveBackoff backoff;
  for (;;) {
    WaitResult w;
    ncclResult_t state = ncclSuccess;
    if (const ncclResult_t r = ncclCommGetAsyncError(comm, &state); r != ncclSuccess) {
      w.kind = WaitResult::kNcclError;
      w.nccl = r;
    } else if (state != ncclSuccess && state != ncclInProgress) {
      w.kind = WaitResult::kNcclError;  // an asynchronous error: a peer gone, a network fault
      w.nccl = state;
    } else if (state == ncclSuccess) {
      if (stream == nullptr) return w;
      const cudaError_t q = cudaStreamQuery(stream);
      if (q == cudaSuccess) return w;
      if (q != cudaErrorNotReady) {
        w.kind = WaitResult::kCudaError;
        w.cuda = q;
      }
    }
    w.waited = Clock::now() - start;
    if (w.kind != WaitResult::kDone) return w;
    if (timeout > Clock::duration::zero() && w.waited >= timeout) {
      w.kind = WaitResult::kTimeout;
      return w;
    }
    backoff.Pause(w.waited);
  }
}

// A device allocation that only grows (collectives of a run have a few recurring sizes).
class DeviceScratch {
 public:
  DeviceScratch() = default;
  DeviceScratch(const DeviceScratch&) = delete;
  DeviceScratch& operator=(const DeviceScratch&) = delete;
  ~DeviceScratch() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }

  // At least `bytes` bytes (> 0). The old contents are not kept. Called only between
  // collectives, when nothing uses the buffer (cudaFree synchronizes the device).
  absl::Status Reserve(size_t bytes) {
    if (bytes <= bytes_) return absl::OkStatus();
    if (ptr_ != nullptr) {
      const cudaError_t err = cudaFree(ptr_);
      ptr_ = nullptr;
      bytes_ = 0;
      if (err != cudaSuccess) return CudaStatus(err, "cudaFree of a scratch buffer");
    }
    // Round up to 1 MiB steps so that slowly growing sizes do not reallocate every call.
    const size_t step = size_t{1} << 20;
    const size_t want = (bytes + step - 1) / step * step;
    void* p = nullptr;
    if (const cudaError_t err = cudaMalloc(&p, want); err != cudaSuccess) {
      return CudaStatus(err, absl::StrFormat("cudaMalloc of %d bytes of scratch", want).c_str());
    }
    ptr_ = static_cast<uint8_t*>(p);
    bytes_ = want;
    return absl::OkStatus();
  }
  uint8_t* get() const { return ptr_; }
  // Forgets the allocation without freeing it: after an abort, cudaFree (which synchronizes
  // the device) could wait on a kernel that did not stop, and the process is about to end.
  void Leak() { ptr_ = nullptr; }

 private:
  uint8_t* ptr_ = nullptr;
  size_t bytes_ = 0;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, cudaStream_t stream, int device, int rank, int size,
                   Clock::duration timeout, Communicator* bootstrap,
                   std::unique_ptr<Communicator> owned_bootstrap)
      : comm_(comm),
        stream_(stream),
        device_(device),
        rank_(rank),
        size_(size),
        timeout_(timeout),
        bootstrap_(bootstrap),
        owned_bootstrap_(std::move(owned_bootstrap)) {}

  ~NcclCommunicator() override {
    cudaSetDevice(device_);
    if (comm_ != nullptr) {
      // Finalize flushes and waits (non-blocking: polled, bounded like a collective) until the
      // communicator is quiescent; then Destroy frees it without blocking. A finalize that
      // fails or does not end (a peer gone) falls back to Abort, which does not wait.
      const ncclResult_t r = ncclCommFinalize(comm_);
      bool finalized = r == ncclSuccess || r == ncclInProgress;
      if (finalized) {
        finalized = WaitFor(comm_, nullptr, Clock::now(), timeout_).kind == WaitResult::kDone;
      }
      if (finalized) {
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
        Broken(absl::InternalError("finalize failed"));
      }
      comm_ = nullptr;
    }
    if (!broken_.ok()) {
      send_.Leak();
      recv_.Leak();
      return;  // the stream too: destroying it may wait for its work
    }
    cudaStreamDestroy(stream_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "nccl"; }

  // ncclAllReduce: every rank gets the same bits (see the header), in NCCL's order of
  // additions, not rank order.
  absl::Status AllReduceSum(float* data, int64_t n) override {
    const char* what = "AllReduceSum";
    if (absl::Status s = Usable(what); !s.ok()) return s;
    if (absl::Status s = CheckCount(n, sizeof(float), what); !s.ok()) return s;
    if (n > 0 && data == nullptr) return NullArgument(what, "data", n);
    if (n == 0) return absl::OkStatus();
    const size_t bytes = static_cast<size_t>(n) * sizeof(float);
    if (absl::Status s = Begin(what); !s.ok()) return s;
    if (absl::Status s = Reserve(&send_, bytes); !s.ok()) return s;
    if (absl::Status s = Upload(send_.get(), data, bytes); !s.ok()) return s;
    if (absl::Status s = Enqueued(ncclAllReduce(send_.get(), send_.get(), static_cast<size_t>(n),
                                                ncclFloat32, ncclSum, comm_, stream_),
                                  what);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = Complete(what); !s.ok()) return s;
    if (absl::Status s = Download(data, send_.get(), bytes, what); !s.ok()) return s;
    // What a ring all-reduce sends per rank (NCCL may pick a tree; the bytes are similar).
    bytes_sent_ += 2 * (size_ - 1) * static_cast<int64_t>(bytes) / size_;
    return absl::OkStatus();
  }

  // The interface's exact contract (this rank's chunk summed in rank order in fp32, the bits
  // of SumGatheredInRankOrder) rather than ncclReduceScatter, whose order of additions is
  // NCCL's: an all-gather of every rank's whole input into device memory, then the copy of
  // this rank's chunk of every rank's row (one strided copy) and the rank-ordered sum on the
  // host. size() times the bytes of a true reduce-scatter on the wire.
  absl::Status ReduceScatterSum(const float* send, int64_t n, float* recv) override {
    const char* what = "ReduceScatterSum";
    if (absl::Status s = Usable(what); !s.ok()) return s;
    const ChunkRange mine = ReduceScatterChunk(std::max<int64_t>(n, 0), size_, rank_);
    if (n > 0 && send == nullptr) return NullArgument(what, "send", n);
    if (mine.size() > 0 && recv == nullptr) return NullArgument(what, "recv", n);
    // Collective, a negative n included, so that no rank waits for one that refused.
    if (absl::Status s = CheckSameCount(*this, n, MaxCount(sizeof(float) * size_), what); !s.ok()) {
      return s;
    }
    if (n == 0) return absl::OkStatus();
    const size_t row = static_cast<size_t>(n) * sizeof(float);
    if (absl::Status s = Begin(what); !s.ok()) return s;
    if (absl::Status s = Reserve(&send_, row * size_); !s.ok()) return s;
    uint8_t* my_row = send_.get() + row * rank_;
    if (absl::Status s = Upload(my_row, send, row); !s.ok()) return s;
    // In place: this rank's row already sits at its offset of the gathered buffer.
    if (absl::Status s = Enqueued(
            ncclAllGather(my_row, send_.get(), static_cast<size_t>(n), ncclFloat32, comm_, stream_),
            what);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = Complete(what); !s.ok()) return s;
    bytes_sent_ += (size_ - 1) * static_cast<int64_t>(row);
    const int64_t len = mine.size();
    if (len == 0) return absl::OkStatus();
    // Column block [begin, end) of the size_ x n gathered matrix, as size_ rows of len values.
    host_.resize(static_cast<size_t>(len) * size_);
    const size_t width = static_cast<size_t>(len) * sizeof(float);
    if (absl::Status s = CudaStatus(
            cudaMemcpy2DAsync(host_.data(), width, send_.get() + mine.begin * sizeof(float), row,
                              width, static_cast<size_t>(size_), cudaMemcpyDeviceToHost, stream_),
            "cudaMemcpy2DAsync (device to host)");
        !s.ok()) {
      return Fail(s);
    }
    if (absl::Status s = Complete(what); !s.ok()) return s;
    // recv may be send + begin: send was read (uploaded) long before.
    SumGatheredInRankOrder(host_.data(), len, size_, recv);
    return absl::OkStatus();
  }

  absl::Status AllGather(const void* send, int64_t bytes, void* recv) override {
    const char* what = "AllGather";
    if (absl::Status s = Usable(what); !s.ok()) return s;
    if (absl::Status s = CheckCount(bytes, size_, what); !s.ok()) return s;
    if (bytes > 0 && send == nullptr) return NullArgument(what, "send", bytes);
    if (bytes > 0 && recv == nullptr) return NullArgument(what, "recv", bytes);
    if (bytes == 0) return absl::OkStatus();
    const size_t b = static_cast<size_t>(bytes);
    if (absl::Status s = Begin(what); !s.ok()) return s;
    if (absl::Status s = Reserve(&send_, b * size_); !s.ok()) return s;
    uint8_t* mine = send_.get() + b * rank_;
    if (absl::Status s = Upload(mine, send, b); !s.ok()) return s;
    if (absl::Status s =
            Enqueued(ncclAllGather(mine, send_.get(), b, ncclUint8, comm_, stream_), what);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = Complete(what); !s.ok()) return s;
    // recv may hold send (recv + rank * bytes == send): send was uploaded before this.
    if (absl::Status s = Download(recv, send_.get(), b * size_, what); !s.ok()) return s;
    bytes_sent_ += (size_ - 1) * bytes;
    return absl::OkStatus();
  }

  // Counts through ExchangeAllToAllCounts (checked on every rank before any data moves), then
  // one NCCL group of a send and a receive per peer with a non-empty piece (both sides skip
  // the empty ones alike: they know the whole count matrix). This rank's piece for itself is
  // copied on the host.
  absl::Status AllToAllV(const void* send, std::span<const int64_t> send_bytes,
                         std::vector<uint8_t>* recv, std::vector<int64_t>* recv_bytes) override {
    const char* what = "AllToAllV";
    if (absl::Status s = Usable(what); !s.ok()) return s;
    if (recv == nullptr || recv_bytes == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrFormat("NCCL %s: recv and recv_bytes must not be null", what));
    }
    if (send == nullptr) {
      for (const int64_t b : send_bytes) {
        if (b > 0) return NullArgument(what, "send", b);
      }
    }
    std::vector<int64_t> matrix;
    if (absl::Status s = ExchangeAllToAllCounts(*this, send_bytes, 0, &matrix); !s.ok()) {
      return s;
    }
    const auto at = [&](int from, int to) {
      return matrix[static_cast<size_t>(from) * size_ + to];
    };
    std::vector<size_t> sdispl(size_), rdispl(size_);
    size_t out = 0, in = 0;
    bool remote = false;  // any piece between this rank and another
    recv_bytes->resize(static_cast<size_t>(size_));
    for (int q = 0; q < size_; ++q) {
      sdispl[q] = out;
      out += static_cast<size_t>(at(rank_, q));
      rdispl[q] = in;
      in += static_cast<size_t>(at(q, rank_));
      (*recv_bytes)[q] = at(q, rank_);
      if (q != rank_ && (at(rank_, q) > 0 || at(q, rank_) > 0)) remote = true;
    }
    recv->resize(in);
    const auto* src = static_cast<const uint8_t*>(send);
    if (remote) {
      if (absl::Status s = Begin(what); !s.ok()) return s;
      if (out > 0) {
        if (absl::Status s = Reserve(&send_, out); !s.ok()) return s;
        if (absl::Status s = Upload(send_.get(), src, out); !s.ok()) return s;
      }
      if (in > 0) {
        if (absl::Status s = Reserve(&recv_, in); !s.ok()) return s;
      }
      if (ncclResult_t r = ncclGroupStart(); r != ncclSuccess) return Enqueued(r, what);
      ncclResult_t first = ncclSuccess;
      for (int q = 0; q < size_; ++q) {
        if (q == rank_) continue;
        if (const int64_t b = at(rank_, q); b > 0) {
          const ncclResult_t r = ncclSend(send_.get() + sdispl[q], static_cast<size_t>(b),
                                          ncclUint8, q, comm_, stream_);
          if (first == ncclSuccess) first = r;
        }
        if (const int64_t b = at(q, rank_); b > 0) {
          const ncclResult_t r = ncclRecv(recv_.get() + rdispl[q], static_cast<size_t>(b),
                                          ncclUint8, q, comm_, stream_);
          if (first == ncclSuccess) first = r;
        }
      }
      // Always closed, even after a failed call inside: an open group would swallow every
      // later NCCL call of this thread.
      const ncclResult_t end = ncclGroupEnd();
      if (absl::Status s = Enqueued(first != ncclSuccess ? first : end, what); !s.ok()) return s;
      if (absl::Status s = Complete(what); !s.ok()) return s;
      if (in > 0) {
        // The whole receive buffer; its slot for this rank's own piece is overwritten below.
        if (absl::Status s = Download(recv->data(), recv_.get(), in, what); !s.ok()) return s;
      }
      for (int q = 0; q < size_; ++q) {
        if (q != rank_) bytes_sent_ += at(rank_, q);
      }
    }
    if (const int64_t b = at(rank_, rank_); b > 0) {
      std::memcpy(recv->data() + rdispl[rank_], src + sdispl[rank_], static_cast<size_t>(b));
    }
    return absl::OkStatus();
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root) override {
    const char* what = "Broadcast";
    if (absl::Status s = Usable(what); !s.ok()) return s;
    if (absl::Status s = CheckCount(bytes, 1, what); !s.ok()) return s;
    if (root < 0 || root >= size_) {
      return absl::InvalidArgumentError(
          absl::StrFormat("Broadcast: root %d outside a group of %d", root, size_));
    }
    if (bytes > 0 && data == nullptr) return NullArgument(what, "data", bytes);
    if (bytes == 0) return absl::OkStatus();
    const size_t b = static_cast<size_t>(bytes);
    if (absl::Status s = Begin(what); !s.ok()) return s;
    if (absl::Status s = Reserve(&send_, b); !s.ok()) return s;
    if (rank_ == root) {
      if (absl::Status s = Upload(send_.get(), data, b); !s.ok()) return s;
    }
    if (absl::Status s = Enqueued(
            ncclBroadcast(send_.get(), send_.get(), b, ncclUint8, root, comm_, stream_), what);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = Complete(what); !s.ok()) return s;
    if (rank_ == root) {
      bytes_sent_ += (size_ - 1) * bytes;  // the payload delivered, as the MPI one counts
      return absl::OkStatus();
    }
    return Download(data, send_.get(), b, what);
  }

  // NCCL has no barrier: a one-byte all-reduce, which no rank can finish before every rank
  // has started it. (Its value is never read, so the byte is not initialised.)
  absl::Status Barrier() override {
    const char* what = "Barrier";
    if (absl::Status s = Usable(what); !s.ok()) return s;
    if (absl::Status s = Begin(what); !s.ok()) return s;
    if (absl::Status s = Reserve(&send_, 1); !s.ok()) return s;
    if (absl::Status s = Enqueued(
            ncclAllReduce(send_.get(), send_.get(), 1, ncclUint8, ncclMax, comm_, stream_), what);
        !s.ok()) {
      return s;
    }
    return Complete(what);
  }

  int64_t bytes_sent() const override { return bytes_sent_; }

  // Stops this rank's NCCL work (peers blocked in a collective with it then see an error or
  // their timeout), then ends every rank through the bootstrap group (MPI_Abort under mpirun).
  void Abort(int exit_code) override {
    if (comm_ != nullptr) ncclCommAbort(comm_);
    comm_ = nullptr;
    if (bootstrap_ != nullptr) bootstrap_->Abort(exit_code);
    std::fflush(stderr);
    std::_Exit(exit_code);  // bootstrap_->Abort does not return; this keeps [[noreturn]] honest
  }

 private:
  // Counts whose buffers (times `factor`: element size, ranks) fit an int64 of bytes.
  static int64_t MaxCount(int64_t factor) { return INT64_MAX / std::max<int64_t>(factor, 1); }

  absl::Status CheckCount(int64_t n, int64_t factor, const char* what) const {
    if (n < 0 || n > MaxCount(factor)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("NCCL %s: count %d outside [0, %d]", what, n, MaxCount(factor)));
    }
    return absl::OkStatus();
  }

  static absl::Status NullArgument(const char* what, const char* arg, int64_t n) {
    return absl::InvalidArgumentError(
        absl::StrFormat("NCCL %s: %s is null with a count of %d", what, arg, n));
  }

  // Every call after a failed collective is refused, even one that would move nothing: the
  // ranks no longer agree on where they are.
  absl::Status Usable(const char* what) const {
    if (broken_.ok()) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrFormat(
        "NCCL %s on rank %d of %d: the communicator is unusable after an earlier failure (%s); "
        "end the job",
        what, rank_, size_, broken_.message()));
  }

  // The start of a collective's device work: refuses a broken group, and selects this rank's
  // device on the calling thread (the current device is per thread; a server's collectives
  // run on threads other than the one that created the communicator).
  absl::Status Begin(const char* what) {
    if (absl::Status s = Usable(what); !s.ok()) return s;
    ++collectives_;
    start_ = Clock::now();
    if (const cudaError_t err = cudaSetDevice(device_); err != cudaSuccess) {
      return Fail(CudaStatus(err, "cudaSetDevice"));
    }
    return absl::OkStatus();
  }

  absl::Status Reserve(DeviceScratch* buffer, size_t bytes) {
    if (absl::Status s = buffer->Reserve(bytes); !s.ok()) return Fail(s);
    return absl::OkStatus();
  }

  // Host to device. The stream is idle here (every collective ends with it idle), so a
  // pageable copy's implicit synchronization waits for nothing.
  absl::Status Upload(void* device, const void* host, size_t bytes) {
    return FailIfError(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream_),
                       "cudaMemcpyAsync (host to device)");
  }

  // Device to host, then the wait for it; only after NCCL's work is complete (see the top).
  absl::Status Download(void* host, const void* device, size_t bytes, const char* what) {
    if (absl::Status s =
            FailIfError(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, stream_),
                        "cudaMemcpyAsync (device to host)");
        !s.ok()) {
      return s;
    }
    return Complete(what);
  }

  absl::Status FailIfError(cudaError_t err, const char* call) {
    if (err == cudaSuccess) return absl::OkStatus();
    return Fail(CudaStatus(err, call));
  }

  // An NCCL call's result: ncclSuccess, or ncclInProgress (a non-blocking communicator still
  // setting the work up: polled, bounded, until it is on the stream), or an error.
  absl::Status Enqueued(ncclResult_t result, const char* what) {
    if (result == ncclSuccess) return absl::OkStatus();
    if (result != ncclInProgress) {
      return Fail(absl::InternalError(
          absl::StrFormat("NCCL %s (collective #%d) on rank %d of %d failed: %s", what,
                          collectives_, rank_, size_, NcclText(result, comm_))));
    }
    return Settle(WaitFor(comm_, nullptr, start_, timeout_), what);
  }

  // Waits, bounded, until the stream is idle: everything this collective enqueued is done.
  absl::Status Complete(const char* what) {
    return Settle(WaitFor(comm_, stream_, start_, timeout_), what);
  }

  absl::Status Settle(const WaitResult& w, const char* what) {
    switch (w.kind) {
      case WaitResult::kDone:
        return absl::OkStatus();
      case WaitResult::kTimeout:
        return Fail(absl::DeadlineExceededError(absl::StrFormat(
            "NCCL %s (collective #%d) on rank %d of %d not complete after %.1f s: another rank "
            "may have died or hung; the NCCL communicator was aborted (timeout %g s; "
            "QUANTKV_COMM_TIMEOUT_S sets it, 0 waits forever)",
            what, collectives_, rank_, size_, Seconds(w.waited), Seconds(timeout_))));
      case WaitResult::kNcclError:
        return Fail(absl::InternalError(absl::StrFormat(
            "NCCL %s (collective #%d) on rank %d of %d failed after %.1f s: %s; the NCCL "
            "communicator was aborted",
            what, collectives_, rank_, size_, Seconds(w.waited), NcclText(w.nccl, comm_))));
      case WaitResult::kCudaError:
        return Fail(absl::InternalError(absl::StrFormat(
            "NCCL %s (collective #%d) on rank %d of %d: the CUDA stream failed after %.1f s: "
            "%s; the NCCL communicator was aborted",
            what, collectives_, rank_, size_, Seconds(w.waited), CudaText(w.cuda))));
    }
    return absl::InternalError("unreachable");
  }

  // After a failure inside a collective the ranks disagree on how far it got: this rank's
  // NCCL communicator is aborted (its peers then fail too, or time out) and every later call
  // is refused.
  absl::Status Fail(absl::Status status) {
    if (comm_ != nullptr) ncclCommAbort(comm_);
    comm_ = nullptr;
    Broken(status);
    return status;
  }

  void Broken(const absl::Status& status) {
    if (broken_.ok()) broken_ = status;
  }

  ncclComm_t comm_;
  cudaStream_t stream_;
  int device_;
  int rank_;
  int size_;
  Clock::duration timeout_;  // zero: no limit
  Communicator* bootstrap_;  // for Abort; outlives this (owned_bootstrap_ when owned)
  std::unique_ptr<Communicator> owned_bootstrap_;  // declared before the buffers: freed last
  DeviceScratch send_, recv_;
  std::vector<float> host_;  // ReduceScatterSum's gathered chunk rows
  absl::Status broken_;      // the first failure; ok while usable
  int64_t collectives_ = 0;  // collectives started, for messages
  Clock::time_point start_;  // of the current collective, for its timeout
  int64_t bytes_sent_ = 0;
};

// Node-local rank from the launcher's environment (Open MPI, MPICH/Intel MPI, Slurm), else
// `fallback`.
int NodeLocalRank(int fallback) {
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"}) {
    const char* v = std::getenv(var);
    int r = 0;
    if (v != nullptr && absl::SimpleAtoi(v, &r) && r >= 0) return r;
  }
  return fallback;
}

absl::Status PickDevice(int requested, int bootstrap_rank, int* device) {
  int count = 0;
  if (const cudaError_t err = cudaGetDeviceCount(&count); err != cudaSuccess) {
    cudaGetLastError();  // not sticky: keep it from surfacing in an unrelated later call
    return absl::FailedPreconditionError(absl::StrFormat(
        "NCCL communicator: no usable CUDA device (cudaGetDeviceCount: %s); NCCL needs one GPU "
        "per rank",
        CudaText(err)));
  }
  if (count == 0) {
    return absl::FailedPreconditionError(
        "NCCL communicator: no usable CUDA device (the driver reports 0); NCCL needs one GPU "
        "per rank");
  }
  if (requested >= count) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "NCCL communicator: device %d requested but %d CUDA device(s) visible", requested, count));
  }
  *device = requested >= 0 ? requested : NodeLocalRank(bootstrap_rank) % count;
  return absl::OkStatus();
}

std::string UuidText(const char (&u)[16]) {
  std::string s;
  for (int i = 0; i < 16; ++i) {
    s += absl::StrFormat("%02x", static_cast<unsigned char>(u[i]));
    if (i == 3 || i == 5 || i == 7 || i == 9) s += '-';
  }
  return s;
}

absl::StatusOr<std::unique_ptr<Communicator>> Create(Communicator& bootstrap,
                                                     std::unique_ptr<Communicator> owned,
                                                     const NcclCommunicatorOptions& options) {
  const int rank = bootstrap.rank(), size = bootstrap.size();
  // This rank's part of the set-up, then the agreement on it: every rank must be ready before
  // any enters ncclCommInitRankConfig, which would otherwise wait for a rank that gave up.
  absl::Status local;
  double timeout_s = options.timeout_s;
  if (timeout_s < 0) {
    absl::StatusOr<double> env = CommTimeoutFromEnv();
    if (env.ok()) {
      timeout_s = *env;
    } else {
      local = env.status();
    }
  }
  if (local.ok() && !std::isfinite(timeout_s)) {
    local = absl::InvalidArgumentError("NCCL communicator timeout must be finite (0: no timeout)");
  }
  int device = -1;
  if (local.ok()) local = PickDevice(options.device, rank, &device);
  if (local.ok()) local = CudaStatus(cudaSetDevice(device), "cudaSetDevice");
  // The device's UUID, to refuse two ranks on one GPU (whatever CUDA_VISIBLE_DEVICES each
  // rank has): NCCL does not support it.
  struct Identity {
    char uuid[16];
  } me{};
  cudaDeviceProp prop{};
  if (local.ok())
    local = CudaStatus(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  if (local.ok()) std::memcpy(me.uuid, prop.uuid.bytes, sizeof(me.uuid));
  cudaStream_t stream = nullptr;
  // Non-blocking towards the legacy default stream, so that other CUDA work of the process
  // does not serialize with the collectives.
  if (local.ok()) {
    local = CudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                       "cudaStreamCreateWithFlags");
  }
  ncclUniqueId id{};
  if (local.ok() && rank == 0) {
    if (const ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) {
      local = absl::InternalError(
          absl::StrFormat("NCCL communicator: ncclGetUniqueId failed: %s", NcclText(r, nullptr)));
    }
  }
  const auto cleanup = [&] {
    if (stream != nullptr) cudaStreamDestroy(stream);
  };
  if (absl::Status s = AgreeOnStatus(bootstrap, local); !s.ok()) {
    cleanup();
    return s;
  }
  std::vector<Identity> all(static_cast<size_t>(size));
  if (absl::Status s = bootstrap.AllGather(&me, sizeof(me), all.data()); !s.ok()) {
    cleanup();
    return s;
  }
  // Every rank sees the same list, so every rank reaches the same verdict.
  for (int a = 0; a < size; ++a) {
    for (int b = a + 1; b < size; ++b) {
      if (std::memcmp(all[a].uuid, all[b].uuid, sizeof(Identity::uuid)) == 0) {
        cleanup();
        return absl::FailedPreconditionError(absl::StrFormat(
            "NCCL communicator: ranks %d and %d would share one CUDA device (GPU-%s); NCCL needs "
            "a GPU per rank: start at most as many ranks per node as it has GPUs, or give each "
            "rank its own (CUDA_VISIBLE_DEVICES)",
            a, b, UuidText(all[a].uuid)));
      }
    }
  }
  if (absl::Status s = bootstrap.Broadcast(&id, sizeof(id), 0); !s.ok()) {
    cleanup();
    return s;
  }
  // Non-blocking: no NCCL call blocks this thread (init included), so every wait below and in
  // the collectives is ours to bound.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  const Clock::duration timeout = ToDuration(timeout_s);
  const Clock::time_point start = Clock::now();
  absl::Status init;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, size, id, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    init = absl::InternalError(absl::StrFormat(
        "NCCL communicator: ncclCommInitRankConfig on rank %d of %d (CUDA device %d) failed: %s",
        rank, size, device, NcclText(r, comm)));
  } else if (comm != nullptr) {
    const WaitResult w = WaitFor(comm, nullptr, start, timeout);
    if (w.kind == WaitResult::kTimeout) {
      init = absl::DeadlineExceededError(absl::StrFormat(
          "NCCL communicator: ncclCommInitRankConfig on rank %d of %d not complete after %.1f s: "
          "another rank may have died or hung (QUANTKV_COMM_TIMEOUT_S sets the limit, 0 waits "
          "forever)",
          rank, size, Seconds(w.waited)));
    } else if (w.kind != WaitResult::kDone) {
      init = absl::InternalError(absl::StrFormat(
          "NCCL communicator: ncclCommInitRankConfig on rank %d of %d (CUDA device %d) failed: %s",
          rank, size, device, NcclText(w.nccl, comm)));
    }
  } else {
    init =
        absl::InternalError("NCCL communicator: ncclCommInitRankConfig returned no communicator");
  }
  if (!init.ok() && comm != nullptr) {
    ncclCommAbort(comm);
    comm = nullptr;
  }
  // A rank whose init failed at once tells the others, which otherwise time out.
  if (absl::Status s = AgreeOnStatus(bootstrap, init); !s.ok()) {
    if (comm != nullptr) ncclCommAbort(comm);
    cleanup();
    return s;
  }
  Communicator* bootstrap_ptr = &bootstrap;
  return std::unique_ptr<Communicator>(std::make_unique<NcclCommunicator>(
      comm, stream, device, rank, size, timeout, bootstrap_ptr, std::move(owned)));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(
    Communicator& bootstrap, const NcclCommunicatorOptions& options) {
  return Create(bootstrap, nullptr, options);
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(
    std::unique_ptr<Communicator> bootstrap, const NcclCommunicatorOptions& options) {
  if (bootstrap == nullptr) {
    return absl::InvalidArgumentError("CreateNcclCommunicator: no bootstrap communicator");
  }
  Communicator& b = *bootstrap;
  return Create(b, std::move(bootstrap), options);
}

bool NcclAvailable() { return true; }

}  // namespace quantkv
