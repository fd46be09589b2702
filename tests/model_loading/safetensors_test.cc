// SafetensorsFile on files transformers wrote (values checked against what the safetensors
// package reads, tests/fixtures/models/tiny_model_tensors.json) and on hand-built malformed
// files, each of which must be a Status naming the file and the tensor or field.
#include "runtime/model/safetensors.h"

#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "kernels/fp16.h"
#include "tests/model_loading/test_files.h"

namespace quantkv {
namespace {

using nlohmann::json;
using testing::ModelFixture;
using testing::ReadBytes;
using testing::ReadJson;
using testing::SafetensorsBuilder;

constexpr char kName[] = "bad.safetensors";

float ElementAsFloat(const SafetensorsTensor& t, int64_t i) {
  if (t.type == kernels::GgmlType::kF32) {
    float f;
    std::memcpy(&f, t.data + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, t.data + 2 * i, 2);
  return t.type == kernels::GgmlType::kBF16 ? kernels::Bf16ToFp32(h) : kernels::Fp16ToFp32(h);
}

class SafetensorsFixtureTest : public ::testing::TestWithParam<std::string> {};

TEST_P(SafetensorsFixtureTest, MatchesSafetensorsPackage) {
  const std::string path = ModelFixture(GetParam() + "/model.safetensors").string();
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->name(), path);
  const json want = ReadJson(ModelFixture("tiny_model_tensors.json"))[GetParam()];
  ASSERT_EQ((*f)->tensors().size(), want.size());
  for (const auto& [name, w] : want.items()) {
    SCOPED_TRACE(name);
    const SafetensorsTensor* t = (*f)->Find(name);
    ASSERT_NE(t, nullptr);
    const std::string dtype = w["dtype"];
    EXPECT_EQ(t->dtype, dtype == "float32" ? "F32" : dtype == "bfloat16" ? "BF16" : "F16");
    EXPECT_EQ(t->shape, w["shape"].get<std::vector<int64_t>>());
    int64_t n = 1;
    for (int64_t d : t->shape) n *= d;
    EXPECT_EQ(t->n_elements, n);
    EXPECT_EQ(t->n_bytes, n * (t->type == kernels::GgmlType::kF32 ? 4 : 2));
    const std::vector<float> head = w["head"].get<std::vector<float>>();
    for (size_t i = 0; i < head.size(); ++i) EXPECT_EQ(ElementAsFloat(*t, i), head[i]) << i;
  }
  // transformers records the format in __metadata__.
  EXPECT_EQ((*f)->metadata().count("format"), 1u);
  EXPECT_EQ((*f)->Find("no.such.tensor"), nullptr);
}

INSTANTIATE_TEST_SUITE_P(Models, SafetensorsFixtureTest,
                         ::testing::Values("tiny_llama_f32", "tiny_llama_bf16", "tiny_qwen2_f32"));

TEST(SafetensorsTest, EdgeCasesThatAreValid) {
  SafetensorsBuilder b;
  std::vector<uint8_t> f16(6 * 2);
  for (int i = 0; i < 6; ++i) {
    const uint16_t h = kernels::Fp32ToFp16(0.5f * i);
    std::memcpy(&f16[2 * i], &h, 2);
  }
  b.Add("scalar", "F32", {}).Add("empty", "F32", {0, 7}).Add("h", "F16", {2, 3}, f16);
  b.header()["__metadata__"] = {{"format", "pt"}, {"note", "x"}};
  // Unpadded header: data starts at an odd address, which the parser must not mind.
  for (size_t pad : {size_t{1}, size_t{8}}) {
    SCOPED_TRACE(pad);
    const std::vector<uint8_t> bytes = b.Build(pad);
    auto f = SafetensorsFile::Parse(bytes, kName);
    ASSERT_TRUE(f.ok()) << f.status();
    ASSERT_EQ((*f)->tensors().size(), 3u);
    const SafetensorsTensor* s = (*f)->Find("scalar");
    ASSERT_NE(s, nullptr);
    EXPECT_TRUE(s->shape.empty());
    EXPECT_EQ(s->n_elements, 1);
    EXPECT_EQ(s->n_bytes, 4);
    const SafetensorsTensor* e = (*f)->Find("empty");
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->n_elements, 0);
    EXPECT_EQ(e->n_bytes, 0);
    const SafetensorsTensor* h = (*f)->Find("h");
    ASSERT_NE(h, nullptr);
    EXPECT_EQ(h->type, kernels::GgmlType::kF16);
    EXPECT_EQ(ElementAsFloat(*h, 5), 2.5f);
    EXPECT_EQ((*f)->metadata().at("note"), "x");
  }
  // No tensors at all.
  auto empty = SafetensorsFile::Parse(SafetensorsBuilder::Raw("{}", {}), kName);
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE((*empty)->tensors().empty());
}

void ExpectRejected(const std::vector<uint8_t>& bytes, std::vector<std::string> fields,
                    const std::string& what) {
  SCOPED_TRACE(what);
  auto f = SafetensorsFile::Parse(bytes, kName);
  ASSERT_FALSE(f.ok()) << "accepted " << what;
  const std::string msg(f.status().message());
  EXPECT_NE(msg.find(kName), std::string::npos) << "message does not name the file: " << msg;
  for (const std::string& field : fields) {
    EXPECT_NE(msg.find(field), std::string::npos) << "message lacks '" << field << "': " << msg;
  }
}

// One valid two-tensor file to mutate.
SafetensorsBuilder Valid() {
  SafetensorsBuilder b;
  b.Add("a", "F32", {2, 3}).Add("b", "BF16", {4});
  return b;
}

TEST(SafetensorsTest, BadHeaderLength) {
  for (size_t n : {0, 1, 7}) {
    ExpectRejected(std::vector<uint8_t>(n, 0), {"header length"}, absl::StrFormat("%d bytes", n));
  }
  std::vector<uint8_t> bytes = Valid().Build();
  for (uint64_t len :
       {uint64_t{1} << 63, ~uint64_t{0}, uint64_t{bytes.size()}, uint64_t{200} << 20}) {
    std::vector<uint8_t> b = bytes;
    for (int i = 0; i < 8; ++i) b[i] = static_cast<uint8_t>(len >> (8 * i));
    ExpectRejected(b, {"header length"}, absl::StrFormat("header length %d", len));
  }
  // Every truncation of a valid file is an error.
  for (size_t n = 0; n < bytes.size(); ++n) {
    std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + n);
    auto f = SafetensorsFile::Parse(cut, kName);
    ASSERT_FALSE(f.ok()) << "accepted truncation to " << n;
    ASSERT_NE(f.status().message().find(kName), std::string::npos) << f.status();
  }
}

TEST(SafetensorsTest, BadJson) {
  ExpectRejected(SafetensorsBuilder::Raw("{\"a\": ", {}), {"JSON"}, "unterminated JSON");
  ExpectRejected(SafetensorsBuilder::Raw("[1, 2]", {}), {"object"}, "array header");
  ExpectRejected(SafetensorsBuilder::Raw("\"x\"  ", {}), {"object"}, "string header");
  ExpectRejected(SafetensorsBuilder::Raw("{\"\xff\xfe\": 1}", {}), {"JSON"}, "invalid UTF-8");
  ExpectRejected(SafetensorsBuilder::Raw("{} {}", {}), {"JSON"}, "trailing garbage");
  ExpectRejected(SafetensorsBuilder::Raw(std::string(1000, '[') + std::string(1000, ']'), {}),
                 {"object"}, "deep nesting");
  ExpectRejected(SafetensorsBuilder::Raw("{\"t\": 5}", {}), {"'t'", "object"}, "entry not object");
  ExpectRejected(SafetensorsBuilder::Raw("{\"__metadata__\": {\"k\": 1}}", {}),
                 {"__metadata__", "'k'"}, "metadata value not a string");
  ExpectRejected(SafetensorsBuilder::Raw("{\"__metadata__\": [1]}", {}), {"__metadata__"},
                 "metadata not an object");
}

TEST(SafetensorsTest, BadTensorEntries) {
  {
    auto b = Valid();
    b.header()["a"].erase("dtype");
    ExpectRejected(b.Build(), {"'a'", "dtype"}, "missing dtype");
  }
  for (const char* dtype : {"I64", "U8", "F64", "BOOL", "F8_E4M3"}) {
    auto b = Valid();
    b.header()["a"]["dtype"] = dtype;
    auto f = SafetensorsFile::Parse(b.Build(), kName);
    ASSERT_FALSE(f.ok()) << dtype;
    EXPECT_EQ(f.status().code(), absl::StatusCode::kUnimplemented) << f.status();
    EXPECT_NE(f.status().message().find("'a'"), std::string::npos) << f.status();
    EXPECT_NE(f.status().message().find(dtype), std::string::npos) << f.status();
  }
  {
    auto b = Valid();
    b.header()["a"]["dtype"] = "F33";
    ExpectRejected(b.Build(), {"'a'", "F33"}, "unknown dtype");
  }
  {
    auto b = Valid();
    b.header()["a"]["dtype"] = 4;
    ExpectRejected(b.Build(), {"'a'", "dtype"}, "numeric dtype");
  }
  {
    auto b = Valid();
    b.header()["a"].erase("shape");
    ExpectRejected(b.Build(), {"'a'", "shape"}, "missing shape");
  }
  for (const json& shape : {json{2, -3}, json{2.0, 3}, json{"2", 3}, json::object()}) {
    auto b = Valid();
    b.header()["a"]["shape"] = shape;
    ExpectRejected(b.Build(), {"'a'", "shape"}, "shape " + shape.dump());
  }
  {
    auto b = Valid();
    b.header()["a"]["shape"] = {uint64_t{1} << 40, uint64_t{1} << 40};
    ExpectRejected(b.Build(), {"'a'", "shape"}, "overflowing shape");
  }
  {
    auto b = Valid();
    b.header()["a"]["shape"] = {~uint64_t{0}};
    ExpectRejected(b.Build(), {"'a'", "shape"}, "dim 2^64-1");
  }
  {
    auto b = Valid();  // 2^61 elements x 4 bytes wraps uint64 to 2^63... then 0
    b.header()["a"]["shape"] = {uint64_t{1} << 62, 4};
    ExpectRejected(b.Build(), {"'a'"}, "bytes overflow");
  }
  {
    auto b = Valid();
    b.header()["a"]["shape"] = {3, 3};
    ExpectRejected(b.Build(), {"'a'", "data_offsets"}, "shape x dtype != byte length");
  }
  {
    auto b = Valid();
    b.header()["a"].erase("data_offsets");
    ExpectRejected(b.Build(), {"'a'", "data_offsets"}, "missing data_offsets");
  }
  for (const json& off : {json{0}, json{0, 24, 48}, json{-1, 23}, json{"0", 24}, json{24, 0}}) {
    auto b = Valid();
    b.header()["a"]["data_offsets"] = off;
    ExpectRejected(b.Build(), {"'a'", "data_offsets"}, "data_offsets " + off.dump());
  }
  {
    auto b = Valid();
    b.header()["b"]["data_offsets"] = {24, 1000};
    b.header()["b"]["shape"] = {488};
    ExpectRejected(b.Build(), {"'b'", "data_offsets"}, "data past the end");
  }
  {
    auto b = Valid();
    b.header()["b"]["data_offsets"] = {~uint64_t{0} - 1, ~uint64_t{0}};
    ExpectRejected(b.Build(), {"'b'", "data_offsets"}, "offsets near 2^64");
  }
}

TEST(SafetensorsTest, OffsetsMustTileTheData) {
  {
    auto b = Valid();  // b overlaps a's last 4 bytes
    b.header()["b"]["data_offsets"] = {20, 28};
    b.data().resize(28);
    ExpectRejected(b.Build(), {"overlaps"}, "overlap");
  }
  {
    auto b = Valid();  // both tensors on the same bytes
    b.header()["b"] = {{"dtype", "F32"}, {"shape", {6}}, {"data_offsets", {0, 24}}};
    b.data().resize(24);
    ExpectRejected(b.Build(), {"overlaps"}, "aliasing");
  }
  {
    auto b = Valid();  // a gap between the tensors
    b.header()["b"]["data_offsets"] = {28, 36};
    b.data().resize(36);
    ExpectRejected(b.Build(), {"'b'", "gap"}, "gap");
  }
  {
    auto b = Valid();  // trailing bytes nobody owns
    b.data().resize(b.data().size() + 4);
    ExpectRejected(b.Build(), {"cover"}, "trailing bytes");
  }
}

}  // namespace
}  // namespace quantkv
