// Reader for one safetensors file (the format HF save_pretrained writes) over a memory map:
// an 8-byte little-endian header length, a JSON header describing every tensor, then the
// packed tensor bytes. Only F32, F16 and BF16 tensors are accepted, since those are the
// dtypes LLaMA-family checkpoints ship in; every malformed input yields a Status naming the
// file and the tensor or field, and nothing is read past the end of the buffer.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "kernels/ggml_types.h"
#include "runtime/util/mapped_file.h"

namespace quantkv {

struct SafetensorsTensor {
  std::string name;
  std::string dtype;           // as written in the header: "F32", "F16" or "BF16"
  kernels::GgmlType type;      // the same dtype as a ggml type
  std::vector<int64_t> shape;  // row-major (PyTorch) order: shape.back() is contiguous
  const uint8_t* data = nullptr;
  int64_t n_elements = 0;
  int64_t n_bytes = 0;
  uint64_t offset = 0;  // relative to the start of the data section
};

class SafetensorsFile {
 public:
  // Headers larger than this are refused before parsing; the reference implementation uses
  // the same bound, so no legitimate file exceeds it.
  static constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

  // Maps and parses `path`.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // Parses a buffer that must outlive the result (fuzzing, tests). `name` labels errors.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Parse(std::span<const uint8_t> bytes,
                                                                std::string name);

  const std::string& name() const { return name_; }
  // Tensors in header order.
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  const SafetensorsTensor* Find(std::string_view name) const;
  // The optional "__metadata__" string map.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  absl::Status ParseAll(std::span<const uint8_t> bytes);

  std::unique_ptr<MappedFile> map_;
  std::string name_;
  std::vector<SafetensorsTensor> tensors_;
  absl::flat_hash_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace quantkv
