// GGUF v2/v3 reader over a memory map: metadata key/values of every type and tensor
// descriptors pointing into the map. Every malformed input yields a Status naming the file
// and the field; nothing is read past the end of the buffer.
#pragma once

#include <cstdint>
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

enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

std::string_view GgufValueTypeName(GgufValueType type);

// One metadata entry. Scalars are decoded; arrays keep a pointer to their packed elements
// (strings are indexed once so vocabularies are zero-copy views into the map).
struct GgufKv {
  std::string key;
  GgufValueType type;
  GgufValueType elem_type = GgufValueType::kUint8;  // arrays only
  uint64_t count = 0;                               // arrays only
  // Scalar payloads (whichever matches `type`).
  int64_t i = 0;
  uint64_t u = 0;
  double f = 0.0;
  bool b = false;
  std::string_view str;
  // Arrays: raw little-endian elements of a fixed-size type, or string views.
  const uint8_t* array_data = nullptr;
  std::vector<std::string_view> strings;
};

struct GgufTensor {
  std::string name;
  std::vector<int64_t> dims;  // ggml order: dims[0] is contiguous (a row), dims[1] rows, ...
  kernels::GgmlType type;
  uint64_t offset = 0;     // relative to the data section
  int64_t n_elements = 0;
  int64_t n_bytes = 0;
  const uint8_t* data = nullptr;
  int64_t rows() const { return n_elements / (dims.empty() ? 1 : dims[0]); }
  int64_t row_elements() const { return dims.empty() ? 1 : dims[0]; }
};

class GgufFile {
 public:
  // Maps (or, with kHugeCopy, reads) and parses `path`.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(
      const std::string& path, MappedFile::Mode mode = MappedFile::Mode::kMap);
  // Parses a buffer that must outlive the result (fuzzing, tests). `name` labels errors.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Parse(std::span<const uint8_t> bytes,
                                                        std::string name);

  uint32_t version() const { return version_; }
  const std::string& name() const { return name_; }
  uint64_t alignment() const { return alignment_; }

  const std::vector<GgufKv>& metadata() const { return kvs_; }
  const GgufKv* Find(std::string_view key) const;
  bool Has(std::string_view key) const { return Find(key) != nullptr; }

  // Typed getters; errors name the key and the actual type. Integer getters accept any
  // integer type whose value fits.
  absl::StatusOr<std::string> GetString(std::string_view key) const;
  absl::StatusOr<int64_t> GetInt(std::string_view key) const;
  absl::StatusOr<double> GetFloat(std::string_view key) const;
  absl::StatusOr<bool> GetBool(std::string_view key) const;
  absl::StatusOr<std::vector<std::string_view>> GetStringArray(std::string_view key) const;
  absl::StatusOr<std::vector<double>> GetFloatArray(std::string_view key) const;
  absl::StatusOr<std::vector<int64_t>> GetIntArray(std::string_view key) const;
  // Defaults when absent (but still an error when present with a wrong type).
  absl::StatusOr<int64_t> GetIntOr(std::string_view key, int64_t fallback) const;
  absl::StatusOr<double> GetFloatOr(std::string_view key, double fallback) const;
  absl::StatusOr<std::string> GetStringOr(std::string_view key, std::string fallback) const;
  absl::StatusOr<bool> GetBoolOr(std::string_view key, bool fallback) const;

  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const GgufTensor* FindTensor(std::string_view name) const;
  absl::StatusOr<const GgufTensor*> GetTensor(std::string_view name) const;

 private:
  GgufFile() = default;
  absl::Status ParseAll(std::span<const uint8_t> bytes);

  std::unique_ptr<MappedFile> map_;
  std::string name_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::vector<GgufKv> kvs_;
  absl::flat_hash_map<std::string, size_t> kv_index_;
  std::vector<GgufTensor> tensors_;
  absl::flat_hash_map<std::string, size_t> tensor_index_;
};

}  // namespace quantkv
