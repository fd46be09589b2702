#include "runtime/comm/communicator.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "runtime/comm/mpi_communicator.h"

namespace quantkv {

absl::Status LocalCommunicator::AllReduceSum(float* data, int64_t n) {
  if (n < 0) return absl::InvalidArgumentError("AllReduceSum: negative count");
  return absl::OkStatus();
}

absl::Status LocalCommunicator::AllGather(const void* send, int64_t bytes, void* recv) {
  if (bytes < 0) return absl::InvalidArgumentError("AllGather: negative size");
  if (bytes > 0 && send != recv) std::memmove(recv, send, static_cast<size_t>(bytes));
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
