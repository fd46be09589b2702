// CUDA grouped expert GEMM (the op is described in kernels/moe_grouped_gemm.h): two launches,
// each one tiled GEMM over all experts at once.
//   stage 1: act = silu(x gate_eᵀ) * (x up_eᵀ)   [rows x intermediate], SwiGLU in the epilogue
//   stage 2: y = row_weight * (act down_eᵀ)       [rows x hidden], router weight in the epilogue
// A thread block computes one 64 x 64 output tile in 16-wide k steps through shared memory;
// 256 threads, each accumulating a 4 x 4 sub-tile in fp32 (two of them in stage 1: gate and up
// share the x tile). Tile slots along grid x are numbered group by group, every group taking
// ceil(its rows / 64) of them, and a block finds its group by walking the offsets, so no tile
// mixes two experts and the host never reads the offsets or loops over the experts. Weights are
// bf16 (dequantized at load), widened to fp32 on their way into shared memory.
//
// Simple rather than fast. A faster version would keep bf16 in shared memory and multiply on
// tensor cores (mma.sync / wgmma on sm_90, with cp.async or TMA double buffering), convert the
// activations to bf16, precompute the tile -> group table once (a prefix sum over the offsets)
// instead of a walk per block, and size tiles per group, as CUTLASS's grouped GEMM does. The
// library route is cuBLAS's cublasGemmGroupedBatchedEx (CUDA 13's cuBLASLt has no grouped
// GEMM), but it takes the group sizes on the host (a device-to-host copy of the offsets per
// layer) and fuses no epilogue, so the SwiGLU and the router weight would be extra kernels.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/strings/str_format.h"
#include "kernels/cuda/device.h"
#include "kernels/fp16.h"
#include "kernels/moe_grouped_gemm.h"
#include "runtime/util/status_macros.h"

namespace quantkv::kernels::cuda {
namespace {

constexpr int kBM = 64;  // rows per tile
constexpr int kBN = 64;  // output columns per tile
constexpr int kBK = 16;  // k step
constexpr int kThreads = 256;
constexpr int kTM = kBM / 16;  // rows per thread (threads are a 16 x 16 grid)
constexpr int kTN = kBN / 16;  // columns per thread
static_assert(kBM * kBK == 4 * kThreads && kBN * kBK == 4 * kThreads, "4 loads per thread");

__device__ __forceinline__ float Bf16BitsToFloat(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

// The group and row range of tile slot `slot`, or false past the last tile. Offsets are
// clamped into [0, m] and each one to at least its predecessor, so malformed offsets cannot
// produce rows outside [0, m).
__device__ bool FindTile(const int64_t* __restrict__ offsets, int64_t n_groups, int64_t m,
                         int64_t slot, int64_t* group, int64_t* row_begin, int64_t* row_end) {
  int64_t first_slot = 0;
  int64_t begin = min(max(offsets[0], int64_t{0}), m);
  for (int64_t e = 0; e < n_groups; ++e) {
    const int64_t end = min(max(offsets[e + 1], begin), m);
    const int64_t tiles = (end - begin + kBM - 1) / kBM;
    if (slot < first_slot + tiles) {
      *group = e;
      *row_begin = begin + (slot - first_slot) * kBM;
      *row_end = end;
      return true;
    }
    first_slot += tiles;
    begin = end;
  }
  return false;
}

// out[r, c] for the rows r of each group e and columns c < n:
//   kSwiGlu:  silu(a[r] · b0_e[c]) * (a[r] · b1_e[c])
//   else:     row_weight[r] * (a[r] · b0_e[c])
// a: [m x k] fp32; b0, b1: [n_groups x n x k] bf16 bits; out: [m x n] fp32.
template <bool kSwiGlu>
__global__ void __launch_bounds__(kThreads)
    GroupedGemmKernel(const float* __restrict__ a, const int64_t* __restrict__ offsets,
                      int64_t n_groups, int64_t m, const uint16_t* __restrict__ b0,
                      const uint16_t* __restrict__ b1, const float* __restrict__ row_weight,
                      float* __restrict__ out, int64_t n, int64_t k) {
  // k-major tiles, padded by one column so that the transposing stores hit distinct banks.
  __shared__ float as[kBK][kBM + 1];
  __shared__ float bs0[kBK][kBN + 1];
  __shared__ float bs1[kSwiGlu ? kBK : 1][kSwiGlu ? kBN + 1 : 1];
  __shared__ int64_t tile[3];  // group, row_begin, row_end

  const int t = threadIdx.x;
  const int tx = t % 16;  // this thread's columns: tx + 16 j
  const int ty = t / 16;  // this thread's rows: ty + 16 i
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;

  if (t == 0) {
    int64_t g = -1, rb = 0, re = 0;
    FindTile(offsets, n_groups, m, blockIdx.x, &g, &rb, &re);  // g stays -1 past the last tile
    tile[0] = g;
    tile[1] = rb;
    tile[2] = re;
  }
  __syncthreads();
  const int64_t group = tile[0], row_begin = tile[1], row_end = tile[2];
  // The same for every thread of the block: all leave together (a slot past the last tile).
  if (group < 0) return;
  const uint16_t* w0 = b0 + group * n * k;
  const uint16_t* w1 = kSwiGlu ? b1 + group * n * k : nullptr;

  float acc0[kTM][kTN] = {};
  float acc1[kSwiGlu ? kTM : 1][kSwiGlu ? kTN : 1] = {};
  for (int64_t k0 = 0; k0 < k; k0 += kBK) {
    // Loads: 16 consecutive threads read 16 consecutive k of one row (coalesced), out of
    // bounds reads as 0.
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int idx = t + l * kThreads;
      const int r = idx / kBK;
      const int kk = idx % kBK;
      const int64_t col = k0 + kk;
      const int64_t row = row_begin + r;
      as[kk][r] = (row < row_end && col < k) ? a[row * k + col] : 0.0f;
      const int64_t wrow = n0 + r;  // kBN == kBM: the same r indexes the weight rows
      const bool in_w = wrow < n && col < k;
      bs0[kk][r] = in_w ? Bf16BitsToFloat(w0[wrow * k + col]) : 0.0f;
      if constexpr (kSwiGlu) bs1[kk][r] = in_w ? Bf16BitsToFloat(w1[wrow * k + col]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float av[kTM], bv0[kTN], bv1[kSwiGlu ? kTN : 1];
#pragma unroll
      for (int i = 0; i < kTM; ++i) av[i] = as[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        bv0[j] = bs0[kk][tx + 16 * j];
        if constexpr (kSwiGlu) bv1[j] = bs1[kk][tx + 16 * j];
      }
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
#pragma unroll
        for (int j = 0; j < kTN; ++j) {
          acc0[i][j] = fmaf(av[i], bv0[j], acc0[i][j]);
          if constexpr (kSwiGlu) acc1[i][j] = fmaf(av[i], bv1[j], acc1[i][j]);
        }
      }
    }
    __syncthreads();  // before the next step's loads overwrite the tiles
  }

  // Epilogue: consecutive threads write consecutive columns of a row.
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int64_t row = row_begin + ty + 16 * i;
    if (row >= row_end) continue;
    const float rw = kSwiGlu ? 1.0f : row_weight[row];
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col >= n) continue;
      if constexpr (kSwiGlu) {
        const float g = acc0[i][j];
        out[row * n + col] = g / (1.0f + expf(-g)) * acc1[i][j];
      } else {
        out[row * n + col] = rw * acc0[i][j];
      }
    }
  }
}

// Upper bound of the tile slots of any grouping of m rows into n_groups groups.
int64_t MaxSlots(int64_t m, int64_t n_groups) { return (m + kBM - 1) / kBM + n_groups; }

template <bool kSwiGlu>
absl::Status LaunchStage(const float* a, const int64_t* offsets, int64_t n_groups, int64_t m,
                         const uint16_t* b0, const uint16_t* b1, const float* row_weight,
                         float* out, int64_t n, int64_t k, cudaStream_t stream, const char* what) {
  const int64_t slots = MaxSlots(m, n_groups);
  const dim3 grid(static_cast<unsigned>(slots), static_cast<unsigned>((n + kBN - 1) / kBN));
  GroupedGemmKernel<kSwiGlu>
      <<<grid, kThreads, 0, stream>>>(a, offsets, n_groups, m, b0, b1, row_weight, out, n, k);
  return CudaCheck(cudaGetLastError(), what);
}

// A device allocation owned for the length of a call.
class DeviceArray {
 public:
  DeviceArray() = default;
  ~DeviceArray() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  absl::Status Allocate(size_t bytes, const char* what) {
    return CudaCheck(cudaMalloc(&ptr_, std::max<size_t>(bytes, 1)),
                     absl::StrFormat("cudaMalloc(%s, %d bytes)", what, bytes));
  }
  template <typename T>
  absl::Status Upload(absl::Span<const T> host, const char* what) {
    QKV_RETURN_IF_ERROR(Allocate(host.size() * sizeof(T), what));
    return CudaCheck(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
                     absl::StrFormat("cudaMemcpy(%s to device)", what));
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
};

}  // namespace

int64_t MoeGroupedFfnWorkspaceFloats(const MoeGroupedFfnShape& shape) {
  return shape.rows * shape.intermediate;
}

absl::Status MoeGroupedFfn(const MoeGroupedFfnDeviceConfig& c) {
  namespace in = moe_grouped_internal;
  constexpr std::string_view kOp = "cuda MoeGroupedFfn";
  const MoeGroupedFfnShape& s = c.shape;
  QKV_RETURN_IF_ERROR(in::CheckShape(kOp, s));
  if (s.rows == 0) return absl::OkStatus();
  const int64_t H = s.hidden, I = s.intermediate, E = s.n_experts;
  QKV_RETURN_IF_ERROR(in::CheckConfigArrays(kOp, c));
  const int64_t ws = MoeGroupedFfnWorkspaceFloats(s);
  if (c.workspace.data() == nullptr || static_cast<int64_t>(c.workspace.size()) < ws) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: workspace has %d floats at %p, want at least %d", kOp,
                        static_cast<int64_t>(c.workspace.size()), c.workspace.data(), ws));
  }
  // Grid x holds the row tile slots, grid y the column tiles of either stage.
  constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1, kMaxGridY = 65535;
  if (MaxSlots(s.rows, E) > kMaxGridX) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: %d rows in %d groups need more than %d row tiles", kOp, s.rows, E, kMaxGridX));
  }
  if ((std::max(H, I) + kBN - 1) / kBN > kMaxGridY) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: hidden %d / intermediate %d exceed %d columns", kOp, H, I, kMaxGridY * kBN));
  }
  auto* stream = static_cast<cudaStream_t>(c.stream);
  QKV_RETURN_IF_ERROR(LaunchStage<true>(c.x.data(), c.group_offsets.data(), E, s.rows,
                                        c.gate.data(), c.up.data(), nullptr, c.workspace.data(), I,
                                        H, stream, "cuda MoeGroupedFfn gate/up launch"));
  return LaunchStage<false>(c.workspace.data(), c.group_offsets.data(), E, s.rows, c.down.data(),
                            nullptr, c.row_weight.data(), c.y.data(), H, I, stream,
                            "cuda MoeGroupedFfn down launch");
}

absl::Status MoeGroupedFfnFromHost(const MoeGroupedFfnConfig& c) {
  namespace in = moe_grouped_internal;
  constexpr std::string_view kOp = "cuda MoeGroupedFfnFromHost";
  const MoeGroupedFfnShape& s = c.shape;
  QKV_RETURN_IF_ERROR(in::CheckShape(kOp, s));
  if (s.rows == 0) return absl::OkStatus();
  QKV_RETURN_IF_ERROR(in::CheckConfigArrays(kOp, c));
  QKV_RETURN_IF_ERROR(in::CheckOffsets(kOp, s, c.group_offsets));

  auto to_bf16 = [](absl::Span<const float> w) {
    std::vector<uint16_t> out(w.size());
    for (size_t i = 0; i < w.size(); ++i) out[i] = Fp32ToBf16(w[i]);
    return out;
  };
  const std::vector<uint16_t> gate16 = to_bf16(c.gate), up16 = to_bf16(c.up),
                              down16 = to_bf16(c.down);
  DeviceArray dx, doff, dgate, dup, ddown, dw, dy, dws;
  const int64_t ws = MoeGroupedFfnWorkspaceFloats(s);
  QKV_RETURN_IF_ERROR(dx.Upload(c.x, "x"));
  QKV_RETURN_IF_ERROR(doff.Upload(c.group_offsets, "group_offsets"));
  QKV_RETURN_IF_ERROR(dgate.Upload(absl::Span<const uint16_t>(gate16), "gate"));
  QKV_RETURN_IF_ERROR(dup.Upload(absl::Span<const uint16_t>(up16), "up"));
  QKV_RETURN_IF_ERROR(ddown.Upload(absl::Span<const uint16_t>(down16), "down"));
  QKV_RETURN_IF_ERROR(dw.Upload(c.row_weight, "row_weight"));
  QKV_RETURN_IF_ERROR(dy.Allocate(c.y.size() * sizeof(float), "y"));
  QKV_RETURN_IF_ERROR(dws.Allocate(static_cast<size_t>(ws) * sizeof(float), "workspace"));
  MoeGroupedFfnDeviceConfig d;
  d.shape = s;
  d.x = absl::MakeConstSpan(dx.as<float>(), c.x.size());
  d.group_offsets = absl::MakeConstSpan(doff.as<int64_t>(), c.group_offsets.size());
  d.gate = absl::MakeConstSpan(dgate.as<uint16_t>(), gate16.size());
  d.up = absl::MakeConstSpan(dup.as<uint16_t>(), up16.size());
  d.down = absl::MakeConstSpan(ddown.as<uint16_t>(), down16.size());
  d.row_weight = absl::MakeConstSpan(dw.as<float>(), c.row_weight.size());
  d.y = absl::MakeSpan(dy.as<float>(), c.y.size());
  d.workspace = absl::MakeSpan(dws.as<float>(), static_cast<size_t>(ws));
  d.stream = nullptr;
  QKV_RETURN_IF_ERROR(MoeGroupedFfn(d));
  QKV_RETURN_IF_ERROR(CudaCheck(cudaDeviceSynchronize(), "cuda MoeGroupedFfn kernels"));
  return CudaCheck(
      cudaMemcpy(c.y.data(), dy.as<float>(), c.y.size() * sizeof(float), cudaMemcpyDeviceToHost),
      "cudaMemcpy(y to host)");
}

}  // namespace quantkv::kernels::cuda
