// Where a model's tensors come from (GGUF file or HF safetensors directory), seen through
// one vocabulary: GGUF tensor names ("blk.3.attn_q.weight") and ggml dimension order
// (dims[0] contiguous). Q/K projections are in GGUF's row order (the HF -> GGUF permutation
// applied), so one RoPE convention serves both sources.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/ggml_types.h"
#include "runtime/model/model_config.h"

namespace quantkv {

struct WeightTensor {
  std::string name;
  std::vector<int64_t> dims;  // ggml order
  kernels::GgmlType type;
  const uint8_t* data = nullptr;  // valid as long as the source lives
  int64_t n_bytes = 0;
  int64_t n_elements() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
};

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual const ModelConfig& config() const = 0;
  // nullptr when absent.
  virtual const WeightTensor* Find(std::string_view gguf_name) const = 0;
  // The file or directory it was read from, for error messages.
  virtual const std::string& origin() const = 0;
};

}  // namespace quantkv
