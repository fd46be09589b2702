#include "kernels/ggml_types.h"

#include <array>

#include "absl/strings/str_format.h"

namespace quantkv::kernels {
namespace {

constexpr int kQK_K = 256;

constexpr std::array<GgmlTypeInfo, 15> kTypes = {{
    {GgmlType::kF32, "F32", 1, 4, true},
    {GgmlType::kF16, "F16", 1, 2, true},
    {GgmlType::kQ4_0, "Q4_0", 32, 2 + 16, true},
    {GgmlType::kQ4_1, "Q4_1", 32, 2 + 2 + 16, true},
    {GgmlType::kQ5_0, "Q5_0", 32, 2 + 4 + 16, true},
    {GgmlType::kQ5_1, "Q5_1", 32, 2 + 2 + 4 + 16, true},
    {GgmlType::kQ8_0, "Q8_0", 32, 2 + 32, true},
    {GgmlType::kQ8_1, "Q8_1", 32, 4 + 32, false},
    {GgmlType::kQ2_K, "Q2_K", kQK_K, kQK_K / 16 + kQK_K / 4 + 2 + 2, false},
    {GgmlType::kQ3_K, "Q3_K", kQK_K, kQK_K / 8 + kQK_K / 4 + 12 + 2, false},
    {GgmlType::kQ4_K, "Q4_K", kQK_K, 2 + 2 + 12 + kQK_K / 2, true},
    {GgmlType::kQ5_K, "Q5_K", kQK_K, 2 + 2 + 12 + kQK_K / 8 + kQK_K / 2, true},
    {GgmlType::kQ6_K, "Q6_K", kQK_K, kQK_K / 2 + kQK_K / 4 + kQK_K / 16 + 2, true},
    {GgmlType::kQ8_K, "Q8_K", kQK_K, 4 + kQK_K + kQK_K / 16 * 2, false},
    {GgmlType::kBF16, "BF16", 1, 2, true},
}};

}  // namespace

const GgmlTypeInfo* FindGgmlType(uint32_t raw_type) {
  for (const GgmlTypeInfo& info : kTypes) {
    if (static_cast<uint32_t>(info.type) == raw_type) return &info;
  }
  return nullptr;
}

const GgmlTypeInfo& GgmlTypeInfoOf(GgmlType type) {
  return *FindGgmlType(static_cast<uint32_t>(type));
}

absl::StatusOr<int64_t> GgmlRowBytes(GgmlType type, int64_t n) {
  const GgmlTypeInfo& info = GgmlTypeInfoOf(type);
  if (n < 0 || n % info.block_size != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "row of %d elements is not a multiple of the %s block size %d", n, info.name,
        info.block_size));
  }
  return n / info.block_size * info.type_size;
}

}  // namespace quantkv::kernels
