// CUDA runtime helpers shared by the CUDA kernels and their callers. The header has no CUDA
// types so that host-only code (and machines without a GPU) can include it.
#pragma once

#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace quantkv::kernels::cuda {

// Number of usable CUDA devices, or an error saying why none can be used (no driver, driver
// too old for this runtime, no device visible). Never aborts: machines without a GPU get a
// Status, not a crash.
absl::StatusOr<int> QueryCudaDeviceCount();

// QueryCudaDeviceCount() with every failure reported as 0 devices.
int CudaDeviceCount();

// OK for cudaSuccess; otherwise a Status naming `what` and the CUDA error. `error` is a
// cudaError_t passed as int so that this header needs no CUDA headers. Out-of-memory maps to
// ResourceExhausted and invalid arguments to InvalidArgument; everything else is Internal.
absl::Status CudaCheck(int error, std::string_view what);

}  // namespace quantkv::kernels::cuda
