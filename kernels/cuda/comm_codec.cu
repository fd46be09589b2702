// The compressed exchange's pack and unpack kernels: CommCodec::Encode / Decode
// (kernels/cpu/comm_codec.cc) on the device, byte for byte and bit for bit.
//
// Encode: one warp per group (grid-stride over the groups). Lane l holds the group's values
// l, l + 32, l + 64 and l + 96 (those below group_size); `outliers` warp-wide argmax passes
// pick the outliers as PickOutliers does (largest |x|, lower index on ties, NaN never wins),
// then the KV codecs' quantizers, spelled one rounded operation at a time in
// kernels/kv_slab_format.h, code the rest. Block 0 writes the header.
// Decode: a check kernel copies the header and the first bad outlier index (if any) into a
// small stream-ordered scratch, the host reads it back and fails as the CPU does, then one
// thread per value decodes.
//
// NaN bits: GPU arithmetic returns one canonical NaN (0x7fffffff) where x86 returns the NaN
// operand quietened, or 0xffc00000 for an invalid operation such as 0 * inf. The CPU's fp8
// encoder keeps the sign of a NaN input in its code and the CPU decoders return the scale's
// NaN, so where a NaN can arise the kernels spell out x86's rule (X86Mul).
//
// All payload accesses are bytewise: the payload may lie at any address (its fp16 fields
// are at odd offsets for some geometries anyway). x and out must be float-aligned.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>

#include "absl/strings/str_format.h"
#include "kernels/comm_codec.h"
#include "kernels/cuda/device.h"
#include "kernels/kv_slab_format.h"

namespace quantkv::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kMaxBlocks = 1 << 16;  // beyond: grid-stride loops
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kSegment = kCommCodecSegmentGroups;
constexpr int64_t kHeader = kCommCodecHeaderBytes;
constexpr int64_t kMaxCount = int64_t{1} << 40;   // what ReadCommPayloadHeader accepts
constexpr uint16_t kHalfNaN = 0x7e00;             // comm_codec.cc's kFp16NaN
constexpr uint32_t kX86QuietNaN = 0x7fc00000u;    // std::numeric_limits<float>::quiet_NaN()
constexpr uint32_t kX86DefaultNaN = 0xffc00000u;  // x86's result of an invalid operation
constexpr int kTypeInt8 = static_cast<int>(CommCodecType::kInt8);
constexpr int kTypeInt4 = static_cast<int>(CommCodecType::kInt4);
constexpr int kTypeFp8 = static_cast<int>(CommCodecType::kFp8E4M3);

// Where a payload's parts lie (comm_codec.h's layout) and the quantizer's format.
struct Layout {
  int gs = 0, k = 0;
  int code_bytes = 0;  // one group's codes
  int64_t record = 0;  // codes + scale of one group
  int64_t n = 0, groups = 0;
  KvSlabFormat uniform;  // int8 / int4: the symmetric KV codec the CPU uses
};

Layout LayoutOf(const CommCodecConfig& c, int64_t n) {
  Layout L;
  const int bits = c.type == CommCodecType::kInt4 ? 4 : 8;
  L.gs = c.group_size;
  L.k = c.outliers;
  L.code_bytes = c.group_size * bits / 8;
  L.record = L.code_bytes + 2;
  L.n = n;
  L.groups = (n + c.group_size - 1) / c.group_size;
  L.uniform.kind = KvSlabKind::kUniform;
  L.uniform.bits = bits;
  L.uniform.symmetric = true;
  L.uniform.clip = 1.0f;
  return L;
}

unsigned Blocks(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(
      std::clamp<int64_t>((items + per_block - 1) / per_block, 1, kMaxBlocks));
}

__device__ __forceinline__ bool IsNan(float f) { return f != f; }
__device__ __forceinline__ bool IsFinite(float f) {
  return (__float_as_uint(f) & 0x7f800000u) != 0x7f800000u;
}
__device__ __forceinline__ bool IsInf(float f) {
  return (__float_as_uint(f) & 0x7fffffffu) == 0x7f800000u;
}

// a * b with x86's NaN bits: a NaN operand comes back quietened (the first one), an invalid
// product (0 * inf) is 0xffc00000.
__device__ __forceinline__ float X86Mul(float a, float b) {
  if (IsNan(a)) return __uint_as_float(__float_as_uint(a) | 0x00400000u);
  if (IsNan(b)) return __uint_as_float(__float_as_uint(b) | 0x00400000u);
  const float r = __fmul_rn(a, b);
  return IsNan(r) ? __uint_as_float(kX86DefaultNaN) : r;
}

// Group g's codes and fp16 scale: codes then scales per segment of kSegment groups.
template <typename Byte>
struct GroupAt {
  Byte* codes;
  Byte* scale;
};
template <typename Byte>
__device__ __forceinline__ GroupAt<Byte> GroupPlace(const Layout& L, Byte* payload, int64_t g) {
  const int64_t seg = g / kSegment;
  const int64_t j = g - seg * kSegment;
  const int64_t left = L.groups - seg * kSegment;
  const int64_t m = left < kSegment ? left : int64_t{kSegment};  // groups in this segment
  Byte* slab = payload + kHeader + seg * kSegment * L.record;
  return {slab + j * L.code_bytes, slab + m * L.code_bytes + 2 * j};
}

// ---------------------------------------------------------------- encode
template <int kType>
__global__ void __launch_bounds__(kThreads)
    EncodeKernel(const float* __restrict__ x, const Layout L, uint8_t* __restrict__ payload,
                 uint64_t head_lo, uint64_t head_hi) {
  if (blockIdx.x == 0 && threadIdx.x < kHeader) {
    const unsigned t = threadIdx.x;
    payload[t] = static_cast<uint8_t>((t < 8 ? head_lo >> (8 * t) : head_hi >> (8 * (t - 8))));
  }
  const int lane = threadIdx.x & 31;
  const int gs = L.gs;
  uint8_t* idx_out = payload + kHeader + L.groups * L.record;
  uint8_t* val_out = idx_out + L.groups * L.k;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  // g is the same for the whole warp, so every lane takes part in every shuffle below.
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
       g < L.groups; g += warps) {
    const int64_t first = g * gs;
    const int64_t len = L.n - first < gs ? L.n - first : gs;
    float v[4];
    bool ok = true;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int c = lane + 32 * i;
      v[i] = c < len ? x[first + c] : 0.0f;  // the CPU zero-pads the last group
      ok = ok && IsFinite(v[i]);
    }
    const bool finite = __all_sync(kFullMask, ok);

    // Outliers: k passes of "largest |x| not taken yet, lower index first".
    unsigned taken = 0;  // bit i: value lane + 32 i is an outlier
    for (int j = 0; j < L.k; ++j) {
      float best_abs = -1.0f;
      int best = -1;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = lane + 32 * i;
        if (c >= gs || (taken >> i & 1u)) continue;
        const float a = slab::AbsOf(v[i]);
        if (a > best_abs) {  // NaN never wins; ascending c keeps the lower index on ties
          best_abs = a;
          best = c;
        }
      }
      // A strict order on (|x| descending, index ascending): every lane ends with the max.
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const float oa = __shfl_xor_sync(kFullMask, best_abs, off);
        const int oc = __shfl_xor_sync(kFullMask, best, off);
        if (oa > best_abs || (oa == best_abs && oc < best)) {
          best_abs = oa;
          best = oc;
        }
      }
      if (best < 0) best = 0;  // only NaNs left: the CPU takes index 0 (again)
      if ((best & 31) == lane) {
        const int i = best >> 5;
        taken |= 1u << i;
        const float xv = i == 0 ? v[0] : i == 1 ? v[1] : i == 2 ? v[2] : v[3];
        const int64_t o = g * L.k + j;
        idx_out[o] = static_cast<uint8_t>(best);
        // A finite group has no repeated index, so xv is the value as the CPU stores it.
        slab::StoreU16(val_out + 2 * o, finite ? slab::HalfFromFloat(xv) : kHalfNaN);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (taken >> i & 1u) v[i] = 0.0f;  // out of the group's scale: it travels apart
    }

    // max |x| of the rest, NaN-blind (what both KV codecs' statistics come to when
    // symmetric); padding and lanes past the group hold 0.
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) amax = slab::MaxOf(amax, slab::AbsOf(v[i]));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      amax = slab::MaxOf(amax, __shfl_xor_sync(kFullMask, amax, off));
    }

    const GroupAt<uint8_t> at = GroupPlace(L, payload, g);
    uint16_t scale;
    if constexpr (kType == kTypeFp8) {
      // Fp8Codec::Encode: scale = Fp16RoundUp(clip * amax / 448), clip = 1.
      scale = slab::HalfRoundUp(slab::Div(amax, 448.0f));
      const float s = slab::HalfToFloat(scale);
      const float inv = s > 0.0f ? slab::Div(1.0f, s) : 0.0f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = lane + 32 * i;
        if (c < gs) at.codes[c] = slab::E4M3FromFloat(X86Mul(v[i], inv));
      }
    } else {
      // UniformCodec::Encode, symmetric: scale = Fp16RoundUp(clip * amax / qmax).
      constexpr int kBits = kType == kTypeInt4 ? 4 : 8;
      scale = slab::HalfRoundUp(slab::Div(amax, static_cast<float>((1 << (kBits - 1)) - 1)));
      const slab::Quantizer quantize(L.uniform, scale, 0);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = lane + 32 * i;
        const uint32_t q = quantize(v[i]);
        if constexpr (kBits == 8) {
          if (c < gs) at.codes[c] = static_cast<uint8_t>(q);
        } else {
          // Channel 2j in the low nibble of byte j; the odd channel is the next lane's.
          const uint32_t hi = __shfl_xor_sync(kFullMask, q, 1);
          if (c < gs && (lane & 1) == 0) at.codes[c >> 1] = static_cast<uint8_t>(q | hi << 4);
        }
      }
    }
    // A NaN scale makes every code of the group decode to NaN (comm_codec.h).
    if (lane == 0) slab::StoreU16(at.scale, finite ? scale : kHalfNaN);
  }
}

// ---------------------------------------------------------------- decode
// Copies the header to scratch[0, 16) and atomically keeps the least (position << 8 | index)
// of the outlier indices >= group_size in scratch[16, 24) (preset to all ones).
__global__ void __launch_bounds__(kThreads)
    CheckKernel(const uint8_t* __restrict__ payload, int64_t idx_offset, int64_t count, int gs,
                uint8_t* __restrict__ scratch) {
  if (blockIdx.x == 0 && threadIdx.x < kHeader) scratch[threadIdx.x] = payload[threadIdx.x];
  auto* bad = reinterpret_cast<unsigned long long*>(scratch + kHeader);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint8_t v = payload[idx_offset + i];
    if (v >= gs) atomicMin(bad, static_cast<unsigned long long>(i) << 8 | v);
  }
}

// x = (code - 2^(bits-1)) * s as the CPU decoders compute it, code * s + (-2^(bits-1) * s)
// (exact for finite s, so one rounding or two give the same), with x86's NaNs.
__device__ __forceinline__ float DecodeUniform(int code, float s, float offset) {
  if (IsNan(s)) return __uint_as_float(__float_as_uint(s) | 0x00400000u);
  if (IsInf(s)) return __uint_as_float(kX86DefaultNaN);  // inf - inf or 0 * inf
  return __fmaf_rn(static_cast<float>(code), s, __fmul_rn(-offset, s));
}

// e4m3(code) * s (exact), a NaN code giving the CPU's quiet NaN whatever the scale.
__device__ __forceinline__ float DecodeE4M3(uint8_t code, float s) {
  if ((code & 0x7fu) == 0x7fu) return __uint_as_float(kX86QuietNaN);
  return X86Mul(slab::E4M3ToFloat(code), s);
}

template <int kType>
__global__ void __launch_bounds__(kThreads)
    DecodeKernel(const uint8_t* __restrict__ payload, const Layout L, float* __restrict__ out) {
  const uint8_t* idx_in = payload + kHeader + L.groups * L.record;
  const uint8_t* val_in = idx_in + L.groups * L.k;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < L.n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = e / L.gs;
    const int c = static_cast<int>(e - g * L.gs);
    // The CPU stores the outliers over the decoded codes in order: the last equal index wins.
    int t = L.k - 1;
    while (t >= 0 && idx_in[g * L.k + t] != c) --t;
    float r;
    if (t >= 0) {
      r = slab::HalfToFloat(slab::LoadU16(val_in + 2 * (g * L.k + t)));  // bits kept, as Fp16ToFp32
    } else {
      const GroupAt<const uint8_t> at = GroupPlace(L, payload, g);
      const float s = slab::HalfToFloat(slab::LoadU16(at.scale));
      if constexpr (kType == kTypeFp8) {
        r = DecodeE4M3(at.codes[c], s);
      } else if constexpr (kType == kTypeInt4) {
        r = DecodeUniform((at.codes[c >> 1] >> ((c & 1) * 4)) & 0xf, s, 8.0f);
      } else {
        r = DecodeUniform(at.codes[c], s, 128.0f);
      }
    }
    out[e] = r;
  }
}

// Frees a stream-ordered allocation on every return path.
struct AsyncFree {
  void* ptr;
  cudaStream_t stream;
  ~AsyncFree() {
    if (ptr != nullptr) cudaFreeAsync(ptr, stream);
  }
};

}  // namespace

absl::Status CommEncode(const CommCodecConfig& config, const float* x, int64_t n, uint8_t* payload,
                        void* stream) {
  // Create checks the config with the CPU's words (and costs no device work).
  absl::StatusOr<std::unique_ptr<CommCodec>> codec = CommCodec::Create(config);
  if (!codec.ok()) return codec.status();
  if (n < 0 || n > kMaxCount) {
    return absl::InvalidArgumentError(
        absl::StrFormat("cuda CommEncode: %d values (a payload holds 0 to 2^40)", n));
  }
  if (payload == nullptr || (n > 0 && x == nullptr)) {
    return absl::InvalidArgumentError("cuda CommEncode: null input or payload");
  }
  const Layout L = LayoutOf(config, n);
  // "QKVA", version 1, type, group size, outliers; then n, little-endian as the CPU's memcpy.
  const uint64_t head_lo = uint64_t{'Q'} | uint64_t{'K'} << 8 | uint64_t{'V'} << 16 |
                           uint64_t{'A'} << 24 | uint64_t{1} << 32 |
                           uint64_t{static_cast<uint8_t>(config.type)} << 40 |
                           uint64_t{static_cast<uint8_t>(config.group_size)} << 48 |
                           uint64_t{static_cast<uint8_t>(config.outliers)} << 56;
  const uint64_t head_hi = static_cast<uint64_t>(n);
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = Blocks(L.groups, kWarpsPerBlock);  // >= 1: the header
  switch (config.type) {
    case CommCodecType::kInt8:
      EncodeKernel<kTypeInt8><<<blocks, kThreads, 0, s>>>(x, L, payload, head_lo, head_hi);
      break;
    case CommCodecType::kInt4:
      EncodeKernel<kTypeInt4><<<blocks, kThreads, 0, s>>>(x, L, payload, head_lo, head_hi);
      break;
    default:
      EncodeKernel<kTypeFp8><<<blocks, kThreads, 0, s>>>(x, L, payload, head_lo, head_hi);
      break;
  }
  return CudaCheck(cudaGetLastError(), "cuda CommEncode launch");
}

absl::Status CommDecode(const CommCodecConfig& config, const uint8_t* payload, int64_t bytes,
                        float* out, int64_t n, void* stream) {
  absl::StatusOr<std::unique_ptr<CommCodec>> codec = CommCodec::Create(config);
  if (!codec.ok()) return codec.status();
  if (bytes < kHeader) {
    // The CPU's error for a payload shorter than its header (nothing is read).
    const uint8_t none[kHeader] = {};
    return ReadCommPayloadHeader(none, bytes).status();
  }
  if (payload == nullptr || (n > 0 && out == nullptr)) {
    return absl::InvalidArgumentError("cuda CommDecode: null payload or output");
  }
  // The outlier indices can be checked where the caller's n and config place them inside
  // `bytes`; when they cannot, the header check below fails first (as on the CPU).
  const bool in_range = n >= 0 && n <= kMaxCount;
  const Layout L = LayoutOf(config, in_range ? n : 0);
  const bool check = in_range && bytes >= (*codec)->PayloadBytes(n);
  const int64_t idx_offset = kHeader + L.groups * L.record;
  const int64_t idx_count = check ? L.groups * L.k : 0;

  const auto s = static_cast<cudaStream_t>(stream);
  void* scratch_ptr = nullptr;
  if (absl::Status st =
          CudaCheck(cudaMallocAsync(&scratch_ptr, kHeader + 8, s), "cuda CommDecode scratch");
      !st.ok()) {
    return st;
  }
  const AsyncFree release{scratch_ptr, s};
  auto* scratch = static_cast<uint8_t*>(scratch_ptr);
  if (absl::Status st =
          CudaCheck(cudaMemsetAsync(scratch + kHeader, 0xff, 8, s), "cuda CommDecode memset");
      !st.ok()) {
    return st;
  }
  CheckKernel<<<Blocks(idx_count, kThreads), kThreads, 0, s>>>(payload, idx_offset, idx_count, L.gs,
                                                               scratch);
  if (absl::Status st = CudaCheck(cudaGetLastError(), "cuda CommDecode check launch"); !st.ok()) {
    return st;
  }
  uint8_t host[kHeader + 8];
  if (absl::Status st =
          CudaCheck(cudaMemcpyAsync(host, scratch, sizeof(host), cudaMemcpyDeviceToHost, s),
                    "cuda CommDecode header copy");
      !st.ok()) {
    return st;
  }
  if (absl::Status st = CudaCheck(cudaStreamSynchronize(s), "cuda CommDecode header sync");
      !st.ok()) {
    return st;
  }

  // CommCodec::Decode's checks, in its order and words.
  absl::StatusOr<CommPayloadHeader> h = ReadCommPayloadHeader(host, bytes);
  if (!h.ok()) return h.status();
  if (h->config.type != config.type || h->config.group_size != config.group_size ||
      h->config.outliers != config.outliers || h->n != n) {
    return absl::InvalidArgumentError(
        absl::StrFormat("comm payload holds %d values of %s, expected %d of %s", h->n,
                        h->config.ToString(), n, config.ToString()));
  }
  uint64_t bad = 0;
  for (int i = 0; i < 8; ++i) bad |= static_cast<uint64_t>(host[kHeader + i]) << (8 * i);
  if (bad != ~uint64_t{0}) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "comm payload: outlier index %d in a group of %d", static_cast<int>(bad & 0xff), L.gs));
  }
  if (n == 0) return absl::OkStatus();
  const unsigned blocks = Blocks(n, kThreads);
  switch (config.type) {
    case CommCodecType::kInt8:
      DecodeKernel<kTypeInt8><<<blocks, kThreads, 0, s>>>(payload, L, out);
      break;
    case CommCodecType::kInt4:
      DecodeKernel<kTypeInt4><<<blocks, kThreads, 0, s>>>(payload, L, out);
      break;
    default:
      DecodeKernel<kTypeFp8><<<blocks, kThreads, 0, s>>>(payload, L, out);
      break;
  }
  return CudaCheck(cudaGetLastError(), "cuda CommDecode launch");
}

}  // namespace quantkv::kernels::cuda
