// The NCCL communicator of a build without CUDA (QUANTKV_CUDA=OFF): it says so, on every rank.
#include "absl/status/status.h"
#include "runtime/comm/nccl_communicator.h"

namespace quantkv {
namespace {

absl::Status Unavailable() {
  return absl::UnimplementedError(
      "NCCL communicator: this quantkv was built without CUDA (QUANTKV_CUDA=OFF): rebuild with "
      "nvcc and NCCL to use --comm-backend nccl");
}

}  // namespace

// The real set-up's first collective is an AgreeOnStatus over `bootstrap`; taking part in it
// with this error means that a rank built with CUDA, grouped with this one, gets the error
// ("rank R: ...") instead of waiting for this rank in that agreement.
absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(
    Communicator& bootstrap, const NcclCommunicatorOptions& options) {
  (void)options;
  return AgreeOnStatus(bootstrap, Unavailable());
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(
    std::unique_ptr<Communicator> bootstrap, const NcclCommunicatorOptions& options) {
  if (bootstrap == nullptr) return Unavailable();
  return CreateNcclCommunicator(*bootstrap, options);
}

bool NcclAvailable() { return false; }

}  // namespace quantkv
