// CUDA dequantization: one thread per output element, decoding with the host/device-shared
// per-element code in dequantize_element.h (which a CPU unit test checks against the CPU
// reference). Weights are dequantized once at load time, so simplicity wins over bandwidth here.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "absl/strings/str_format.h"
#include "kernels/cuda/dequantize_element.h"
#include "kernels/cuda/device.h"
#include "kernels/dequantize.h"

namespace quantkv::kernels::cuda {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops keep the grid within limits for tensors of any size.
constexpr int64_t kMaxBlocks = 1 << 16;

template <GgmlType T, bool kBf16>
__global__ void DequantizeKernel(const uint8_t* __restrict__ src, void* __restrict__ dst,
                                 int64_t total) {
  using B = detail::Block<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t block = i / B::kElems;
    const int j = static_cast<int>(i - block * B::kElems);
    const float v = detail::DecodeElement<T>(src + block * B::kBytes, j);
    if constexpr (kBf16) {
      static_cast<uint16_t*>(dst)[i] = detail::FloatToBf16Bits(v);
    } else {
      static_cast<float*>(dst)[i] = v;
    }
  }
}

template <GgmlType T>
void Launch(const void* src, void* dst, bool bf16, int64_t total, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks);
  const auto* s = static_cast<const uint8_t*>(src);
  if (bf16) {
    DequantizeKernel<T, true>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(s, dst, total);
  } else {
    DequantizeKernel<T, false>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(s, dst, total);
  }
}

}  // namespace

absl::Status DequantizeRowsToBf16OrF32(GgmlType type, const void* src, int64_t rows, int64_t n,
                                       GgmlType out_type, void* dst, void* stream) {
  const GgmlTypeInfo* info = FindGgmlType(static_cast<uint32_t>(type));
  if (info == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrFormat("cuda dequantize: unknown ggml type id %d", static_cast<uint32_t>(type)));
  }
  if (out_type != GgmlType::kF32 && out_type != GgmlType::kBF16) {
    const GgmlTypeInfo* out = FindGgmlType(static_cast<uint32_t>(out_type));
    return absl::InvalidArgumentError(absl::StrFormat(
        "cuda dequantize: output type must be F32 or BF16, not %s",
        out != nullptr ? std::string(out->name)
                       : absl::StrFormat("id %d", static_cast<uint32_t>(out_type))));
  }
  if (rows < 0 || n < 0 || n % info->block_size != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cuda dequantize: %d rows of %d elements: n must be a non-negative multiple of the %s "
        "block size %d",
        rows, n, info->name, info->block_size));
  }
  const int64_t total = rows * n;
  const bool bf16 = out_type == GgmlType::kBF16;
  auto* s = static_cast<cudaStream_t>(stream);
  switch (type) {
    case GgmlType::kF32:
      if (total > 0) Launch<GgmlType::kF32>(src, dst, bf16, total, s);
      break;
    case GgmlType::kF16:
      if (total > 0) Launch<GgmlType::kF16>(src, dst, bf16, total, s);
      break;
    case GgmlType::kBF16:
      if (total > 0) Launch<GgmlType::kBF16>(src, dst, bf16, total, s);
      break;
    case GgmlType::kQ4_0:
      if (total > 0) Launch<GgmlType::kQ4_0>(src, dst, bf16, total, s);
      break;
    case GgmlType::kQ4_1:
      if (total > 0) Launch<GgmlType::kQ4_1>(src, dst, bf16, total, s);
      break;
    case GgmlType::kQ5_0:
      if (total > 0) Launch<GgmlType::kQ5_0>(src, dst, bf16, total, s);
      break;
    case GgmlType::kQ5_1:
      if (total > 0) Launch<GgmlType::kQ5_1>(src, dst, bf16, total, s);
      break;
    case GgmlType::kQ8_0:
      if (total > 0) Launch<GgmlType::kQ8_0>(src, dst, bf16, total, s);
      break;
    case GgmlType::kQ4_K:
      if (total > 0) Launch<GgmlType::kQ4_K>(src, dst, bf16, total, s);
      break;
    case GgmlType::kQ5_K:
      if (total > 0) Launch<GgmlType::kQ5_K>(src, dst, bf16, total, s);
      break;
    case GgmlType::kQ6_K:
      if (total > 0) Launch<GgmlType::kQ6_K>(src, dst, bf16, total, s);
      break;
    default:
      return absl::UnimplementedError(
          absl::StrFormat("cuda dequantize: ggml type %s is not supported", info->name));
  }
  // Nothing launched: no CUDA call whose error could be reported (and none to make without a
  // device).
  if (total == 0) return absl::OkStatus();
  return CudaCheck(cudaGetLastError(), absl::StrFormat("cuda dequantize %s launch", info->name));
}

}  // namespace quantkv::kernels::cuda
