// The storage format of cached keys and values, selected by `--kv`. The quantized codecs of
// the next milestone extend this list; each format reports its true size with metadata.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/attention.h"

namespace quantkv {

enum class KvFormat { kF32, kF16 };

absl::StatusOr<KvFormat> ParseKvFormat(std::string_view name);  // "fp32" | "fp16"
std::string_view KvFormatName(KvFormat f);
std::vector<std::string> KvFormatNames();
kernels::KvStorage KvFormatStorage(KvFormat f);
// Bits per cached element including all metadata (16 for fp16).
double KvFormatBitsPerElement(KvFormat f);

}  // namespace quantkv
