// A GGUF file seen as a WeightSource: the architecture's hyper-parameters read from the
// `{arch}.*` metadata keys, tensors used in place from the memory map.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "runtime/model/gguf.h"
#include "runtime/model/weight_source.h"

namespace quantkv {

class GgufModel : public WeightSource {
 public:
  static absl::StatusOr<std::unique_ptr<GgufModel>> Open(
      const std::string& path, MappedFile::Mode mode = MappedFile::Mode::kMap);
  static absl::StatusOr<std::unique_ptr<GgufModel>> FromFile(std::unique_ptr<GgufFile> file);

  const ModelConfig& config() const override { return config_; }
  const WeightTensor* Find(std::string_view gguf_name) const override;
  const std::string& origin() const override { return file_->name(); }
  const GgufFile& gguf() const { return *file_; }

 private:
  GgufModel() = default;
  std::unique_ptr<GgufFile> file_;
  ModelConfig config_;
  absl::flat_hash_map<std::string, WeightTensor> tensors_;
};

// Reads ModelConfig from GGUF metadata; errors name the file and key.
absl::StatusOr<ModelConfig> ModelConfigFromGguf(const GgufFile& file);

}  // namespace quantkv
