// Builds without the CUDA backend: the device forward says how to get one.
#include "absl/status/status.h"
#include "runtime/engine/device_forward.h"

namespace quantkv {
namespace {
constexpr char kNoCuda[] =
    "--device cuda: this build has no CUDA backend (configure with nvcc on PATH, or "
    "scripts/build.sh -DQUANTKV_CUDA=ON)";
}  // namespace

absl::StatusOr<DeviceInfo> OpenCudaDevice() { return absl::UnavailableError(kNoCuda); }

bool CudaDeviceUsable() { return false; }

absl::StatusOr<std::unique_ptr<DeviceForward>> CreateCudaForward(
    const WeightSource&, const ModelConfig&, const TensorShard&, const kernels::RopeTable&,
    const KvCache&, Communicator*, const DeviceForwardConfig&) {
  return absl::UnavailableError(kNoCuda);
}

}  // namespace quantkv
