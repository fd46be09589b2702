// Writer for the safetensors format (the reader is runtime/model/safetensors.h): QuantKV
// writes its own fitted adapters this way so that the same files open in Python with the
// `safetensors` package. Only F32 tensors: fitted parameters are small, and F32 keeps them
// exact.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace quantkv {

struct SafetensorsOutTensor {
  std::string name;
  std::vector<int64_t> shape;  // row-major; the product must equal data.size()
  std::span<const float> data;
};

// Writes `tensors` (names unique, none "__metadata__") and `metadata` (the "__metadata__"
// string map, omitted when empty) to `path`, through a temporary file renamed into place so
// that a failed write never leaves a truncated file behind. Errors name the path or tensor.
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<SafetensorsOutTensor>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace quantkv
