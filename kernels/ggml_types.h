// Weight storage formats as GGUF/ggml names them: type ids, block sizes and byte sizes.
// Kernels that consume these blocks (dequantize, quantized matmul) share this one table.
#pragma once

#include <cstdint>
#include <string_view>

#include "absl/status/statusor.h"

namespace quantkv::kernels {

enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kBF16 = 30,
};

struct GgmlTypeInfo {
  GgmlType type;
  std::string_view name;
  int block_size;      // elements per block
  int type_size;       // bytes per block
  bool dequantizable;  // DequantizeRow supports it
};

// Returns nullptr for a raw id that is not a known ggml type.
const GgmlTypeInfo* FindGgmlType(uint32_t raw_type);
const GgmlTypeInfo& GgmlTypeInfoOf(GgmlType type);

// Bytes of a row of n elements; an error when n is not a multiple of the block size.
absl::StatusOr<int64_t> GgmlRowBytes(GgmlType type, int64_t n);

}  // namespace quantkv::kernels
