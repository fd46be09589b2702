// GgufFile against files written by the gguf package's GGUFWriter and described by its
// GGUFReader (tools/fixtures/make_model_fixtures.py): every metadata value type, tensor
// descriptors and data pointers, and corruptions of those bytes, each of which must give a
// Status that names the file and the field rather than a crash or a silent misread.
#include "runtime/model/gguf.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "tests/model_loading/test_files.h"

namespace quantkv {
namespace {

using nlohmann::json;
using testing::ModelFixture;
using testing::ReadBytes;
using testing::ReadJson;

const json& Fixtures() {
  static const json* j = new json(ReadJson(ModelFixture("gguf_fixtures.json")));
  return *j;
}

GgufValueType TypeFromName(const std::string& n) {
  static const std::pair<const char*, GgufValueType> kNames[] = {
      {"UINT8", GgufValueType::kUint8},     {"INT8", GgufValueType::kInt8},
      {"UINT16", GgufValueType::kUint16},   {"INT16", GgufValueType::kInt16},
      {"UINT32", GgufValueType::kUint32},   {"INT32", GgufValueType::kInt32},
      {"FLOAT32", GgufValueType::kFloat32}, {"BOOL", GgufValueType::kBool},
      {"STRING", GgufValueType::kString},   {"ARRAY", GgufValueType::kArray},
      {"UINT64", GgufValueType::kUint64},   {"INT64", GgufValueType::kInt64},
      {"FLOAT64", GgufValueType::kFloat64},
  };
  for (const auto& [name, t] : kNames) {
    if (n == name) return t;
  }
  ADD_FAILURE() << "unknown type name " << n;
  return GgufValueType::kUint8;
}

bool IsSignedType(GgufValueType t) {
  return t == GgufValueType::kInt8 || t == GgufValueType::kInt16 || t == GgufValueType::kInt32 ||
         t == GgufValueType::kInt64;
}

// Checks one scalar entry against the reader's value.
void ExpectScalar(const GgufFile& f, const GgufKv& kv, const json& want) {
  const json& v = want["value"];
  switch (kv.type) {
    case GgufValueType::kString: {
      EXPECT_EQ(kv.str, v.get<std::string>()) << kv.key;
      auto s = f.GetString(kv.key);
      ASSERT_TRUE(s.ok()) << s.status();
      EXPECT_EQ(*s, v.get<std::string>());
      break;
    }
    case GgufValueType::kBool: {
      EXPECT_EQ(kv.b, v.get<bool>()) << kv.key;
      auto b = f.GetBool(kv.key);
      ASSERT_TRUE(b.ok()) << b.status();
      EXPECT_EQ(*b, v.get<bool>());
      break;
    }
    case GgufValueType::kFloat32:
    case GgufValueType::kFloat64: {
      EXPECT_EQ(kv.f, v.get<double>()) << kv.key;
      auto d = f.GetFloat(kv.key);
      ASSERT_TRUE(d.ok()) << d.status();
      EXPECT_EQ(*d, v.get<double>());
      break;
    }
    default: {
      if (IsSignedType(kv.type)) {
        EXPECT_EQ(kv.i, v.get<int64_t>()) << kv.key;
      } else {
        EXPECT_EQ(kv.u, v.get<uint64_t>()) << kv.key;
      }
      auto i = f.GetInt(kv.key);
      if (v.is_number_unsigned() &&
          v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        // A uint64 above INT64_MAX does not fit GetInt's int64: an error, not a wrap.
        EXPECT_FALSE(i.ok()) << kv.key;
        if (!i.ok()) {
          EXPECT_NE(i.status().message().find(kv.key), std::string::npos);
        }
      } else {
        ASSERT_TRUE(i.ok()) << i.status();
        EXPECT_EQ(*i, v.get<int64_t>()) << kv.key;
      }
      break;
    }
  }
}

void ExpectArray(const GgufFile& f, const GgufKv& kv, const json& want) {
  const GgufValueType elem = TypeFromName(want["elem_type"]);
  EXPECT_EQ(kv.elem_type, elem) << kv.key;
  EXPECT_EQ(kv.count, want["count"].get<uint64_t>()) << kv.key;
  const json& values = want["values"];
  switch (elem) {
    case GgufValueType::kString: {
      auto s = f.GetStringArray(kv.key);
      ASSERT_TRUE(s.ok()) << s.status();
      ASSERT_EQ(s->size(), values.size());
      for (size_t i = 0; i < values.size(); ++i) EXPECT_EQ((*s)[i], values[i].get<std::string>());
      break;
    }
    case GgufValueType::kArray:
      // Nested arrays are kept opaque; what matters is that parsing resumed at the right byte,
      // which the entries after them (test.after_nested) check.
      EXPECT_EQ(kv.count, values.size());
      break;
    case GgufValueType::kBool:
      ASSERT_NE(kv.array_data, nullptr);
      for (size_t i = 0; i < values.size(); ++i) {
        EXPECT_EQ(kv.array_data[i] != 0, values[i].get<bool>()) << kv.key << "[" << i << "]";
      }
      break;
    case GgufValueType::kFloat32:
    case GgufValueType::kFloat64: {
      auto d = f.GetFloatArray(kv.key);
      ASSERT_TRUE(d.ok()) << d.status();
      ASSERT_EQ(d->size(), values.size());
      for (size_t i = 0; i < values.size(); ++i) EXPECT_EQ((*d)[i], values[i].get<double>());
      break;
    }
    default: {
      auto a = f.GetIntArray(kv.key);
      bool fits = true;
      for (const json& v : values) {
        fits = fits && !(v.is_number_unsigned() && v.get<uint64_t>() > uint64_t{INT64_MAX});
      }
      if (!fits) {
        // As for GetInt: a uint64 above INT64_MAX is an error, not a wrapped value.
        ASSERT_FALSE(a.ok()) << kv.key;
        EXPECT_NE(a.status().message().find(kv.key), std::string::npos) << a.status();
      } else {
        ASSERT_TRUE(a.ok()) << a.status();
        ASSERT_EQ(a->size(), values.size());
        for (size_t i = 0; i < values.size(); ++i) {
          EXPECT_EQ((*a)[i], values[i].get<int64_t>()) << kv.key << "[" << i << "]";
        }
      }
      // Every integer array also reads as numbers, with unsigned values kept unsigned.
      auto d = f.GetFloatArray(kv.key);
      ASSERT_TRUE(d.ok()) << d.status();
      ASSERT_EQ(d->size(), values.size());
      for (size_t i = 0; i < values.size(); ++i) {
        const double want = values[i].is_number_unsigned()
                                ? static_cast<double>(values[i].get<uint64_t>())
                                : static_cast<double>(values[i].get<int64_t>());
        EXPECT_EQ((*d)[i], want) << kv.key << "[" << i << "]";
      }
      break;
    }
  }
}

std::string Hex(const uint8_t* p, size_t n) {
  std::string s;
  for (size_t i = 0; i < n; ++i) s += absl::StrFormat("%02x", p[i]);
  return s;
}

void ExpectMatchesReader(const GgufFile& f, const uint8_t* base, const json& want) {
  EXPECT_EQ(f.version(), want["version"].get<uint32_t>());
  EXPECT_EQ(f.alignment(), want["alignment"].get<uint64_t>());
  ASSERT_EQ(f.metadata().size(), want["n_kv"].get<size_t>());
  size_t i = 0;
  for (const json& k : want["kvs"]) {
    const std::string key = k["key"];
    SCOPED_TRACE(key);
    // Metadata keeps file order.
    EXPECT_EQ(f.metadata()[i++].key, key);
    const GgufKv* kv = f.Find(key);
    ASSERT_NE(kv, nullptr);
    ASSERT_EQ(kv->type, TypeFromName(k["type"]));
    if (kv->type == GgufValueType::kArray) {
      ExpectArray(f, *kv, k);
    } else {
      ExpectScalar(f, *kv, k);
    }
  }
  ASSERT_EQ(f.tensors().size(), want["n_tensors"].get<size_t>());
  for (const json& t : want["tensors"]) {
    SCOPED_TRACE(t["name"].get<std::string>());
    const GgufTensor* g = f.FindTensor(t["name"].get<std::string>());
    ASSERT_NE(g, nullptr);
    EXPECT_EQ(static_cast<uint32_t>(g->type), t["type"].get<uint32_t>());
    EXPECT_EQ(g->dims, t["dims"].get<std::vector<int64_t>>());
    EXPECT_EQ(g->n_elements, t["n_elements"].get<int64_t>());
    EXPECT_EQ(g->n_bytes, t["n_bytes"].get<int64_t>());
    EXPECT_EQ(g->offset, t["offset"].get<uint64_t>());
    EXPECT_EQ(g->row_elements(), g->dims[0]);
    ASSERT_EQ(g->data, base + t["data_offset"].get<size_t>());
    EXPECT_EQ(Hex(g->data, 8), t["head_hex"].get<std::string>());
    EXPECT_EQ(Hex(g->data + g->n_bytes - 8, 8), t["tail_hex"].get<std::string>());
    auto got = f.GetTensor(g->name);
    ASSERT_TRUE(got.ok());
    EXPECT_EQ(*got, g);
  }
}

class GgufFixtureTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GgufFixtureTest, ParseMatchesGgufReader) {
  const std::vector<uint8_t> bytes = ReadBytes(ModelFixture(GetParam()));
  auto f = GgufFile::Parse(bytes, GetParam());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->name(), GetParam());
  ExpectMatchesReader(**f, bytes.data(), Fixtures()[GetParam()]);
}

TEST_P(GgufFixtureTest, OpenMapsTheFile) {
  const std::string path = ModelFixture(GetParam()).string();
  auto f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->name(), path);
  const json& want = Fixtures()[GetParam()];
  ASSERT_EQ((*f)->tensors().size(), want["n_tensors"].get<size_t>());
  if (!(*f)->tensors().empty()) {
    // Data pointers are relative to one map: the first tensor fixes its base.
    const GgufTensor& t0 = (*f)->tensors()[0];
    const uint8_t* base = t0.data - want["tensors"][0]["data_offset"].get<size_t>();
    ExpectMatchesReader(**f, base, want);
  }
}

INSTANTIATE_TEST_SUITE_P(Files, GgufFixtureTest,
                         ::testing::Values("gguf_all_types_v3.gguf", "gguf_all_types_v2.gguf",
                                           "gguf_no_tensors.gguf"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& c : n) {
                             if (c == '.') c = '_';
                           }
                           return n;
                         });

TEST(GgufTest, GettersCheckTypesAndName) {
  auto f = GgufFile::Open(ModelFixture("gguf_all_types_v3.gguf").string());
  ASSERT_TRUE(f.ok()) << f.status();
  const GgufFile& g = **f;
  auto missing = g.GetInt("no.such.key");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("no.such.key"), std::string::npos);
  EXPECT_NE(missing.status().message().find("gguf_all_types_v3.gguf"), std::string::npos);
  for (const auto& s :
       {g.GetInt("test.string").status(), g.GetString("test.u32").status(),
        g.GetBool("test.i8").status(), g.GetFloat("test.string").status(),
        g.GetStringArray("test.arr_i32").status(), g.GetIntArray("test.arr_str").status(),
        g.GetFloatArray("test.arr_nested_int").status()}) {
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.message().find("test."), std::string::npos) << s;
    EXPECT_NE(s.message().find("gguf_all_types_v3.gguf"), std::string::npos) << s;
  }
  auto fallback = g.GetIntOr("no.such.key", 17);
  ASSERT_TRUE(fallback.ok());
  EXPECT_EQ(*fallback, 17);
  EXPECT_FALSE(g.GetIntOr("test.string", 17).ok());  // present with the wrong type
  auto s = g.GetStringOr("no.such.key", "dflt");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(*s, "dflt");
  auto b = g.GetBoolOr("test.bool_true", false);
  ASSERT_TRUE(b.ok());
  EXPECT_TRUE(*b);
  auto d = g.GetFloatOr("test.f64", 0.0);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(*d, -1.5e300);
  // A uint64 above INT64_MAX reads as the (unsigned) number, not as -1.
  auto big = g.GetFloat("test.u64");
  ASSERT_TRUE(big.ok()) << big.status();
  EXPECT_EQ(*big, 18446744073709551615.0);
  // Integer getters accept any integer width.
  auto u8 = g.GetInt("test.u8");
  ASSERT_TRUE(u8.ok());
  EXPECT_EQ(*u8, 255);
  EXPECT_FALSE(g.GetTensor("no.such.tensor").ok());
  EXPECT_EQ(g.FindTensor("no.such.tensor"), nullptr);
  EXPECT_FALSE(g.Has("no.such.key"));
  EXPECT_TRUE(g.Has("test.after_nested"));
}

TEST(GgufTest, OpenMissingFileNamesIt) {
  auto f = GgufFile::Open("/nonexistent/dir/model.gguf");
  ASSERT_FALSE(f.ok());
  EXPECT_NE(f.status().message().find("/nonexistent/dir/model.gguf"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Corruptions of the v3 fixture, at byte offsets GGUFReader reported.

constexpr char kName[] = "corrupt.gguf";

class Corrupter {
 public:
  Corrupter() : bytes_(ReadBytes(ModelFixture("gguf_all_types_v3.gguf"))) {}
  const json& desc() const { return Fixtures()["gguf_all_types_v3.gguf"]; }
  const json& Kv(const std::string& key) const {
    for (const json& k : desc()["kvs"]) {
      if (k["key"] == key) return k;
    }
    ADD_FAILURE() << "no kv " << key;
    static const json empty;
    return empty;
  }
  const json& Tensor(const std::string& name) const {
    for (const json& t : desc()["tensors"]) {
      if (t["name"] == name) return t;
    }
    ADD_FAILURE() << "no tensor " << name;
    static const json empty;
    return empty;
  }
  template <typename T>
  void Put(size_t offset, T v) {
    ASSERT_LE(offset + sizeof(T), bytes_.size());
    std::memcpy(bytes_.data() + offset, &v, sizeof(T));
  }
  void PutBytes(size_t offset, const std::string& s) {
    ASSERT_LE(offset + s.size(), bytes_.size());
    std::memcpy(bytes_.data() + offset, s.data(), s.size());
  }
  std::vector<uint8_t>& bytes() { return bytes_; }

 private:
  std::vector<uint8_t> bytes_;
};

// Parses the corrupted bytes and checks the error names the file and each of `fields`.
void ExpectRejected(const std::vector<uint8_t>& bytes, std::vector<std::string> fields,
                    const std::string& what) {
  SCOPED_TRACE(what);
  auto f = GgufFile::Parse(bytes, kName);
  ASSERT_FALSE(f.ok()) << "accepted a file with " << what;
  const std::string msg(f.status().message());
  EXPECT_NE(msg.find(kName), std::string::npos) << "message does not name the file: " << msg;
  for (const std::string& field : fields) {
    EXPECT_NE(msg.find(field), std::string::npos)
        << "message does not name '" << field << "': " << msg;
  }
}

TEST(GgufCorruptionTest, EveryTruncationIsAnError) {
  Corrupter c;
  const size_t min_valid = c.desc()["min_valid_size"].get<size_t>();
  const std::vector<uint8_t>& full = c.bytes();
  for (size_t n = 0; n < min_valid; ++n) {
    std::vector<uint8_t> cut(full.begin(), full.begin() + n);
    auto f = GgufFile::Parse(cut, kName);
    ASSERT_FALSE(f.ok()) << "accepted the file truncated to " << n << " bytes";
    ASSERT_NE(f.status().message().find(kName), std::string::npos)
        << "truncated to " << n << ": " << f.status();
  }
  // Trailing padding after the last tensor is not needed.
  std::vector<uint8_t> exact(full.begin(), full.begin() + min_valid);
  EXPECT_TRUE(GgufFile::Parse(exact, kName).ok());
}

TEST(GgufCorruptionTest, Header) {
  {
    Corrupter c;
    c.PutBytes(0, "GGUG");
    ExpectRejected(c.bytes(), {"magic"}, "wrong magic");
  }
  for (uint32_t v : {0u, 1u, 4u, 0xffffffffu}) {
    Corrupter c;
    c.Put<uint32_t>(4, v);
    ExpectRejected(c.bytes(), {"version"}, absl::StrFormat("version %d", v));
  }
  for (uint64_t n : {uint64_t{1} << 40, ~uint64_t{0}, uint64_t{1} << 62}) {
    Corrupter c;
    c.Put<uint64_t>(8, n);
    ExpectRejected(c.bytes(), {"tensor"}, absl::StrFormat("n_tensors %d", n));
  }
  for (uint64_t n : {uint64_t{1} << 40, ~uint64_t{0}}) {
    Corrupter c;
    c.Put<uint64_t>(16, n);
    ExpectRejected(c.bytes(), {"metadata"}, absl::StrFormat("n_kv %d", n));
  }
  {
    // One entry more than written: the first tensor info is misread as a key.
    Corrupter c;
    c.Put<uint64_t>(16, c.desc()["n_kv"].get<uint64_t>() + 1);
    ExpectRejected(c.bytes(), {}, "n_kv one too many");
  }
  {
    Corrupter c;
    c.Put<uint64_t>(8, c.desc()["n_tensors"].get<uint64_t>() + 1);
    ExpectRejected(c.bytes(), {}, "n_tensors one too many");
  }
}

TEST(GgufCorruptionTest, Metadata) {
  {
    Corrupter c;
    c.Put<uint64_t>(c.Kv("general.architecture")["offset"].get<size_t>(), uint64_t{1} << 40);
    ExpectRejected(c.bytes(), {"key"}, "key length past the end");
  }
  {
    Corrupter c;
    c.Put<uint64_t>(c.Kv("test.string")["value_offset"].get<size_t>(), uint64_t{1} << 40);
    ExpectRejected(c.bytes(), {"test.string"}, "string length past the end");
  }
  {
    Corrupter c;
    c.Put<uint64_t>(c.Kv("test.string")["value_offset"].get<size_t>(), ~uint64_t{0});
    ExpectRejected(c.bytes(), {"test.string"}, "string length 2^64-1");
  }
  for (uint32_t t : {13u, 99u, 0x80000000u}) {
    Corrupter c;
    c.Put<uint32_t>(c.Kv("test.u32")["type_offset"].get<size_t>(), t);
    ExpectRejected(c.bytes(), {"test.u32"}, absl::StrFormat("value type %d", t));
  }
  {
    Corrupter c;
    c.Put<uint32_t>(c.Kv("test.arr_u8")["value_offset"].get<size_t>(), 77);
    ExpectRejected(c.bytes(), {"test.arr_u8"}, "unknown array element type");
  }
  for (const char* key : {"test.arr_i32", "test.arr_u64", "test.arr_str", "test.arr_nested_int"}) {
    for (uint64_t n : {uint64_t{1} << 61, ~uint64_t{0}, uint64_t{1} << 32}) {
      Corrupter c;
      c.Put<uint64_t>(c.Kv(key)["count_offset"].get<size_t>(), n);
      ExpectRejected(c.bytes(), {key}, absl::StrFormat("%s count %d", key, n));
    }
  }
  {
    Corrupter c;
    c.Put<uint64_t>(c.Kv("test.arr_str")["first_string_len_offset"].get<size_t>(),
                    uint64_t{1} << 50);
    ExpectRejected(c.bytes(), {"test.arr_str"}, "array string length past the end");
  }
  {
    // The first inner array of test.arr_nested_int: its element type, then its count.
    const size_t inner = Corrupter().Kv("test.arr_nested_int")["count_offset"].get<size_t>() + 8;
    Corrupter c;
    c.Put<uint32_t>(inner, 55);
    ExpectRejected(c.bytes(), {"test.arr_nested_int"}, "nested array element type");
    Corrupter d;
    d.Put<uint64_t>(inner + 4, uint64_t{1} << 60);
    ExpectRejected(d.bytes(), {"test.arr_nested_int"}, "nested array count");
  }
  {
    Corrupter c;
    const json& b = c.Kv("test.dup_b");
    c.PutBytes(b["key_offset"].get<size_t>(), "test.dup_a");
    ExpectRejected(c.bytes(), {"test.dup_a"}, "duplicate key");
  }
  for (uint32_t a : {0u, 3u, 48u, 0x80000000u}) {
    Corrupter c;
    c.Put<uint32_t>(c.Kv("general.alignment")["value_offset"].get<size_t>(), a);
    ExpectRejected(c.bytes(), {"general.alignment"}, absl::StrFormat("alignment %d", a));
  }
  {
    Corrupter c;  // same 4 bytes reinterpreted as a float: not an integer alignment
    c.Put<uint32_t>(c.Kv("general.alignment")["type_offset"].get<size_t>(),
                    static_cast<uint32_t>(GgufValueType::kFloat32));
    ExpectRejected(c.bytes(), {"general.alignment"}, "float alignment");
  }
}

TEST(GgufCorruptionTest, TensorInfo) {
  const std::string t2 = "t.f32_2d";
  for (uint32_t n : {0u, 5u, 0xffffffffu}) {
    Corrupter c;
    c.Put<uint32_t>(c.Tensor(t2)["n_dims_offset"].get<size_t>(), n);
    ExpectRejected(c.bytes(), {t2}, absl::StrFormat("n_dims %d", n));
  }
  {
    Corrupter c;  // 2^40 x 2^40 elements overflows any byte count
    const size_t dims = c.Tensor(t2)["dims_offset"].get<size_t>();
    c.Put<uint64_t>(dims, uint64_t{1} << 40);
    c.Put<uint64_t>(dims + 8, uint64_t{1} << 40);
    ExpectRejected(c.bytes(), {t2}, "overflowing dims");
  }
  {
    Corrupter c;
    const size_t dims = c.Tensor(t2)["dims_offset"].get<size_t>();
    c.Put<uint64_t>(dims, ~uint64_t{0});
    ExpectRejected(c.bytes(), {t2}, "dim 2^64-1");
  }
  {
    Corrupter c;  // fits in int64 arithmetic but far beyond the file
    c.Put<uint64_t>(c.Tensor(t2)["dims_offset"].get<size_t>(), uint64_t{1} << 30);
    ExpectRejected(c.bytes(), {t2}, "tensor larger than the file");
  }
  for (uint32_t t : {4u, 5u, 99u, 0xffffffffu}) {  // 4 and 5 are retired ggml ids
    Corrupter c;
    c.Put<uint32_t>(c.Tensor(t2)["type_offset"].get<size_t>(), t);
    ExpectRejected(c.bytes(), {t2}, absl::StrFormat("ggml type %d", t));
  }
  {
    Corrupter c;  // a 3-element row cannot be Q4_0 (32-element blocks)
    c.Put<uint32_t>(c.Tensor(t2)["type_offset"].get<size_t>(), 2);
    ExpectRejected(c.bytes(), {t2}, "row not a multiple of the block size");
  }
  const json& last = Corrupter().desc()["tensors"].back();
  const std::string lname = last["name"];
  for (uint64_t off : {uint64_t{1} << 40, ~uint64_t{0} - 63, uint64_t{1} << 63}) {
    Corrupter c;
    c.Put<uint64_t>(last["offset_offset"].get<size_t>(), off);
    ExpectRejected(c.bytes(), {lname}, absl::StrFormat("offset %d", off));
  }
  {
    Corrupter c;  // one alignment step past the last valid position
    const uint64_t data_size = c.bytes().size() - c.desc()["data_start"].get<uint64_t>();
    const uint64_t off = (data_size - last["n_bytes"].get<uint64_t>() + 64) / 64 * 64;
    c.Put<uint64_t>(last["offset_offset"].get<size_t>(), off);
    ExpectRejected(c.bytes(), {lname}, "data just past the end");
  }
  {
    Corrupter c;
    c.Put<uint64_t>(last["offset_offset"].get<size_t>(), last["offset"].get<uint64_t>() + 1);
    ExpectRejected(c.bytes(), {lname}, "misaligned offset");
  }
  {
    Corrupter c;
    c.PutBytes(c.Tensor("t.f32_1d")["info_offset"].get<size_t>() + 8, t2);
    ExpectRejected(c.bytes(), {t2}, "duplicate tensor name");
  }
  {
    Corrupter c;
    c.Put<uint64_t>(c.Tensor(t2)["info_offset"].get<size_t>(), uint64_t{1} << 40);
    ExpectRejected(c.bytes(), {"tensor"}, "tensor name length past the end");
  }
}

// ---------------------------------------------------------------------------------------------
// Hand-built files for shapes GGUFWriter cannot produce.

class GgufBytes {
 public:
  GgufBytes(uint64_t n_tensors, uint64_t n_kv) {
    U32(0x46554747);
    U32(3);
    U64(n_tensors);
    U64(n_kv);
  }
  GgufBytes& U32(uint32_t v) { return Raw(&v, 4); }
  GgufBytes& U64(uint64_t v) { return Raw(&v, 8); }
  GgufBytes& Str(const std::string& s) {
    U64(s.size());
    return Raw(s.data(), s.size());
  }
  GgufBytes& Raw(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    bytes_.insert(bytes_.end(), b, b + n);
    return *this;
  }
  GgufBytes& Pad(size_t align) {
    while (bytes_.size() % align != 0) bytes_.push_back(0);
    return *this;
  }
  const std::vector<uint8_t>& bytes() const { return bytes_; }

 private:
  std::vector<uint8_t> bytes_;
};

TEST(GgufSyntheticTest, HeaderOnlyFileIsValid) {
  auto f = GgufFile::Parse(GgufBytes(0, 0).bytes(), kName);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE((*f)->metadata().empty());
  EXPECT_TRUE((*f)->tensors().empty());
  EXPECT_EQ((*f)->alignment(), 32u);
}

TEST(GgufSyntheticTest, DeeplyNestedArrayIsAnErrorNotARecursionBomb) {
  // 10,000 levels of array-of-array: a recursive reader without a depth bound would blow the
  // stack on a few KB of input.
  GgufBytes b(0, 1);
  b.Str("deep").U32(static_cast<uint32_t>(GgufValueType::kArray));
  for (int i = 0; i < 10000; ++i) b.U32(static_cast<uint32_t>(GgufValueType::kArray)).U64(1);
  b.U32(static_cast<uint32_t>(GgufValueType::kUint8)).U64(1).U32(0);
  ExpectRejected(b.bytes(), {"deep"}, "arrays nested 10000 deep");
}

TEST(GgufSyntheticTest, ManyEmptyStringsAreBounded) {
  // A count the file can just hold must parse; a count of 2^40 empty strings must not make the
  // parser reserve 2^40 views before noticing the file ends.
  GgufBytes ok(0, 1);
  ok.Str("s").U32(static_cast<uint32_t>(GgufValueType::kArray));
  ok.U32(static_cast<uint32_t>(GgufValueType::kString)).U64(100);
  for (int i = 0; i < 100; ++i) ok.Str("");
  auto f = GgufFile::Parse(ok.bytes(), kName);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->Find("s")->strings.size(), 100u);

  GgufBytes bad(0, 1);
  bad.Str("s").U32(static_cast<uint32_t>(GgufValueType::kArray));
  bad.U32(static_cast<uint32_t>(GgufValueType::kString)).U64(uint64_t{1} << 40);
  for (int i = 0; i < 100; ++i) bad.Str("");
  ExpectRejected(bad.bytes(), {"s"}, "2^40 strings");
}

TEST(GgufSyntheticTest, DataSectionAlignment) {
  // One F32 tensor of 4 elements; its data must be found at the next multiple of the
  // alignment after the tensor infos, for the default and for a custom alignment.
  for (uint32_t align : {32u, 8u, 256u}) {
    SCOPED_TRACE(align);
    GgufBytes b(1, align == 32 ? 0 : 1);
    if (align != 32) b.Str("general.alignment").U32(4).U32(align);
    b.Str("w").U32(1).U64(4).U32(0).U64(0).Pad(align);
    const size_t data_start = b.bytes().size();
    const float vals[4] = {1.f, -2.f, 3.5f, 0.25f};
    b.Raw(vals, sizeof(vals));
    auto f = GgufFile::Parse(b.bytes(), kName);
    ASSERT_TRUE(f.ok()) << f.status();
    const GgufTensor* t = (*f)->FindTensor("w");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->data, b.bytes().data() + data_start);
    EXPECT_EQ(std::memcmp(t->data, vals, sizeof(vals)), 0);
  }
}

}  // namespace
}  // namespace quantkv
