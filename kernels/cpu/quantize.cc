#include "kernels/quantize.h"

#include <cstring>

#include "absl/strings/str_format.h"
#include "kernels/cpu/ggml_block_encode.h"
#include "kernels/dequantize.h"

namespace quantkv::kernels {

bool CanQuantizeTo(GgmlType type) {
  return type == GgmlType::kF32 || type == GgmlType::kF16 || type == GgmlType::kQ8_0 ||
         type == GgmlType::kQ4_0 || type == GgmlType::kQ4_1;
}

absl::Status QuantizeRow(GgmlType type, const float* src, void* dst, int64_t n) {
  if (!CanQuantizeTo(type)) {
    return absl::UnimplementedError(
        absl::StrFormat("quantize: cannot write %s weights (F32, F16, Q8_0, Q4_0, Q4_1)",
                        GgmlTypeInfoOf(type).name));
  }
  const int64_t block = GgmlTypeInfoOf(type).block_size;
  if (n < 0 || n % block != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("quantize: a %s row of %d values is not a whole number of %d-value blocks",
                        GgmlTypeInfoOf(type).name, n, block));
  }
  uint8_t* out = static_cast<uint8_t*>(dst);
  if (type == GgmlType::kF32) {
    std::memcpy(out, src, static_cast<size_t>(n) * sizeof(float));
    return absl::OkStatus();
  }
  if (type == GgmlType::kF16) {
    Fp32ToFp16Row(src, reinterpret_cast<uint16_t*>(out), n);
    return absl::OkStatus();
  }
  const int64_t block_bytes = *GgmlRowBytes(type, block);
  float xs[ggml_encode::kQK];
  for (int64_t b = 0; b < n / block; ++b) {
    for (int j = 0; j < ggml_encode::kQK; ++j) {
      const float v = src[b * block + j];
      xs[j] = v == v ? v : 0.0f;
    }
    uint8_t* blk = out + b * block_bytes;
    if (type == GgmlType::kQ8_0) ggml_encode::EncodeQ8_0(xs, blk);
    if (type == GgmlType::kQ4_0) ggml_encode::EncodeQ4_0(xs, blk);
    if (type == GgmlType::kQ4_1) ggml_encode::EncodeQ4_1(xs, blk);
  }
  return absl::OkStatus();
}

}  // namespace quantkv::kernels
