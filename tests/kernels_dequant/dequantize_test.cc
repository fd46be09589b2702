// Dequantizers against gguf-py's reference output (fixtures made by
// tools/fixtures/make_dequant_fixture.py), their error handling, the bulk fp16 conversions
// against the scalar ones, and the CUDA per-element decoder (host build) against the CPU code.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/dequantize_element.h"
#include "kernels/dequantize.h"
#include "kernels/fp16.h"
#include "kernels/ggml_types.h"
#include "tests/testutil/paths.h"

namespace quantkv::kernels {
namespace {

std::vector<uint8_t> ReadFile(const std::string& name) {
  const std::filesystem::path path = testing::FixturePath("dequant/" + name);
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path
                         << " (run tools/fixtures/make_dequant_fixture.py)";
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

// Bit-identical, except that any NaN matches any NaN of the same sign.
void ExpectSameFloats(const float* got, const float* want, int64_t n, const std::string& what) {
  int reported = 0;
  for (int64_t i = 0; i < n && reported < 8; ++i) {
    const bool same = std::isnan(want[i])
                          ? std::isnan(got[i]) && std::signbit(got[i]) == std::signbit(want[i])
                          : BitsFromFp32(got[i]) == BitsFromFp32(want[i]);
    if (!same) {
      ADD_FAILURE() << what << " element " << i << ": got " << got[i] << " (0x" << std::hex
                    << BitsFromFp32(got[i]) << "), want " << want[i] << " (0x"
                    << BitsFromFp32(want[i]) << std::dec << ")";
      ++reported;
    }
  }
}

// Random seed per run (fresh inputs), printed so that a failure can be reproduced.
// absl::Status messages are absl::string_view, which Debian's absl keeps distinct from std's.
bool MessageHas(const absl::Status& s, std::string_view needle) {
  return std::string(s.message()).find(needle) != std::string::npos;
}

uint64_t FreshSeed() {
  const uint64_t seed =
      (static_cast<uint64_t>(std::random_device{}()) << 32) | std::random_device{}();
  std::cout << "[ seed ] " << seed << "\n";
  return seed;
}

// The fp16 scale fields of each block type, as (byte offset, lo, hi), mirroring the fixture
// script; everything else in a block is random bytes.
struct ScaleField {
  int offset;
  float lo, hi;
};
std::vector<ScaleField> ScaleFields(GgmlType type) {
  const ScaleField d{0, -2.0f, 2.0f}, m{2, 0.0f, 0.1f};
  switch (type) {
    case GgmlType::kQ4_0:
    case GgmlType::kQ5_0:
    case GgmlType::kQ8_0:
      return {d};
    case GgmlType::kQ4_1:
    case GgmlType::kQ5_1:
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K:
      return {d, m};
    case GgmlType::kQ6_K:
      return {{208, -2.0f, 2.0f}};
    default:
      return {};  // F32 / F16 / BF16: random bit patterns, NaN and Inf included
  }
}

std::vector<uint8_t> RandomBlocks(GgmlType type, int64_t blocks, std::mt19937_64& rng) {
  const GgmlTypeInfo& info = GgmlTypeInfoOf(type);
  std::vector<uint8_t> bytes(blocks * info.type_size);
  std::uniform_int_distribution<int> byte(0, 255);
  for (uint8_t& b : bytes) b = static_cast<uint8_t>(byte(rng));
  for (const ScaleField& f : ScaleFields(type)) {
    std::uniform_real_distribution<float> value(f.lo, f.hi);
    for (int64_t i = 0; i < blocks; ++i) {
      const uint16_t h = Fp32ToFp16(value(rng));
      std::memcpy(&bytes[i * info.type_size + f.offset], &h, 2);
    }
  }
  return bytes;
}

const GgmlType kDequantizable[] = {
    GgmlType::kF32,  GgmlType::kF16,  GgmlType::kBF16, GgmlType::kQ4_0,
    GgmlType::kQ4_1, GgmlType::kQ5_0, GgmlType::kQ5_1, GgmlType::kQ8_0,
    GgmlType::kQ4_K, GgmlType::kQ5_K, GgmlType::kQ6_K,
};

class DequantizeFixtureTest : public ::testing::TestWithParam<GgmlType> {};

TEST_P(DequantizeFixtureTest, MatchesGgufPyReference) {
  const GgmlTypeInfo& info = GgmlTypeInfoOf(GetParam());
  const std::string name(info.name);
  const std::vector<uint8_t> raw = ReadFile(name + ".bin");
  const std::vector<uint8_t> expected_bytes = ReadFile(name + ".expected.bin");
  const int64_t n = expected_bytes.size() / sizeof(float);
  ASSERT_GT(n, 0);
  ASSERT_EQ(static_cast<int64_t>(raw.size()), n / info.block_size * info.type_size);
  std::vector<float> expected(n);
  std::memcpy(expected.data(), expected_bytes.data(), expected_bytes.size());

  std::vector<float> got(n, -1.0f);
  ASSERT_TRUE(DequantizeRow(GetParam(), raw.data(), got.data(), n).ok());
  ExpectSameFloats(got.data(), expected.data(), n, name + " DequantizeRow");

  // The same data as two rows; the fixtures have an even number of blocks.
  ASSERT_EQ(n / info.block_size % 2, 0);
  std::fill(got.begin(), got.end(), -1.0f);
  ASSERT_TRUE(DequantizeRows(GetParam(), raw.data(), got.data(), 2, n / 2).ok());
  ExpectSameFloats(got.data(), expected.data(), n, name + " DequantizeRows");
}

INSTANTIATE_TEST_SUITE_P(AllTypes, DequantizeFixtureTest, ::testing::ValuesIn(kDequantizable),
                         [](const ::testing::TestParamInfo<GgmlType>& p) {
                           return std::string(GgmlTypeInfoOf(p.param).name);
                         });

TEST(DequantizeTest, TableMarksExactlyTheDecodedTypesDequantizable) {
  for (GgmlType type : kDequantizable) EXPECT_TRUE(GgmlTypeInfoOf(type).dequantizable);
  for (GgmlType type : {GgmlType::kQ8_1, GgmlType::kQ2_K, GgmlType::kQ3_K, GgmlType::kQ8_K}) {
    EXPECT_FALSE(GgmlTypeInfoOf(type).dequantizable) << GgmlTypeInfoOf(type).name;
  }
}

TEST(DequantizeTest, RejectsRowNotMultipleOfBlock) {
  std::vector<uint8_t> src(1024);
  std::vector<float> dst(1024);
  for (auto [type, n] : {std::pair{GgmlType::kQ4_0, int64_t{31}},
                         {GgmlType::kQ4_K, int64_t{288}},
                         {GgmlType::kF16, int64_t{-1}}}) {
    const absl::Status s = DequantizeRow(type, src.data(), dst.data(), n);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(MessageHas(s, GgmlTypeInfoOf(type).name)) << s;
    const absl::Status rows = DequantizeRows(type, src.data(), dst.data(), 1, n);
    EXPECT_EQ(rows.code(), absl::StatusCode::kInvalidArgument) << rows;
  }
  EXPECT_EQ(DequantizeRows(GgmlType::kQ8_0, src.data(), dst.data(), -1, 32).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(DequantizeTest, RejectsUnknownAndUnsupportedTypes) {
  std::vector<uint8_t> src(1024);
  std::vector<float> dst(1024);
  // Id 4 was Q4_2, removed from ggml: not in the table.
  const absl::Status unknown = DequantizeRow(static_cast<GgmlType>(4), src.data(), dst.data(), 32);
  EXPECT_EQ(unknown.code(), absl::StatusCode::kInvalidArgument) << unknown;
  EXPECT_TRUE(MessageHas(unknown, "4")) << unknown;
  EXPECT_FALSE(DequantizeRows(static_cast<GgmlType>(4), src.data(), dst.data(), 0, 32).ok());

  const absl::Status q2k = DequantizeRow(GgmlType::kQ2_K, src.data(), dst.data(), 256);
  EXPECT_EQ(q2k.code(), absl::StatusCode::kUnimplemented) << q2k;
  EXPECT_TRUE(MessageHas(q2k, "Q2_K")) << q2k;
}

TEST(DequantizeTest, EmptyRowIsOk) {
  EXPECT_TRUE(DequantizeRow(GgmlType::kQ6_K, nullptr, nullptr, 0).ok());
  EXPECT_TRUE(DequantizeRows(GgmlType::kQ4_0, nullptr, nullptr, 0, 64).ok());
}

TEST(Fp16RowTest, EveryHalfMatchesScalar) {
  std::vector<uint16_t> all(1 << 16);
  for (int i = 0; i < (1 << 16); ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<float> want(all.size()), got(all.size());
  for (size_t i = 0; i < all.size(); ++i) want[i] = Fp16ToFp32(all[i]);
  Fp16ToFp32Row(all.data(), got.data(), all.size());
  ExpectSameFloats(got.data(), want.data(), all.size(), "Fp16ToFp32Row");
  // Lengths and offsets off the 8-lane vector width exercise the scalar tail.
  for (int64_t start : {1, 3}) {
    for (int64_t n : {0, 1, 7, 13}) {
      std::fill(got.begin(), got.end(), 0.0f);
      Fp16ToFp32Row(all.data() + start, got.data(), n);
      ExpectSameFloats(got.data(), want.data() + start, n, "Fp16ToFp32Row tail");
      EXPECT_EQ(got[n], 0.0f) << "wrote past n=" << n;
    }
  }
}

TEST(Fp16RowTest, FloatToHalfMatchesScalarOnFreshRandomInput) {
  std::mt19937_64 rng(FreshSeed());
  std::vector<float> src;
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 20000; ++i) src.push_back(Fp32FromBits(bits(rng)));  // all classes
  std::uniform_real_distribution<float> in_range(-70000.0f, 70000.0f);
  for (int i = 0; i < 20000; ++i) src.push_back(in_range(rng));  // incl. overflow to inf
  std::uniform_real_distribution<float> tiny(-1e-4f, 1e-4f);
  for (int i = 0; i < 20000; ++i) src.push_back(tiny(rng));  // half subnormals
  // Exact ties between adjacent halves (normal and subnormal), where rounding mode matters.
  std::uniform_int_distribution<int> half(0, 0x7bfe);
  for (int i = 0; i < 20000; ++i) {
    const uint16_t h = static_cast<uint16_t>(half(rng));
    const float mid = (Fp16ToFp32(h) + Fp16ToFp32(h + 1)) / 2;  // exact in float
    src.push_back(i % 2 ? mid : -mid);
  }
  for (float special : {0.0f, -0.0f, INFINITY, -INFINITY, NAN, -NAN, 65504.0f, 65520.0f, 65519.996f,
                        5.9604645e-08f, 2.9802322e-08f, 2.9802326e-08f, 1e-45f}) {
    src.push_back(special);
  }
  src.push_back(1.0f);  // odd total length: a scalar tail

  std::vector<uint16_t> got(src.size() + 1, 0xabcd);
  Fp32ToFp16Row(src.data(), got.data(), src.size());
  EXPECT_EQ(got[src.size()], 0xabcd) << "wrote past the end";
  int reported = 0;
  for (size_t i = 0; i < src.size() && reported < 8; ++i) {
    const uint16_t want = Fp32ToFp16(src[i]);
    const bool want_nan = (want & 0x7c00) == 0x7c00 && (want & 0x3ff) != 0;
    const bool got_nan = (got[i] & 0x7c00) == 0x7c00 && (got[i] & 0x3ff) != 0;
    const bool same = want_nan ? got_nan && (got[i] >> 15) == (want >> 15) : got[i] == want;
    if (!same) {
      ADD_FAILURE() << "Fp32ToFp16Row(" << src[i] << " = 0x" << std::hex << BitsFromFp32(src[i])
                    << "): got 0x" << got[i] << ", want 0x" << want << std::dec;
      ++reported;
    }
  }
}

// The CUDA kernel's per-element decoder, built for the host, against the CPU reference on fresh
// random blocks: the index arithmetic the GPU runs is checked even without a GPU.
template <GgmlType T>
void CheckElementDecoder(std::mt19937_64& rng) {
  using B = cuda::detail::Block<T>;
  const GgmlTypeInfo& info = GgmlTypeInfoOf(T);
  ASSERT_EQ(B::kElems, info.block_size) << info.name;
  ASSERT_EQ(B::kBytes, info.type_size) << info.name;
  const int64_t blocks = info.block_size == 1 ? 4096 : 64;
  const std::vector<uint8_t> raw = RandomBlocks(T, blocks, rng);
  const int64_t n = blocks * info.block_size;
  std::vector<float> want(n), got(n);
  ASSERT_TRUE(DequantizeRow(T, raw.data(), want.data(), n).ok());
  for (int64_t i = 0; i < n; ++i) {
    got[i] = cuda::detail::DecodeElement<T>(raw.data() + i / B::kElems * B::kBytes,
                                            static_cast<int>(i % B::kElems));
  }
  ExpectSameFloats(got.data(), want.data(), n, std::string(info.name) + " DecodeElement");
}

TEST(CudaElementDecoderTest, MatchesCpuReferenceOnFreshRandomBlocks) {
  std::mt19937_64 rng(FreshSeed());
  CheckElementDecoder<GgmlType::kF32>(rng);
  CheckElementDecoder<GgmlType::kF16>(rng);
  CheckElementDecoder<GgmlType::kBF16>(rng);
  CheckElementDecoder<GgmlType::kQ4_0>(rng);
  CheckElementDecoder<GgmlType::kQ4_1>(rng);
  CheckElementDecoder<GgmlType::kQ5_0>(rng);
  CheckElementDecoder<GgmlType::kQ5_1>(rng);
  CheckElementDecoder<GgmlType::kQ8_0>(rng);
  CheckElementDecoder<GgmlType::kQ4_K>(rng);
  CheckElementDecoder<GgmlType::kQ5_K>(rng);
  CheckElementDecoder<GgmlType::kQ6_K>(rng);
}

TEST(CudaElementDecoderTest, Bf16RoundingMatchesScalar) {
  std::mt19937_64 rng(FreshSeed());
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 100000; ++i) {
    const float f = Fp32FromBits(bits(rng));
    ASSERT_EQ(cuda::detail::FloatToBf16Bits(f), Fp32ToBf16(f)) << std::hex << BitsFromFp32(f);
  }
  for (uint32_t b : {0x3f808000u, 0x3f818000u, 0x7f7fffffu, 0x7f800000u, 0x7fc00001u, 0u}) {
    EXPECT_EQ(cuda::detail::FloatToBf16Bits(Fp32FromBits(b)), Fp32ToBf16(Fp32FromBits(b)))
        << std::hex << b;
  }
}

}  // namespace
}  // namespace quantkv::kernels
