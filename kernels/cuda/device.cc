#include "kernels/cuda/device.h"

#include <cuda_runtime_api.h>

#include "absl/strings/str_format.h"

namespace quantkv::kernels::cuda {

absl::StatusOr<int> QueryCudaDeviceCount() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    // Clear the error so that it does not surface from an unrelated later call.
    cudaGetLastError();
    return CudaCheck(err, "cudaGetDeviceCount");
  }
  return count;
}

int CudaDeviceCount() {
  absl::StatusOr<int> count = QueryCudaDeviceCount();
  return count.ok() ? *count : 0;
}

absl::Status CudaCheck(int error, std::string_view what) {
  const auto err = static_cast<cudaError_t>(error);
  if (err == cudaSuccess) return absl::OkStatus();
  const std::string message =
      absl::StrFormat("%s: %s (%s)", what, cudaGetErrorString(err), cudaGetErrorName(err));
  switch (err) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    case cudaErrorInvalidValue:
      return absl::InvalidArgumentError(message);
    default:
      return absl::InternalError(message);
  }
}

}  // namespace quantkv::kernels::cuda
