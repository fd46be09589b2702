// GgufFile on the real default model (SmolLM2-135M-Instruct Q4_1) against what the gguf
// package's GGUFReader read from it (tests/fixtures/models/smollm2_gguf_reference.json):
// every metadata key with its type and value (array lengths, heads and tails), every tensor's
// name, type, dims, size and data offset. Skips when the model is not in the cache.
#include <filesystem>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/model/gguf.h"
#include "tests/model_loading/test_files.h"

namespace quantkv {
namespace {

using nlohmann::json;

std::string TypeName(GgufValueType t) {
  std::string s(GgufValueTypeName(t));
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

void ExpectValue(const GgufFile& f, const GgufKv& kv, const json& v) {
  switch (kv.type) {
    case GgufValueType::kString:
      EXPECT_EQ(kv.str, v.get<std::string>());
      break;
    case GgufValueType::kBool:
      EXPECT_EQ(kv.b, v.get<bool>());
      break;
    case GgufValueType::kFloat32:
    case GgufValueType::kFloat64:
      EXPECT_EQ(kv.f, v.get<double>());
      break;
    default: {
      auto i = f.GetInt(kv.key);
      ASSERT_TRUE(i.ok()) << i.status();
      EXPECT_EQ(*i, v.get<int64_t>());
    }
  }
}

void ExpectArrayElements(const GgufFile& f, const GgufKv& kv, const json& want, size_t first) {
  for (size_t j = 0; j < want.size(); ++j) {
    const size_t i = first + j;
    if (kv.elem_type == GgufValueType::kString) {
      ASSERT_LT(i, kv.strings.size());
      EXPECT_EQ(kv.strings[i], want[j].get<std::string>()) << kv.key << "[" << i << "]";
    } else if (kv.elem_type == GgufValueType::kFloat32 || kv.elem_type == GgufValueType::kFloat64) {
      auto a = f.GetFloatArray(kv.key);
      ASSERT_TRUE(a.ok()) << a.status();
      EXPECT_EQ((*a)[i], want[j].get<double>()) << kv.key << "[" << i << "]";
    } else if (kv.elem_type == GgufValueType::kBool) {
      EXPECT_EQ(kv.array_data[i] != 0, want[j].get<bool>()) << kv.key << "[" << i << "]";
    } else {
      auto a = f.GetIntArray(kv.key);
      ASSERT_TRUE(a.ok()) << a.status();
      EXPECT_EQ((*a)[i], want[j].get<int64_t>()) << kv.key << "[" << i << "]";
    }
  }
}

TEST(GgufDefaultModelTest, MatchesGgufReader) {
  const std::filesystem::path path = testing::DefaultModelPath();
  if (!std::filesystem::exists(path)) {
    GTEST_SKIP() << path << " is absent (run `quantkv fetch-model`)";
  }
  const json ref = testing::ReadJson(testing::ModelFixture("smollm2_gguf_reference.json"));
  ASSERT_EQ(std::filesystem::file_size(path), ref["size"].get<uint64_t>())
      << "the cached model is not the file the reference was made from";
  auto opened = GgufFile::Open(path.string());
  ASSERT_TRUE(opened.ok()) << opened.status();
  const GgufFile& f = **opened;
  EXPECT_EQ(f.version(), ref["version"].get<uint32_t>());
  EXPECT_EQ(f.alignment(), ref["alignment"].get<uint64_t>());
  ASSERT_EQ(f.metadata().size(), ref["n_kv"].get<size_t>());
  for (const auto& [key, want] : ref["kvs"].items()) {
    SCOPED_TRACE(key);
    const GgufKv* kv = f.Find(key);
    ASSERT_NE(kv, nullptr);
    ASSERT_EQ(TypeName(kv->type), want["type"].get<std::string>());
    if (kv->type != GgufValueType::kArray) {
      ExpectValue(f, *kv, want["value"]);
      continue;
    }
    EXPECT_EQ(TypeName(kv->elem_type), want["elem_type"].get<std::string>());
    ASSERT_EQ(kv->count, want["count"].get<uint64_t>());
    if (want.contains("head")) {
      ExpectArrayElements(f, *kv, want["head"], 0);
      ExpectArrayElements(f, *kv, want["tail"], kv->count - want["tail"].size());
    }
  }

  ASSERT_EQ(f.tensors().size(), ref["n_tensors"].get<size_t>());
  const json& tensors = ref["tensors"];
  // All data pointers are offsets into one map; the first tensor fixes its base.
  const uint8_t* base = f.tensors()[0].data - tensors[0]["data_offset"].get<size_t>();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const json& want = tensors[i];
    const std::string name = want["name"];
    SCOPED_TRACE(name);
    EXPECT_EQ(f.tensors()[i].name, name);  // file order
    const GgufTensor* t = f.FindTensor(name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(static_cast<uint32_t>(t->type), want["type"].get<uint32_t>());
    EXPECT_EQ(t->dims, want["dims"].get<std::vector<int64_t>>());
    EXPECT_EQ(t->n_bytes, want["n_bytes"].get<int64_t>());
    EXPECT_EQ(t->data - base, want["data_offset"].get<int64_t>());
  }

  // The facts the rest of QuantKV relies on (DESIGN.md "Real data").
  EXPECT_EQ(*f.GetString("general.architecture"), "llama");
  EXPECT_EQ(*f.GetInt("llama.block_count"), 30);
  EXPECT_EQ(*f.GetInt("llama.embedding_length"), 576);
  EXPECT_EQ(*f.GetInt("llama.attention.head_count"), 9);
  EXPECT_EQ(*f.GetInt("llama.attention.head_count_kv"), 3);
  EXPECT_EQ(f.GetStringArray("tokenizer.ggml.tokens")->size(), 49152u);
  EXPECT_EQ(f.FindTensor("output.weight"), nullptr);  // tied embeddings
  EXPECT_EQ(f.FindTensor("blk.0.attn_q.weight")->type, kernels::GgmlType::kQ4_1);
}

}  // namespace
}  // namespace quantkv
