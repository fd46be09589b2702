#include "runtime/comm/communicator.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "runtime/comm/mpi_communicator.h"

namespace quantkv {

ChunkRange ReduceScatterChunk(int64_t n, int ranks, int r) {
  const int64_t base = n / ranks, extra = n % ranks;
  const int64_t begin = r * base + std::min<int64_t>(r, extra);
  return {begin, begin + base + (r < extra ? 1 : 0)};
}

absl::Status LocalCommunicator::AllReduceSum(float* data, int64_t n) {
  if (n < 0) return absl::InvalidArgumentError("AllReduceSum: negative count");
  return absl::OkStatus();
}

absl::Status LocalCommunicator::AllGather(const void* send, int64_t bytes, void* recv) {
  if (bytes < 0) return absl::InvalidArgumentError("AllGather: negative size");
  if (bytes > 0 && send != recv) std::memmove(recv, send, static_cast<size_t>(bytes));
  return absl::OkStatus();
}

absl::Status LocalCommunicator::ReduceScatterSum(const float* send, int64_t n, float* recv) {
  if (n < 0) return absl::InvalidArgumentError("ReduceScatterSum: negative count");
  if (n > 0 && send != recv) std::memmove(recv, send, static_cast<size_t>(n) * sizeof(float));
  return absl::OkStatus();
}

absl::Status LocalCommunicator::AllToAllV(const void* send, std::span<const int64_t> send_bytes,
                                          std::vector<uint8_t>* recv,
                                          std::vector<int64_t>* recv_bytes) {
  std::vector<int64_t> matrix;
  if (absl::Status s = ExchangeAllToAllCounts(*this, send_bytes, 0, &matrix); !s.ok()) return s;
  recv->resize(static_cast<size_t>(matrix[0]));
  recv_bytes->assign(1, matrix[0]);
  if (matrix[0] > 0) std::memcpy(recv->data(), send, static_cast<size_t>(matrix[0]));
  return absl::OkStatus();
}

absl::Status LocalCommunicator::Broadcast(void* data, int64_t bytes, int root) {
  if (root != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Broadcast: root %d outside a group of 1", root));
  }
  return absl::OkStatus();
}

void LocalCommunicator::Abort(int exit_code) { std::exit(exit_code); }

namespace {
std::mutex& AbortHookMutex() {
  static std::mutex mu;
  return mu;
}
std::function<void(std::string_view)>& AbortHook() {
  static std::function<void(std::string_view)> hook;
  return hook;
}
}  // namespace

void SetBeforeJobAbortHook(std::function<void(std::string_view reason)> hook) {
  std::lock_guard<std::mutex> lock(AbortHookMutex());
  AbortHook() = std::move(hook);
}

void RunBeforeJobAbortHook(std::string_view reason) {
  std::function<void(std::string_view)> hook;
  {
    std::lock_guard<std::mutex> lock(AbortHookMutex());
    hook = AbortHook();
  }
  if (hook) hook(reason);
}

int LauncherWorldSize() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"}) {
    const char* v = std::getenv(var);
    int n = 0;
    if (v != nullptr && absl::SimpleAtoi(v, &n) && n > 0) return n;
  }
  return 0;
}

int LauncherRank() {
  for (const char* var : {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"}) {
    const char* v = std::getenv(var);
    int r = 0;
    if (v != nullptr && absl::SimpleAtoi(v, &r) && r >= 0) return r;
  }
  return 0;
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateCommunicator() {
  if (LauncherWorldSize() > 0) return CreateMpiCommunicator();
  return std::make_unique<LocalCommunicator>();
}

void SumGatheredInRankOrder(const float* gathered, int64_t n, int size, float* data) {
  for (int64_t i = 0; i < n; ++i) {
    float sum = gathered[i];
    for (int r = 1; r < size; ++r) sum += gathered[static_cast<size_t>(r) * n + i];
    data[i] = sum;
  }
}

absl::Status ExchangeAllToAllCounts(Communicator& comm, std::span<const int64_t> send_bytes,
                                    int64_t max_rank_bytes, std::vector<int64_t>* matrix) {
  const int p = comm.size();
  // The local verdict travels in the exchange itself: a rank with a bad list sends -1
  // everywhere, which every rank reads as "that rank's arguments are bad".
  absl::Status local;
  if (static_cast<int64_t>(send_bytes.size()) != p) {
    local = absl::InvalidArgumentError(absl::StrFormat(
        "AllToAllV: send_bytes has %d entries, the group has %d ranks", send_bytes.size(), p));
  } else {
    for (int q = 0; q < p && local.ok(); ++q) {
      if (send_bytes[q] < 0) {
        local = absl::InvalidArgumentError(
            absl::StrFormat("AllToAllV: send_bytes[%d] = %d is negative", q, send_bytes[q]));
      }
    }
  }
  std::vector<int64_t> mine(static_cast<size_t>(p), -1);
  if (local.ok()) std::copy(send_bytes.begin(), send_bytes.end(), mine.begin());
  matrix->assign(static_cast<size_t>(p) * p, 0);
  if (absl::Status s =
          comm.AllGather(mine.data(), p * static_cast<int64_t>(sizeof(int64_t)), matrix->data());
      !s.ok()) {
    return s;
  }
  if (!local.ok()) return local;
  for (int r = 0; r < p; ++r) {
    if ((*matrix)[static_cast<size_t>(r) * p] < 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "AllToAllV: rank %d passed invalid send counts (its error names them); no data moved",
          r));
    }
  }
  if (max_rank_bytes > 0) {
    for (int r = 0; r < p; ++r) {
      int64_t out = 0, in = 0;
      for (int q = 0; q < p; ++q) {
        out += (*matrix)[static_cast<size_t>(r) * p + q];
        in += (*matrix)[static_cast<size_t>(q) * p + r];
      }
      if (out > max_rank_bytes || in > max_rank_bytes) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "AllToAllV: rank %d would send %d and receive %d bytes, above this transport's %d "
            "per call",
            r, out, in, max_rank_bytes));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CheckSameCount(Communicator& comm, int64_t n, int64_t max_n, const char* what) {
  std::vector<int64_t> all(static_cast<size_t>(comm.size()));
  if (absl::Status s = comm.AllGather(&n, sizeof(n), all.data()); !s.ok()) return s;
  for (int r = 0; r < comm.size(); ++r) {
    if (all[r] < 0 || all[r] > max_n) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: rank %d's count %d is outside [0, %d]", what, r, all[r], max_n));
    }
    if (all[r] != all[0]) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: rank %d passed n = %d, rank 0 n = %d; every rank must pass the same n", what, r,
          all[r], all[0]));
    }
  }
  return absl::OkStatus();
}

absl::Status AgreeOnStatus(Communicator& comm, const absl::Status& local) {
  // A fixed-size record per rank: the status code and the start of its message.
  struct Record {
    int32_t code;
    char message[500];
  };
  Record mine{};
  mine.code = static_cast<int32_t>(local.code());
  const std::string msg(local.message());
  std::memcpy(mine.message, msg.data(), std::min(msg.size(), sizeof(mine.message) - 1));
  std::vector<Record> all(comm.size());
  if (absl::Status s = comm.AllGather(&mine, sizeof(Record), all.data()); !s.ok()) return s;
  for (int r = 0; r < comm.size(); ++r) {
    if (all[r].code != 0) {
      all[r].message[sizeof(all[r].message) - 1] = '\0';
      return absl::Status(static_cast<absl::StatusCode>(all[r].code),
                          absl::StrFormat("rank %d: %s", r, all[r].message));
    }
  }
  return absl::OkStatus();
}

}  // namespace quantkv
