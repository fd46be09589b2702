// OpenHfModelDir on tiny models saved by transformers (tools/fixtures/make_model_fixtures.py):
// config parsing, HF -> GGUF names and dims, the llama.cpp Q/K permutation checked against
// numpy's, sharded == single-file, qwen2 left unpermuted; and every kind of bad input (config,
// index, tensors) giving a Status that names the file and field.
#include "runtime/model/hf_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "kernels/fp16.h"
#include "runtime/model/safetensors.h"
#include "tests/model_loading/test_files.h"

namespace quantkv {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::ModelFixture;
using testing::ReadJson;
using testing::ReadText;
using testing::SafetensorsBuilder;
using testing::ScratchDir;
using testing::WriteText;

float At(const WeightTensor& t, int64_t i) {
  if (t.type == kernels::GgmlType::kF32) {
    float f;
    std::memcpy(&f, t.data + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, t.data + 2 * i, 2);
  return t.type == kernels::GgmlType::kBF16 ? kernels::Bf16ToFp32(h) : kernels::Fp16ToFp32(h);
}

std::unique_ptr<WeightSource> OpenOrDie(const std::string& name) {
  auto s = OpenHfModelDir(ModelFixture(name).string());
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

bool IsQk(const std::string& gguf_name) {
  return gguf_name.find("attn_q.") != std::string::npos ||
         gguf_name.find("attn_k.") != std::string::npos;
}

// Every tensor of `listing_dir` (as the safetensors package read it) must be present under
// its GGUF name with reversed dims and, unless permuted, the same leading values.
void ExpectTensorsMapped(const WeightSource& src, const std::string& listing_dir,
                         kernels::GgmlType type, bool qk_permuted) {
  const json listing = ReadJson(ModelFixture("tiny_model_tensors.json"))[listing_dir];
  ASSERT_FALSE(listing.empty());
  for (const auto& [hf_name, w] : listing.items()) {
    SCOPED_TRACE(hf_name);
    const std::optional<std::string> gguf = HfToGgufName(hf_name);
    ASSERT_TRUE(gguf.has_value());
    const WeightTensor* t = src.Find(*gguf);
    ASSERT_NE(t, nullptr) << *gguf;
    EXPECT_EQ(t->name, *gguf);
    std::vector<int64_t> dims = w["shape"].get<std::vector<int64_t>>();
    std::reverse(dims.begin(), dims.end());
    EXPECT_EQ(t->dims, dims);
    EXPECT_EQ(t->type, type);
    EXPECT_EQ(t->n_bytes, t->n_elements() * (type == kernels::GgmlType::kF32 ? 4 : 2));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t->data) % (type == kernels::GgmlType::kF32 ? 4 : 2), 0u);
    if (qk_permuted && IsQk(*gguf)) continue;
    const std::vector<float> head = w["head"].get<std::vector<float>>();
    for (size_t i = 0; i < head.size(); ++i) EXPECT_EQ(At(*t, i), head[i]) << i;
  }
}

// Rows of the permuted projections against numpy's llama.cpp permutation of the f32 weights.
// `tol` is relative: 0 for f32, bf16's half-ulp for bf16 (the f32 rows rounded once).
void ExpectPermutedRows(const WeightSource& src, double tol) {
  const json perm = ReadJson(ModelFixture("tiny_llama_permuted.json"));
  ASSERT_EQ(perm["tensors"].size(), 4u);
  for (const auto& [name, want] : perm["tensors"].items()) {
    SCOPED_TRACE(name);
    const WeightTensor* t = src.Find(name);
    ASSERT_NE(t, nullptr);
    ASSERT_EQ(t->dims, want["dims"].get<std::vector<int64_t>>());
    const int64_t cols = t->dims[0];
    const int64_t rows = t->dims[1];
    const auto& heads = want["row_head"];
    const auto& sums = want["row_sum"];
    ASSERT_EQ(static_cast<int64_t>(heads.size()), rows);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < 4; ++c) {
        const double w = heads[r][c].get<double>();
        const double got = At(*t, r * cols + c);
        if (tol == 0) {
          ASSERT_EQ(got, w) << "row " << r << " col " << c;
        } else {
          ASSERT_NEAR(got, w, std::abs(w) * tol + 1e-30) << "row " << r << " col " << c;
        }
      }
      double sum = 0;
      for (int64_t c = 0; c < cols; ++c) sum += At(*t, r * cols + c);
      const double w = sums[r].get<double>();
      // bf16 rounding errors of up to |x| * 2^-9 per element partly cancel; bound by the sum
      // of magnitudes, which for these N(0, 0.15) weights stays under ~10.
      ASSERT_NEAR(sum, w, tol == 0 ? 1e-5 : 10 * tol) << "row " << r;
    }
  }
}

TEST(HfModelTest, TinyLlamaF32) {
  auto src = OpenOrDie("tiny_llama_f32");
  ASSERT_NE(src, nullptr);
  const ModelConfig& c = src->config();
  EXPECT_EQ(c.architecture, "llama");
  EXPECT_EQ(c.name, "tiny_llama_f32");
  EXPECT_EQ(c.n_layers, 2);
  EXPECT_EQ(c.hidden, 64);
  EXPECT_EQ(c.intermediate, 128);
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.vocab_size, 256);
  EXPECT_EQ(c.context_length, 256);
  EXPECT_FLOAT_EQ(c.rms_eps, 1e-5f);
  EXPECT_FLOAT_EQ(c.rope.theta, 10000.0f);
  EXPECT_EQ(c.rope.scaling, RopeScalingType::kNone);
  EXPECT_FALSE(c.tied_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.rope_neox);
  EXPECT_EQ(src->origin(), ModelFixture("tiny_llama_f32").string());
  ExpectTensorsMapped(*src, "tiny_llama_f32", kernels::GgmlType::kF32, /*qk_permuted=*/true);
  ExpectPermutedRows(*src, 0);
  EXPECT_EQ(src->Find("blk.0.attn_q.bias"), nullptr);
  EXPECT_EQ(src->Find("blk.2.attn_q.weight"), nullptr);
}

TEST(HfModelTest, TinyLlamaBf16SingleAndShardedAgree) {
  auto single = OpenOrDie("tiny_llama_bf16");
  auto sharded = OpenOrDie("tiny_llama_bf16_sharded");
  ASSERT_NE(single, nullptr);
  ASSERT_NE(sharded, nullptr);
  ExpectTensorsMapped(*single, "tiny_llama_bf16", kernels::GgmlType::kBF16, true);
  ExpectPermutedRows(*single, 1.0 / 256);
  const json listing = ReadJson(ModelFixture("tiny_model_tensors.json"))["tiny_llama_bf16"];
  for (const auto& [hf_name, w] : listing.items()) {
    const std::string name = *HfToGgufName(hf_name);
    const WeightTensor* a = single->Find(name);
    const WeightTensor* b = sharded->Find(name);
    ASSERT_NE(a, nullptr);
    ASSERT_NE(b, nullptr) << name;
    ASSERT_EQ(a->dims, b->dims);
    ASSERT_EQ(a->n_bytes, b->n_bytes);
    EXPECT_EQ(std::memcmp(a->data, b->data, a->n_bytes), 0) << name;
  }
  EXPECT_EQ(sharded->config().n_layers, 2);
}

TEST(HfModelTest, TinyQwen2IsNotPermuted) {
  auto src = OpenOrDie("tiny_qwen2_f32");
  ASSERT_NE(src, nullptr);
  const ModelConfig& c = src->config();
  EXPECT_EQ(c.architecture, "qwen2");
  EXPECT_TRUE(c.rope_neox);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_TRUE(c.tied_embeddings);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_FLOAT_EQ(c.rope.theta, 1e6f);
  EXPECT_FLOAT_EQ(c.rms_eps, 1e-6f);
  EXPECT_EQ(src->Find("output.weight"), nullptr);  // tied: the engine reuses token_embd
  ExpectTensorsMapped(*src, "tiny_qwen2_f32", kernels::GgmlType::kF32, /*qk_permuted=*/false);
  // Byte for byte what the file holds.
  auto file = SafetensorsFile::Open(ModelFixture("tiny_qwen2_f32/model.safetensors").string());
  ASSERT_TRUE(file.ok()) << file.status();
  for (const SafetensorsTensor& t : (*file)->tensors()) {
    const WeightTensor* w = src->Find(*HfToGgufName(t.name));
    ASSERT_NE(w, nullptr) << t.name;
    EXPECT_EQ(std::memcmp(w->data, t.data, t.n_bytes), 0) << t.name;
  }
  const WeightTensor* qb = src->Find("blk.1.attn_q.bias");
  ASSERT_NE(qb, nullptr);
  EXPECT_EQ(qb->dims, std::vector<int64_t>{32});
  const WeightTensor* kb = src->Find("blk.1.attn_k.bias");
  ASSERT_NE(kb, nullptr);
  EXPECT_EQ(kb->dims, std::vector<int64_t>{16});
}

TEST(HfModelTest, PermuteQkRowsMatchesTheNumpyFormula) {
  // reshape(2 heads, 2, 2, 1).swapaxes(1, 2): within a head, rows [0 1 2 3] -> [0 2 1 3].
  std::vector<uint8_t> src = {0, 1, 2, 3, 4, 5, 6, 7};
  std::vector<uint8_t> dst(8);
  PermuteQkRows(src.data(), dst.data(), 2, 8, 1);
  EXPECT_EQ(dst, (std::vector<uint8_t>{0, 2, 1, 3, 4, 6, 5, 7}));
  // One head of 6 rows, 2 bytes each: rows [a b c | d e f] -> [a d b e c f].
  std::vector<uint8_t> s2 = {10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61};
  std::vector<uint8_t> d2(12);
  PermuteQkRows(s2.data(), d2.data(), 1, 6, 2);
  EXPECT_EQ(d2, (std::vector<uint8_t>{10, 11, 40, 41, 20, 21, 50, 51, 30, 31, 60, 61}));
}

TEST(HfModelTest, NameMapping) {
  const std::pair<const char*, const char*> kCases[] = {
      {"model.embed_tokens.weight", "token_embd.weight"},
      {"model.norm.weight", "output_norm.weight"},
      {"lm_head.weight", "output.weight"},
      {"model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"},
      {"model.layers.11.self_attn.k_proj.weight", "blk.11.attn_k.weight"},
      {"model.layers.2.self_attn.v_proj.weight", "blk.2.attn_v.weight"},
      {"model.layers.3.self_attn.o_proj.weight", "blk.3.attn_output.weight"},
      {"model.layers.4.self_attn.q_proj.bias", "blk.4.attn_q.bias"},
      {"model.layers.4.self_attn.k_proj.bias", "blk.4.attn_k.bias"},
      {"model.layers.4.self_attn.v_proj.bias", "blk.4.attn_v.bias"},
      {"model.layers.5.mlp.gate_proj.weight", "blk.5.ffn_gate.weight"},
      {"model.layers.5.mlp.up_proj.weight", "blk.5.ffn_up.weight"},
      {"model.layers.5.mlp.down_proj.weight", "blk.5.ffn_down.weight"},
      {"model.layers.29.input_layernorm.weight", "blk.29.attn_norm.weight"},
      {"model.layers.29.post_attention_layernorm.weight", "blk.29.ffn_norm.weight"},
  };
  for (const auto& [hf, gguf] : kCases)
    EXPECT_EQ(HfToGgufName(hf), std::optional<std::string>(gguf));
  for (const char* bad : {"model.layers.01.mlp.up_proj.weight", "model.layers.x.mlp.up_proj.weight",
                          "model.layers..mlp.up_proj.weight", "model.layers.1.mlp.experts.weight",
                          "model.layers.99999999999.mlp.up_proj.weight", "model.embed_tokens",
                          "transformer.wte.weight", ""}) {
    EXPECT_EQ(HfToGgufName(bad), std::nullopt) << bad;
  }
}

// ---------------------------------------------------------------------------------------------
// config.json

json BaseConfig() { return ReadJson(ModelFixture("tiny_llama_f32/config.json")); }

absl::StatusOr<ModelConfig> Parse(const json& j) { return ParseHfConfig(j.dump(), "cfg.json"); }

void ExpectConfigError(const json& j, std::vector<std::string> fields, const std::string& what) {
  SCOPED_TRACE(what);
  auto c = Parse(j);
  ASSERT_FALSE(c.ok()) << "accepted " << what;
  const std::string msg(c.status().message());
  EXPECT_NE(msg.find("cfg.json"), std::string::npos) << msg;
  for (const std::string& f : fields) {
    EXPECT_NE(msg.find(f), std::string::npos) << "message lacks '" << f << "': " << msg;
  }
}

TEST(HfConfigTest, DefaultsAndFallbacks) {
  json j = BaseConfig();
  j.erase("num_key_value_heads");
  j.erase("head_dim");
  j.erase("rms_norm_eps");
  j.erase("max_position_embeddings");
  j.erase("tie_word_embeddings");
  j.erase("rope_parameters");
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->n_kv_heads, 4);  // = num_attention_heads
  EXPECT_EQ(c->head_dim, 16);   // = hidden_size / num_attention_heads
  EXPECT_FLOAT_EQ(c->rms_eps, 1e-6f);
  EXPECT_EQ(c->context_length, 2048);
  EXPECT_FALSE(c->tied_embeddings);
  EXPECT_FLOAT_EQ(c->rope.theta, 10000.f);

  // An explicit head_dim wins over hidden / heads (e.g. Mistral-Nemo-style configs).
  j = BaseConfig();
  j["head_dim"] = 32;
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 32);

  // No `architectures`: model_type decides, as in transformers.
  j = BaseConfig();
  j.erase("architectures");
  j["model_type"] = "mistral";
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "mistral");
  EXPECT_FALSE(c->rope_neox);

  j = BaseConfig();
  j["architectures"] = {"Qwen2ForCausalLM"};
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->rope_neox);
  EXPECT_TRUE(c->attention_bias);

  j = BaseConfig();
  j["attention_bias"] = true;
  j["tie_word_embeddings"] = true;
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->attention_bias);
  EXPECT_TRUE(c->tied_embeddings);
}

TEST(HfConfigTest, RopeVariants) {
  // transformers 4.x: rope_theta at top level, rope_scaling with `type`.
  json j = BaseConfig();
  j.erase("rope_parameters");
  j["rope_theta"] = 500000.0;
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FLOAT_EQ(c->rope.theta, 500000.f);
  EXPECT_EQ(c->rope.scaling, RopeScalingType::kLinear);
  EXPECT_FLOAT_EQ(c->rope.factor, 4.f);

  j["rope_scaling"] = nullptr;  // what 4.x writes for "none"
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope.scaling, RopeScalingType::kNone);

  // Llama 3.1.
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope.scaling, RopeScalingType::kLlama3);
  EXPECT_FLOAT_EQ(c->rope.factor, 8.f);
  EXPECT_FLOAT_EQ(c->rope.llama3_low_freq_factor, 1.f);
  EXPECT_FLOAT_EQ(c->rope.llama3_high_freq_factor, 4.f);
  EXPECT_EQ(c->rope.original_context, 8192);

  // transformers 5.x: everything inside rope_parameters.
  j = BaseConfig();
  j["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 1e6},
                          {"factor", 4.0},       {"original_max_position_embeddings", 32768},
                          {"beta_fast", 16},     {"beta_slow", 2}};
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope.scaling, RopeScalingType::kYarn);
  EXPECT_FLOAT_EQ(c->rope.theta, 1e6f);
  EXPECT_FLOAT_EQ(c->rope.factor, 4.f);
  EXPECT_EQ(c->rope.original_context, 32768);
  EXPECT_FLOAT_EQ(c->rope.yarn_beta_fast, 16.f);
  EXPECT_FLOAT_EQ(c->rope.yarn_beta_slow, 2.f);
  EXPECT_FLOAT_EQ(c->rope.yarn_attn_factor, 1.f);  // the default 0.1 ln(s) + 1 correction

  // An explicit attention_factor is expressed relative to that default.
  j["rope_parameters"]["attention_factor"] = 1.5;
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_NEAR(c->rope.yarn_attn_factor, 1.5 / (0.1 * std::log(4.0) + 1.0), 1e-6);

  // YaRN without factor: max_position_embeddings / original, as transformers derives it.
  j["rope_parameters"].erase("factor");
  j["rope_parameters"].erase("attention_factor");
  j["max_position_embeddings"] = 131072;
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FLOAT_EQ(c->rope.factor, 4.f);

  j = BaseConfig();
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1234.0}};
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope.scaling, RopeScalingType::kNone);
  EXPECT_FLOAT_EQ(c->rope.theta, 1234.f);
}

TEST(HfConfigTest, Errors) {
  for (const char* key : {"hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "vocab_size"}) {
    json j = BaseConfig();
    j.erase(key);
    ExpectConfigError(j, {key}, std::string("missing ") + key);
    j[key] = "64";
    ExpectConfigError(j, {key}, std::string("string ") + key);
    j[key] = 0;
    ExpectConfigError(j, {key}, std::string("zero ") + key);
    j[key] = -4;
    ExpectConfigError(j, {key}, std::string("negative ") + key);
    j[key] = 64.5;
    ExpectConfigError(j, {key}, std::string("fractional ") + key);
    j[key] = uint64_t{1} << 63;
    ExpectConfigError(j, {key}, std::string("huge ") + key);
  }
  json j = BaseConfig();
  j["num_key_value_heads"] = 3;
  ExpectConfigError(j, {"num_key_value_heads"}, "heads not a multiple of kv heads");
  j = BaseConfig();
  j.erase("head_dim");
  j["num_attention_heads"] = 5;
  j["num_key_value_heads"] = 5;
  ExpectConfigError(j, {"head_dim", "hidden_size"}, "hidden not a multiple of heads");
  j = BaseConfig();
  j["head_dim"] = 15;
  ExpectConfigError(j, {"head_dim"}, "odd head_dim");
  j = BaseConfig();
  j["rms_norm_eps"] = -1e-6;
  ExpectConfigError(j, {"rms_norm_eps"}, "negative eps");
  j = BaseConfig();
  j["tie_word_embeddings"] = "yes";
  ExpectConfigError(j, {"tie_word_embeddings"}, "string bool");
  j = BaseConfig();
  j["architectures"] = {"GPT2LMHeadModel"};
  ExpectConfigError(j, {"architectures", "GPT2LMHeadModel"}, "unsupported architecture");
  j["architectures"] = json::array();
  ExpectConfigError(j, {"architectures"}, "empty architectures");
  j.erase("architectures");
  j.erase("model_type");
  ExpectConfigError(j, {"architectures", "model_type"}, "no architecture at all");
  j = BaseConfig();
  j["hidden_act"] = "gelu";
  ExpectConfigError(j, {"hidden_act"}, "gelu");
  j = BaseConfig();
  j["mlp_bias"] = true;
  ExpectConfigError(j, {"mlp_bias"}, "mlp_bias");
  j = BaseConfig();
  j["quantization_config"] = {{"quant_method", "gptq"}, {"bits", 4}};
  ExpectConfigError(j, {"quantization_config"}, "GPTQ checkpoint");
  // RoPE.
  for (const char* type : {"dynamic", "longrope", "su", "mrope"}) {
    j = BaseConfig();
    j["rope_parameters"] = {{"rope_type", type}, {"rope_theta", 1e4}, {"factor", 2.0}};
    ExpectConfigError(j, {"rope_parameters", type}, std::string("rope ") + type);
  }
  j = BaseConfig();
  j["rope_parameters"] = {{"rope_type", "linear"}, {"rope_theta", 1e4}};
  ExpectConfigError(j, {"rope_parameters", "factor"}, "linear without factor");
  j["rope_parameters"]["factor"] = -2.0;
  ExpectConfigError(j, {"rope_parameters", "factor"}, "negative factor");
  j = BaseConfig();
  j["rope_parameters"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}};
  ExpectConfigError(j, {"high_freq_factor"}, "llama3 without high_freq_factor");
  j = BaseConfig();
  j["rope_parameters"] = "linear";
  ExpectConfigError(j, {"rope_parameters"}, "rope_parameters not an object");
  j = BaseConfig();
  j["rope_parameters"] = {{"rope_type", 3}};
  ExpectConfigError(j, {"rope_type"}, "numeric rope_type");
  j = BaseConfig();
  j["rope_parameters"]["rope_theta"] = 0;
  ExpectConfigError(j, {"rope_theta"}, "zero theta");
  j = BaseConfig();
  j["rope_parameters"]["partial_rotary_factor"] = 0.5;
  ExpectConfigError(j, {"partial_rotary_factor"}, "partial rotary");
  // Not JSON / not an object.
  for (const char* text : {"", "{", "{\"hidden_size\": 64,}", "[1]", "null", "\xff"}) {
    auto c = ParseHfConfig(text, "cfg.json");
    ASSERT_FALSE(c.ok()) << text;
    EXPECT_NE(c.status().message().find("cfg.json"), std::string::npos) << c.status();
  }
}

// ---------------------------------------------------------------------------------------------
// Directories

// A complete zero-weight LLaMA (hidden 16, 2 heads of 8, 1 KV head, intermediate 32, vocab
// 10, 1 layer) whose parts the tests then break.
struct SyntheticModel {
  json config = {{"architectures", {"LlamaForCausalLM"}},
                 {"hidden_size", 16},
                 {"intermediate_size", 32},
                 {"num_hidden_layers", 1},
                 {"num_attention_heads", 2},
                 {"num_key_value_heads", 1},
                 {"vocab_size", 10},
                 {"rms_norm_eps", 1e-5},
                 {"tie_word_embeddings", false}};
  std::vector<std::pair<std::string, std::vector<int64_t>>> tensors = {
      {"model.embed_tokens.weight", {10, 16}},
      {"model.norm.weight", {16}},
      {"lm_head.weight", {10, 16}},
      {"model.layers.0.self_attn.q_proj.weight", {16, 16}},
      {"model.layers.0.self_attn.k_proj.weight", {8, 16}},
      {"model.layers.0.self_attn.v_proj.weight", {8, 16}},
      {"model.layers.0.self_attn.o_proj.weight", {16, 16}},
      {"model.layers.0.mlp.gate_proj.weight", {32, 16}},
      {"model.layers.0.mlp.up_proj.weight", {32, 16}},
      {"model.layers.0.mlp.down_proj.weight", {16, 32}},
      {"model.layers.0.input_layernorm.weight", {16}},
      {"model.layers.0.post_attention_layernorm.weight", {16}},
  };
  std::string dtype = "F32";

  void Drop(const std::string& name) {
    std::erase_if(tensors, [&](const auto& t) { return t.first == name; });
  }
  SafetensorsBuilder Builder(size_t first = 0, size_t end = ~size_t{0}) const {
    SafetensorsBuilder b;
    for (size_t i = first; i < std::min(end, tensors.size()); ++i) {
      b.Add(tensors[i].first, dtype, tensors[i].second);
    }
    return b;
  }
  void Write(const fs::path& dir, size_t pad_to = 8) const {
    WriteText(dir / "config.json", config.dump());
    Builder().WriteTo(dir / "model.safetensors", pad_to);
  }
};

void ExpectDirError(const fs::path& dir, std::vector<std::string> fields, const std::string& what) {
  SCOPED_TRACE(what);
  auto s = OpenHfModelDir(dir.string());
  ASSERT_FALSE(s.ok()) << "accepted " << what;
  const std::string msg(s.status().message());
  for (const std::string& f : fields) {
    EXPECT_NE(msg.find(f), std::string::npos) << "message lacks '" << f << "': " << msg;
  }
}

TEST(HfDirTest, SyntheticModelLoads) {
  ScratchDir d;
  SyntheticModel m;
  m.Write(d.path());
  auto s = OpenHfModelDir(d.path().string());
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->Find("blk.0.attn_k.weight")->dims, (std::vector<int64_t>{16, 8}));
}

TEST(HfDirTest, MisalignedDataIsCopiedAligned) {
  // A 1-byte-padded header puts every F32 at an odd address; the source must still hand out
  // aligned pointers holding the same values.
  ScratchDir d;
  SyntheticModel m;
  m.tensors = {{"model.norm.weight", {16}}};
  WriteText(d / "config.json", m.config.dump());
  SafetensorsBuilder b;
  std::vector<uint8_t> vals(64);
  for (int i = 0; i < 16; ++i) {
    const float f = 0.25f * i;
    std::memcpy(&vals[4 * i], &f, 4);
  }
  b.Add("model.norm.weight", "F32", {16}, vals);
  b.header()["__metadata__"] = {{"pad", "x"}};  // makes the unpadded header length odd
  std::vector<uint8_t> bytes = b.Build(1);
  if ((bytes.size() - 64) % 4 == 0) b.header()["__metadata__"]["pad"] = "xx";
  b.WriteTo(d / "model.safetensors", 1);
  // Loading fails on the many missing tensors, so check through the file and the error.
  auto file = SafetensorsFile::Open((d / "model.safetensors").string());
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_NE(reinterpret_cast<uintptr_t>((*file)->Find("model.norm.weight")->data) % 4, 0u);
  ExpectDirError(d.path(), {"missing tensors", "token_embd.weight"}, "only model.norm present");

  // Now a full model whose tensors are all misaligned.
  SyntheticModel full;
  ScratchDir d2;
  WriteText(d2 / "config.json", full.config.dump());
  SafetensorsBuilder fb = full.Builder();
  fb.header()["__metadata__"] = {{"pad", "x"}};
  if ((fb.Build(1).size() - fb.data().size()) % 4 == 0) fb.header()["__metadata__"]["pad"] = "xx";
  fb.WriteTo(d2 / "model.safetensors", 1);
  auto s = OpenHfModelDir(d2.path().string());
  ASSERT_TRUE(s.ok()) << s.status();
  for (const char* name : {"output_norm.weight", "blk.0.attn_v.weight", "blk.0.attn_q.weight"}) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>((*s)->Find(name)->data) % 4, 0u) << name;
  }
}

TEST(HfDirTest, MissingFiles) {
  ExpectDirError("/nonexistent/model/dir", {"/nonexistent/model/dir"}, "no directory");
  ScratchDir d;
  ExpectDirError(d.path(), {"config.json"}, "no config.json");
  SyntheticModel m;
  WriteText(d / "config.json", m.config.dump());
  ExpectDirError(d.path(), {"model.safetensors", "model.safetensors.index.json"}, "no weights");
  WriteText(d / "config.json", "{\"hidden_size\": ");
  ExpectDirError(d.path(), {"config.json", "JSON"}, "config.json not JSON");
}

TEST(HfDirTest, ConfigContradictsTensors) {
  // (config key, new value, what the error must quote). Tensors are checked in header order
  // (alphabetical), so the first mismatch is predictable.
  const std::tuple<const char*, json, const char*> kCases[] = {
      {"num_attention_heads", 4, "head_dim=4"},             // head_dim 16/4: k_proj rows 8 != 1 x 4
      {"head_dim", 4, "head_dim=4"},                        // k_proj rows 8 != 1 x 4
      {"hidden_size", 32, "hidden_size=32"},                // lm_head cols
      {"intermediate_size", 48, "intermediate_size=48"},    // down_proj cols
      {"vocab_size", 11, "vocab_size=11"},                  // lm_head rows
      {"num_key_value_heads", 2, "num_key_value_heads=2"},  // k_proj rows 8 != 2 x 8
  };
  for (const auto& [key, value, quoted] : kCases) {
    ScratchDir d;
    SyntheticModel m;
    m.config[key] = value;
    m.Write(d.path());
    ExpectDirError(d.path(), {"model.safetensors", "shape", quoted}, std::string("changed ") + key);
  }
  {
    ScratchDir d;
    SyntheticModel m;  // tensors for one layer, config claims two
    m.config["num_hidden_layers"] = 2;
    m.Write(d.path());
    ExpectDirError(d.path(),
                   {"missing", "blk.1.attn_q.weight", "blk.1.attn_norm.weight", "and 1 more"},
                   "layer 1 missing");
  }
  {
    ScratchDir d;
    SyntheticModel m;
    m.tensors.push_back({"model.layers.1.mlp.up_proj.weight", {32, 16}});
    m.Write(d.path());
    ExpectDirError(d.path(), {"model.layers.1.mlp.up_proj.weight", "num_hidden_layers"},
                   "tensor beyond num_hidden_layers");
  }
}

TEST(HfDirTest, MissingAndUnexpectedTensors) {
  for (const char* name : {"lm_head.weight", "model.norm.weight", "model.embed_tokens.weight",
                           "model.layers.0.self_attn.k_proj.weight",
                           "model.layers.0.post_attention_layernorm.weight"}) {
    ScratchDir d;
    SyntheticModel m;
    m.Drop(name);
    m.Write(d.path());
    ExpectDirError(d.path(), {"missing", *HfToGgufName(name)}, std::string("dropped ") + name);
  }
  {
    // Tied embeddings: no lm_head needed.
    ScratchDir d;
    SyntheticModel m;
    m.Drop("lm_head.weight");
    m.config["tie_word_embeddings"] = true;
    m.Write(d.path());
    auto s = OpenHfModelDir(d.path().string());
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ((*s)->Find("output.weight"), nullptr);
  }
  {
    // attention_bias needs q/k/v/o biases; with them, the llama q/k biases are permuted too.
    ScratchDir d;
    SyntheticModel m;
    m.config["attention_bias"] = true;
    m.Write(d.path());
    ExpectDirError(d.path(), {"missing", "blk.0.attn_q.bias", "blk.0.attn_output.bias"},
                   "attention_bias without biases");
    SafetensorsBuilder b = m.Builder();
    std::vector<uint8_t> qb(16 * 4);
    for (int i = 0; i < 16; ++i) {
      const float f = static_cast<float>(i);
      std::memcpy(&qb[4 * i], &f, 4);
    }
    b.Add("model.layers.0.self_attn.q_proj.bias", "F32", {16}, qb)
        .Add("model.layers.0.self_attn.k_proj.bias", "F32", {8})
        .Add("model.layers.0.self_attn.v_proj.bias", "F32", {8})
        .Add("model.layers.0.self_attn.o_proj.bias", "F32", {16});
    b.WriteTo(d / "model.safetensors");
    auto s = OpenHfModelDir(d.path().string());
    ASSERT_TRUE(s.ok()) << s.status();
    const WeightTensor* t = (*s)->Find("blk.0.attn_q.bias");
    ASSERT_NE(t, nullptr);
    // 2 heads of 8: per head [0..7] -> [0 4 1 5 2 6 3 7].
    const float want[16] = {0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15};
    for (int i = 0; i < 16; ++i) EXPECT_EQ(At(*t, i), want[i]) << i;
  }
  for (const char* extra : {"model.layers.0.mlp.experts.0.w1.weight", "transformer.h.0.attn.weight",
                            "model.layers.0.self_attn.q_norm.weight"}) {
    ScratchDir d;
    SyntheticModel m;
    m.tensors.push_back({extra, {16}});
    m.Write(d.path());
    ExpectDirError(d.path(), {"model.safetensors", extra}, std::string("extra ") + extra);
  }
  {
    // Old checkpoints carry rotary buffers; they are skipped.
    ScratchDir d;
    SyntheticModel m;
    m.tensors.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", {4}});
    m.Write(d.path());
    EXPECT_TRUE(OpenHfModelDir(d.path().string()).ok());
  }
  {
    ScratchDir d;
    SyntheticModel m;
    m.Write(d.path());
    SafetensorsBuilder b = m.Builder();
    b.header()["model.norm.weight"]["dtype"] = "I64";
    b.header()["model.norm.weight"]["shape"] = {8};
    b.WriteTo(d / "model.safetensors");
    ExpectDirError(d.path(), {"model.safetensors", "model.norm.weight", "I64"}, "I64 tensor");
  }
}

// Writes the synthetic model as two shards plus an index (returned in `index_out`).
void WriteSharded(const fs::path& dir, const SyntheticModel& m, json* index_out = nullptr) {
  WriteText(dir / "config.json", m.config.dump());
  const size_t half = m.tensors.size() / 2;
  m.Builder(0, half).WriteTo(dir / "model-00001-of-00002.safetensors");
  m.Builder(half).WriteTo(dir / "model-00002-of-00002.safetensors");
  json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", json::object()}};
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    index["weight_map"][m.tensors[i].first] =
        i < half ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  WriteText(dir / "model.safetensors.index.json", index.dump());
  if (index_out != nullptr) *index_out = index;
}

TEST(HfDirTest, ShardIndexErrors) {
  SyntheticModel m;
  {
    ScratchDir d;
    WriteSharded(d.path(), m);
    auto s = OpenHfModelDir(d.path().string());
    ASSERT_TRUE(s.ok()) << s.status();
  }
  const std::string kIndex = "model.safetensors.index.json";
  auto expect_index_error = [&](const std::function<void(json&)>& edit,
                                std::vector<std::string> fields, const std::string& what) {
    ScratchDir d;
    json index;
    WriteSharded(d.path(), m, &index);
    edit(index);
    WriteText(d / kIndex, index.dump());
    ExpectDirError(d.path(), fields, what);
  };
  expect_index_error([](json& j) { j.erase("weight_map"); }, {kIndex, "weight_map"},
                     "no weight_map");
  expect_index_error([](json& j) { j["weight_map"] = json::array(); }, {kIndex, "weight_map"},
                     "weight_map array");
  expect_index_error([](json& j) { j["weight_map"] = json::object(); }, {kIndex, "weight_map"},
                     "weight_map empty");
  expect_index_error([](json& j) { j = json::array(); }, {kIndex}, "index not an object");
  expect_index_error([](json& j) { j["weight_map"]["model.norm.weight"] = 3; },
                     {kIndex, "model.norm.weight"}, "shard not a string");
  expect_index_error(
      [](json& j) { j["weight_map"]["model.norm.weight"] = "../model-00001-of-00002.safetensors"; },
      {kIndex, "model.norm.weight"}, "path escaping the directory");
  expect_index_error([](json& j) { j["weight_map"]["model.norm.weight"] = "model-9.safetensors"; },
                     {"model-9.safetensors"}, "missing shard file");
  expect_index_error(
      [](json& j) {
        j["weight_map"]["model.layers.0.mlp.experts.weight"] = "model-00001-of-00002.safetensors";
      },
      {kIndex, "model.layers.0.mlp.experts.weight"}, "index lists a tensor no shard has");
  expect_index_error(
      [&](json& j) {
        // Moves one tensor to the other shard in the index only.
        const std::string name = m.tensors[0].first;
        j["weight_map"][name] = "model-00002-of-00002.safetensors";
      },
      {m.tensors[0].first, "weight_map"}, "tensor in the wrong shard");
  expect_index_error([](json& j) { j["weight_map"].erase("model.norm.weight"); },
                     {"model.norm.weight", "weight_map"}, "tensor not in the index");
  {
    ScratchDir d;
    WriteSharded(d.path(), m);
    WriteText(d / kIndex, "{\"weight_map\": {");
    ExpectDirError(d.path(), {kIndex, "JSON"}, "index not JSON");
  }
  {
    // The same tensor in both shards.
    ScratchDir d;
    WriteSharded(d.path(), m);
    SafetensorsBuilder b = m.Builder(m.tensors.size() / 2);
    b.Add(m.tensors[0].first, "F32", m.tensors[0].second);
    b.WriteTo(d / "model-00002-of-00002.safetensors");
    ExpectDirError(d.path(), {m.tensors[0].first}, "duplicate across shards");
  }
}

}  // namespace
}  // namespace quantkv
