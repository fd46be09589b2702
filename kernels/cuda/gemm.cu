// The dense GEMM of the CUDA forward pass: y = x . w^T through cuBLAS.
//
// Layout. Everything here is row-major; cuBLAS is column-major. A row-major [r x c] matrix
// with row stride c is, byte for byte, the column-major [c x r] matrix (its transpose) with
// leading dimension c. So:
//   x, row-major [n x k]  = column-major X^T [k x n], ld k
//   w, row-major [m x k]  = column-major W^T [k x m], ld k
//   y, row-major [n x m]  = column-major Y^T [m x n], ld m
// and y = x . w^T is Y^T = W . X^T, i.e. the column-major GEMM C[m x n] = op(A)[m x k] .
// op(B)[k x n] with A = the w buffer read transposed (CUBLAS_OP_T, lda = k), B = the x buffer
// as is (CUBLAS_OP_N, ldb = k) and C = the y buffer (ldc = m). No copies or transposes are
// materialised; "accumulate" is beta = 1 (y += x . w^T), otherwise beta = 0, for which cuBLAS
// never reads C (so an uninitialised y is fine).
//
// Precision. fp32 weights use CUBLAS_COMPUTE_32F_PEDANTIC: true fp32 multiply-adds, which opts
// out of TF32 and of emulated fp32 (BF16x9) whatever the handle's math mode or the environment
// allow, so the result is the CPU reference's up to summation order. (On sm_80/sm_90 there is no
// faster fp32 path without TF32 anyway.) bf16 weights take bf16 activations: x is rounded to
// bf16 (round to nearest even, exactly Fp32ToBf16) into the caller's scratch, which must not
// overlap x or y, and the tensor cores multiply with fp32 accumulation (CUBLAS_COMPUTE_32F).
//
// cuBLAS uses its default per-handle workspace; a caller that captures Gemm into a CUDA graph
// should give the handle a fixed one (cublasSetWorkspace) first.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>

#include "absl/strings/str_format.h"
#include "kernels/cuda/dequantize_element.h"
#include "kernels/cuda/device.h"
#include "kernels/matmul.h"

namespace quantkv::kernels::cuda {
namespace {

constexpr int kThreads = 256;
// Elements beyond kMaxBlocks * kThreads (vectors of 4) are covered by a grid-stride loop.
constexpr int64_t kMaxBlocks = 4096;

// out[i] = bf16(x[i]) for i < count. kVec4: x is 16-byte and out 8-byte aligned, so four
// elements move per load/store; the count % 4 tail is done by the first threads of the grid.
template <bool kVec4>
__global__ void __launch_bounds__(kThreads)
    ToBf16Kernel(const float* __restrict__ x, uint16_t* __restrict__ out, int64_t count) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if constexpr (kVec4) {
    const int64_t vecs = count / 4;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    ushort4* out4 = reinterpret_cast<ushort4*>(out);
    for (int64_t i = tid; i < vecs; i += stride) {
      const float4 v = x4[i];
      out4[i] = make_ushort4(detail::FloatToBf16Bits(v.x), detail::FloatToBf16Bits(v.y),
                             detail::FloatToBf16Bits(v.z), detail::FloatToBf16Bits(v.w));
    }
    const int64_t tail = vecs * 4 + tid;
    if (tail < count) out[tail] = detail::FloatToBf16Bits(x[tail]);
  } else {
    for (int64_t i = tid; i < count; i += stride) out[i] = detail::FloatToBf16Bits(x[i]);
  }
}

absl::Status LaunchToBf16(const float* x, uint16_t* out, int64_t count, cudaStream_t stream) {
  const bool vec4 =
      reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 8 == 0;
  const int64_t units = vec4 ? std::max<int64_t>(count / 4, 1) : count;
  const auto blocks =
      static_cast<unsigned>(std::min((units + kThreads - 1) / kThreads, kMaxBlocks));
  if (vec4) {
    ToBf16Kernel<true><<<blocks, kThreads, 0, stream>>>(x, out, count);
  } else {
    ToBf16Kernel<false><<<blocks, kThreads, 0, stream>>>(x, out, count);
  }
  return CudaCheck(cudaGetLastError(), "cuda Gemm: bf16 conversion launch");
}

const char* WeightsName(GemmWeights weights) {
  switch (weights) {
    case GemmWeights::kF32:
      return "f32";
    case GemmWeights::kBF16:
      return "bf16";
  }
  return "unknown";
}

std::string Shape(GemmWeights weights, int64_t n, int64_t k, int64_t m) {
  return absl::StrFormat("%s weights, n=%d k=%d m=%d", WeightsName(weights), n, k, m);
}

// OK for CUBLAS_STATUS_SUCCESS; otherwise a Status naming `what` and the cuBLAS error.
absl::Status CublasCheck(cublasStatus_t status, const std::string& what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const std::string message = absl::StrFormat("%s: %s (%s)", what, cublasGetStatusString(status),
                                              cublasGetStatusName(status));
  switch (status) {
    case CUBLAS_STATUS_ALLOC_FAILED:
      return absl::ResourceExhaustedError(message);
    case CUBLAS_STATUS_INVALID_VALUE:
      return absl::InvalidArgumentError(message);
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return absl::FailedPreconditionError(message);
    case CUBLAS_STATUS_ARCH_MISMATCH:
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return absl::UnimplementedError(message);
    default:
      return absl::InternalError(message);
  }
}

// Binds the handle to `stream`. Gemm passes alpha and beta from the host; the math mode is
// set explicitly so that the handle never allows TF32 for calls that follow the handle's mode
// (Gemm's fp32 path does not anyway: it asks for pedantic fp32).
absl::Status ConfigureHandle(cublasHandle_t handle, cudaStream_t stream) {
  if (absl::Status s = CublasCheck(cublasSetStream(handle, stream), "cublasSetStream"); !s.ok()) {
    return s;
  }
  if (absl::Status s = CublasCheck(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST),
                                   "cublasSetPointerMode");
      !s.ok()) {
    return s;
  }
  return CublasCheck(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
}

// Everything that can be checked without touching the GPU, so that it also runs without one.
absl::Status CheckGemmArgs(void* cublas, const float* x, const void* w, GemmWeights weights,
                           float* y, int64_t n, int64_t k, int64_t m, const void* scratch,
                           int64_t scratch_bytes) {
  // Built only for an error: the checks run on every call.
  auto shape = [&] { return Shape(weights, n, k, m); };
  if (weights != GemmWeights::kF32 && weights != GemmWeights::kBF16) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cuda Gemm: unknown weight type %d (n=%d k=%d m=%d)", static_cast<int>(weights), n, k, m));
  }
  if (n < 0 || k < 0 || m < 0) {
    return absl::InvalidArgumentError(absl::StrCat("cuda Gemm: negative shape (", shape(), ")"));
  }
  // cuBLAS takes int dimensions and leading dimensions.
  if (n > INT_MAX || k > INT_MAX || m > INT_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda Gemm: a dimension exceeds cuBLAS's int range (", shape(), ")"));
  }
  if (scratch_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("cuda Gemm: negative scratch_bytes %d (%s)", scratch_bytes, shape()));
  }
  if (n == 0 || m == 0) return absl::OkStatus();  // nothing is read or written
  if (cublas == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda Gemm: null cuBLAS handle (", shape(), ")"));
  }
  if (y == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("cuda Gemm: null y (", shape(), ")"));
  }
  if (k == 0) return absl::OkStatus();  // y = 0 (or unchanged); x and w are not read
  if (x == nullptr || w == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("cuda Gemm: null x or w (", shape(), ")"));
  }
  const int64_t needed = GemmScratchBytes(weights, n, k);
  if (scratch_bytes < needed) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cuda Gemm: scratch of %d bytes, need %d (%s)", scratch_bytes, needed, shape()));
  }
  if (needed > 0 && scratch == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("cuda Gemm: null scratch (", shape(), ")"));
  }
  if (needed > 0 && reinterpret_cast<uintptr_t>(scratch) % alignof(uint16_t) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda Gemm: scratch is not 2-byte aligned (", shape(), ")"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<void*> CreateCublasHandle(void* stream) {
  cublasHandle_t handle = nullptr;
  const cublasStatus_t created = cublasCreate(&handle);
  if (created != CUBLAS_STATUS_SUCCESS) {
    // cublasCreate goes through the runtime; do not let its failure (no driver, no device)
    // surface from an unrelated later CUDA call.
    cudaGetLastError();
    return CublasCheck(created, "cublasCreate");
  }
  if (absl::Status s = ConfigureHandle(handle, static_cast<cudaStream_t>(stream)); !s.ok()) {
    cublasDestroy(handle);
    return s;
  }
  return static_cast<void*>(handle);
}

void DestroyCublasHandle(void* handle) {
  if (handle != nullptr) cublasDestroy(static_cast<cublasHandle_t>(handle));
}

int64_t GemmScratchBytes(GemmWeights weights, int64_t n, int64_t k) {
  if (weights != GemmWeights::kBF16 || n <= 0 || k <= 0) return 0;
  constexpr int64_t kBytes = sizeof(uint16_t);
  if (n > INT64_MAX / kBytes / k) return INT64_MAX;  // saturate rather than overflow
  return n * k * kBytes;
}

absl::Status Gemm(void* cublas, const float* x, const void* w, GemmWeights weights, float* y,
                  int64_t n, int64_t k, int64_t m, bool accumulate, void* scratch,
                  int64_t scratch_bytes) {
  if (absl::Status s = CheckGemmArgs(cublas, x, w, weights, y, n, k, m, scratch, scratch_bytes);
      !s.ok()) {
    return s;
  }
  if (n == 0 || m == 0) return absl::OkStatus();
  auto handle = static_cast<cublasHandle_t>(cublas);
  // Error messages name the call and the shape; built only on failure (Gemm runs ~200 times a
  // decode step).
  auto check = [&](cublasStatus_t status, const char* call) {
    if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
    return CublasCheck(status, absl::StrCat("cuda Gemm (", Shape(weights, n, k, m), "): ", call));
  };
  cudaStream_t stream = nullptr;
  if (absl::Status s = check(cublasGetStream(handle, &stream), "cublasGetStream"); !s.ok()) {
    return s;
  }
  if (k == 0) {
    // An empty sum: y = 0, or y unchanged when accumulating. cuBLAS rejects lda = 0.
    if (accumulate) return absl::OkStatus();
    const cudaError_t err =
        cudaMemsetAsync(y, 0, static_cast<size_t>(n * m) * sizeof(float), stream);
    if (err == cudaSuccess) return absl::OkStatus();
    return CudaCheck(err,
                     absl::StrCat("cuda Gemm (", Shape(weights, n, k, m), "): cudaMemsetAsync"));
  }
  const float alpha = 1.0f;
  const float beta = accumulate ? 1.0f : 0.0f;
  const int in = static_cast<int>(n), ik = static_cast<int>(k), im = static_cast<int>(m);
  if (weights == GemmWeights::kF32) {
    return check(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, im, in, ik, &alpha, w, CUDA_R_32F,
                              ik, x, CUDA_R_32F, ik, &beta, y, CUDA_R_32F, im,
                              CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx");
  }
  auto* x16 = static_cast<uint16_t*>(scratch);
  if (absl::Status s = LaunchToBf16(x, x16, n * k, stream); !s.ok()) return s;
  return check(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, im, in, ik, &alpha, w, CUDA_R_16BF,
                            ik, x16, CUDA_R_16BF, ik, &beta, y, CUDA_R_32F, im, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx");
}

}  // namespace quantkv::kernels::cuda
