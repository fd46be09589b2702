// The WikiText slice of tests/fixtures/smollm2/perplexity.json, tokenized with the default
// model's own tokenizer: the short text the model tests run on.
#pragma once

#include <fstream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "runtime/model/gguf_model.h"
#include "runtime/tokenizer/tokenizer.h"
#include "tests/testutil/paths.h"

namespace quantkv::testing {

inline absl::StatusOr<std::vector<int32_t>> FixtureTextIds(const std::string& model_path) {
  std::ifstream in(FixturePath("smollm2/perplexity.json"));
  if (!in) return absl::NotFoundError("tests/fixtures/smollm2/perplexity.json is missing");
  const std::string text = nlohmann::json::parse(in)["text"];
  absl::StatusOr<std::unique_ptr<GgufModel>> model = GgufModel::Open(model_path);
  if (!model.ok()) return model.status();
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::FromGguf((*model)->gguf());
  if (!tokenizer.ok()) return tokenizer.status();
  return (*tokenizer)->Encode(text);
}

}  // namespace quantkv::testing
