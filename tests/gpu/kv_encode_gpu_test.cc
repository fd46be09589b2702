// Quantize-on-append against the CPU cache's codecs, bit for bit.
//
// On the CPU (no GPU needed): kernels/kv_slab_format.h's element decoders equal
// KvCodec::Decode on every element of slabs the CPU codecs encoded, its slab sizes equal the
// codecs', its refusals name the part of the spec; its encoding passes (the ones the CUDA
// kernel runs) run on the host give KvCodec::Encode's bytes, and its scalar conversions equal
// kernels/fp16.h and the codecs' rounding helpers.
// On a GPU: KvWriteRows stores rows where (and as) KvCache::Write does, and KvEncodeBlocks
// gives KvCodec::Encode's bytes for every format, several heads and jobs, blocks that wrap
// around the ring, fp16 and fp32 storage, slabs at odd addresses, nothing written outside.
//
// Inputs are random per run (seed printed); QUANTKV_TEST_SEED replays one.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/cpu/kv_codec_internal.h"
#include "kernels/dequantize.h"
#include "kernels/fp16.h"
#include "kernels/kv_codec.h"
#include "kernels/kv_encode.h"
#include "kernels/kv_slab_format.h"
#include "tests/gpu/gpu_test_util.h"

namespace quantkv::kernels {
namespace kv_codec_internal {
uint16_t Fp16RoundDown(float v);  // kv_codec_uniform.cc (not in the internal header)
}  // namespace kv_codec_internal
namespace {

using cuda::KvEncodeJob;
using cuda::KvProtectedRows;
using cuda::KvWriteBatch;
using gpu_test::DeviceBuffer;

// Every spec KvSlabFormatOf accepts, in many shapes: all bit widths, both zero-point modes,
// token groups from 1 channel (codes of one group straddle bytes) to the whole head, per
// channel, per block, clipping.
const char* const kSpecs[] = {
    "fp16",
    "bf16",
    "fp32",
    "fp8:g64",
    "fp8:g32",
    "fp8:g16:clip0.9",
    "fp8:g4",
    "int8:g64:asym",
    "int8:g64:sym",
    "int8:chan",
    "int8:block:clip0.9",
    "int4:g32:asym",
    "int4:g32:sym:clip0.95",
    "int4:g1",
    "int4:chan",
    "int4:chan:sym",
    "int4:block",
    "int4:block:sym",
    "int3:chan",
    "int3:g32:sym",
    "int3:g64:asym:clip0.8",
    "int3:g4",
    "int3:block",
    "int2:chan:clip0.7",
    "int2:chan:sym",
    "int2:g64:asym:clip0.9",
    "int2:g16:sym",
    "int2:block",
    "int2:block:sym:clip0.8",
};

struct Geometry {
  int64_t head_dim, block_tokens;
};
// 40 channels: per-channel decoders' scalar tails (not a multiple of 16).
const Geometry kGeometries[] = {{128, 16}, {64, 32}, {40, 8}};

KvCodecSpec MustParse(const std::string& text) {
  absl::StatusOr<KvCodecSpec> spec = ParseKvCodecSpec(text);
  EXPECT_TRUE(spec.ok()) << text << ": " << spec.status();
  return spec.ok() ? *spec : KvCodecSpec{};
}

// The codec and format of `text` at `g`, or false when the spec does not fit the geometry
// (a group that does not divide head_dim); both must then refuse it.
bool Make(const std::string& text, const Geometry& g, std::unique_ptr<KvCodec>* codec,
          KvSlabFormat* format) {
  const KvCodecSpec spec = MustParse(text);
  absl::StatusOr<std::unique_ptr<KvCodec>> c = KvCodec::Create(spec, g.head_dim, g.block_tokens);
  absl::StatusOr<KvSlabFormat> f = KvSlabFormatOf(spec, g.head_dim, g.block_tokens);
  if (!c.ok()) {
    EXPECT_FALSE(f.ok()) << text << " d=" << g.head_dim << ": the codec refuses (" << c.status()
                         << ") but the slab format does not";
    return false;
  }
  EXPECT_TRUE(f.ok()) << text << " d=" << g.head_dim << ": " << f.status();
  if (!f.ok()) return false;
  *codec = std::move(*c);
  *format = *f;
  return true;
}

bool SameFloat(float a, float b) {
  if (std::isnan(a) && std::isnan(b)) return true;
  return BitsFromFp32(a) == BitsFromFp32(b);
}

// Random rows of `n_tokens` x `width` with what trips encoders up: per-channel magnitudes
// from 1e-3 to 30, planted outliers, a constant row, a row of mixed +0 / -0, fp16-subnormal
// values, NaNs (one element, one whole token group, one channel over several tokens) and,
// with `inf`, infinities.
std::vector<float> RandomRows(std::mt19937_64& rng, int64_t n_tokens, int64_t width, bool inf) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  std::vector<float> chan_scale(static_cast<size_t>(width));
  std::vector<float> chan_shift(static_cast<size_t>(width));
  for (int64_t c = 0; c < width; ++c) {
    chan_scale[c] = std::pow(10.0f, -3.0f + 4.5f * uni(rng));
    chan_shift[c] = uni(rng) < 0.3f ? 4.0f * normal(rng) : 0.0f;
  }
  std::vector<float> x(static_cast<size_t>(n_tokens * width));
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int64_t c = 0; c < width; ++c) {
      x[t * width + c] = chan_shift[c] + chan_scale[c] * normal(rng);
    }
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto at = [&](int64_t t, int64_t c) -> float& { return x[(t % n_tokens) * width + c % width]; };
  std::uniform_int_distribution<int64_t> tok(0, n_tokens - 1), ch(0, width - 1);
  for (int i = 0; i < 6; ++i)
    at(tok(rng), ch(rng)) = (uni(rng) < 0.5f ? -1 : 1) * 500.0f * uni(rng);
  const int64_t constant = tok(rng);
  const float cv = normal(rng);
  for (int64_t c = 0; c < width; ++c) at(constant, c) = cv;
  const int64_t zeros = tok(rng);
  for (int64_t c = 0; c < width; ++c) at(zeros, c) = (rng() & 1) ? -0.0f : 0.0f;
  for (int i = 0; i < 8; ++i) at(tok(rng), ch(rng)) = 3e-6f * normal(rng);  // half subnormal
  at(tok(rng), ch(rng)) = nan;
  const int64_t nan_row = tok(rng), nan_c0 = ch(rng) / 4 * 4;
  for (int64_t c = nan_c0; c < nan_c0 + 4; ++c) at(nan_row, c) = nan;  // a group of <= 4
  const int64_t nan_col = ch(rng);
  for (int64_t t = 0; t < n_tokens; t += 2) at(t, nan_col) = -nan;
  if (inf) {
    at(tok(rng), ch(rng)) = std::numeric_limits<float>::infinity();
    at(tok(rng), ch(rng)) = -std::numeric_limits<float>::infinity();
  }
  return x;
}

// The block as the CPU cache encodes it from fp16 storage: rounded through fp16.
std::vector<float> ThroughFp16(const std::vector<float>& x) {
  std::vector<uint16_t> h(x.size());
  std::vector<float> y(x.size());
  Fp32ToFp16Row(x.data(), h.data(), static_cast<int64_t>(x.size()));
  Fp16ToFp32Row(h.data(), y.data(), static_cast<int64_t>(x.size()));
  return y;
}

// Values halfway between the codes of a uniform slab whose scale comes out as `step`: every
// token group and every channel holds the ends of the range, the rest are step * (k + 1/2),
// where (x - min) * inv + 0.5 lands next to an integer, so an inverse or a rounding that
// differs by one ulp from the CPU's changes codes.
std::vector<float> HalfStepRows(std::mt19937_64& rng, const KvSlabFormat& f, float step) {
  const int64_t bt = f.block_tokens, d = f.head_dim, gs = f.group_size;
  const int q = f.symmetric ? (1 << (f.bits - 1)) - 1 : (1 << f.bits) - 1;
  const int k0 = f.symmetric ? -q : 0;  // codes' range in steps: [k0, q]
  std::uniform_int_distribution<int> k(k0, q - 1);
  std::vector<float> x(static_cast<size_t>(bt * d));
  for (int64_t t = 0; t < bt; ++t) {
    for (int64_t c = 0; c < d; ++c) {
      float v = step * (static_cast<float>(k(rng)) + 0.5f);
      if (t == 0 || (gs > 1 && c % gs == 0)) v = step * static_cast<float>(k0);
      if (t == 1 || (gs > 1 && c % gs == gs - 1)) v = step * static_cast<float>(q);
      x[t * d + c] = v;
    }
  }
  return x;
}

// fp8 rows whose every token group holds 448 (scale 1 when clip is 1, so the codes are the
// E4M3 rounding of the values themselves) and otherwise E4M3 values, the midpoints between
// neighbours and the floats next to those midpoints, with random signs.
std::vector<float> E4M3TieRows(std::mt19937_64& rng, const KvSlabFormat& f) {
  std::vector<float> vals;
  for (int c = 0; c < 0x7e; ++c) {
    const float a = slab::E4M3ToFloat(static_cast<uint8_t>(c));
    const float b = slab::E4M3ToFloat(static_cast<uint8_t>(c + 1));
    const float mid = a + 0.5f * (b - a);
    vals.insert(vals.end(), {a, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f)});
  }
  vals.push_back(450.0f);
  vals.push_back(1e-12f);
  std::shuffle(vals.begin(), vals.end(), rng);
  std::vector<float> x(static_cast<size_t>(f.block_tokens * f.head_dim));
  for (size_t i = 0; i < x.size(); ++i) {
    const float v = (i % f.group_size == 0) ? 448.0f : vals[i % vals.size()];
    x[i] = (rng() & 1) ? -v : v;
  }
  return x;
}

// Block inputs for one geometry: plain, through fp16, with infinities, one column all NaN
// (a per-block channel without values), all zero, all one value; half steps for uniform.
std::vector<std::vector<float>> Blocks(std::mt19937_64& rng, const Geometry& g,
                                       const KvSlabFormat& f) {
  const int64_t bt = g.block_tokens, d = g.head_dim;
  std::vector<std::vector<float>> out;
  for (int i = 0; i < 3; ++i) out.push_back(RandomRows(rng, bt, d, false));
  out.push_back(ThroughFp16(RandomRows(rng, bt, d, false)));
  out.push_back(RandomRows(rng, bt, d, true));
  std::vector<float> nan_col = RandomRows(rng, bt, d, false);
  for (int64_t t = 0; t < bt; ++t) nan_col[t * d + 3] = std::numeric_limits<float>::quiet_NaN();
  out.push_back(nan_col);
  out.push_back(std::vector<float>(static_cast<size_t>(bt * d), 0.0f));
  out.push_back(std::vector<float>(static_cast<size_t>(bt * d), -2.75f));
  if (f.kind == KvSlabKind::kFp8E4M3) {
    for (int i = 0; i < 3; ++i) out.push_back(E4M3TieRows(rng, f));
  }
  if (f.kind == KvSlabKind::kUniform) {
    for (float step : {1.0f, 3.0f, 0.078125f, 0.01171875f}) {
      out.push_back(HalfStepRows(rng, f, step));
    }
  }
  return out;
}

// ---------------------------------------------------------------- CPU: format and decode
TEST(KvSlabFormat, DecodeElementEqualsCodecDecode) {
  // Any ISA (QUANTKV_ISA=scalar too): code * scale is exact in fp32 (at most 8 + 11
  // significant bits), so the FMA and the separately rounding decoders agree.
  std::mt19937_64 rng(gpu_test::FreshSeed());
  for (const Geometry& g : kGeometries) {
    for (const char* text : kSpecs) {
      std::unique_ptr<KvCodec> codec;
      KvSlabFormat f;
      if (!Make(text, g, &codec, &f)) continue;
      SCOPED_TRACE(absl::StrFormat("%s d=%d bt=%d", text, g.head_dim, g.block_tokens));
      EXPECT_EQ(f.slab_bytes, codec->slab_bytes());
      const int64_t bt = g.block_tokens, d = g.head_dim;
      for (const std::vector<float>& x : Blocks(rng, g, f)) {
        std::vector<uint8_t> slab(static_cast<size_t>(codec->slab_bytes()));
        codec->Encode(x.data(), slab.data());
        std::vector<float> ref(static_cast<size_t>(bt * d));
        codec->Decode(slab.data(), 0, bt, ref.data());
        int bad = 0;
        for (int64_t t = 0; t < bt && bad < 5; ++t) {
          for (int64_t c = 0; c < d && bad < 5; ++c) {
            const float got =
                slab::DecodeElement(f, slab.data(), static_cast<int>(t), static_cast<int>(c));
            if (!SameFloat(got, ref[t * d + c])) {
              ADD_FAILURE() << "token " << t << " channel " << c << ": DecodeElement " << got
                            << " (0x" << std::hex << BitsFromFp32(got) << "), Decode "
                            << ref[t * d + c] << " (0x" << BitsFromFp32(ref[t * d + c]) << std::dec
                            << ")";
              ++bad;
            }
          }
        }
      }
    }
  }
}

TEST(KvSlabFormat, RefusesWhatHasNoPlainLayout) {
  struct Case {
    const char* spec;
    const char* names;  // the part of the message that says what is refused
  };
  const Case cases[] = {
      {"int4:g32:keep4", "keepN"},
      {"int4:g32:out1", "outX"},
      {"int4:g32:rank2", "rankR"},
      {"int4:g32:meanres", "meanres"},
      {"int4:g32:learnclip", "learnclip"},
      {"q4_0", "llama.cpp"},
      {"q8_0", "llama.cpp"},
      {"iq4_nl", "llama.cpp"},
      {"nl4", "codebook"},
      {"nl3:g32:sym:pow0.5", "codebook"},
      {"pq4x8", "product quantization"},
      {"int4:static", "static"},
      {"drop:keep4", "keepN"},
      {"fp8:g64:keep2", "keepN"},
  };
  for (const Case& c : cases) {
    const KvCodecSpec spec = MustParse(c.spec);
    const absl::StatusOr<KvSlabFormat> f = KvSlabFormatOf(spec, 128, 16);
    ASSERT_FALSE(f.ok()) << c.spec;
    EXPECT_EQ(f.status().code(), absl::StatusCode::kUnimplemented) << c.spec << ": " << f.status();
    const std::string msg(f.status().message());
    EXPECT_NE(msg.find(c.names), std::string::npos) << c.spec << ": " << msg;
    EXPECT_NE(msg.find(spec.ToString()), std::string::npos) << c.spec << ": " << msg;
  }
  // Geometry the layout cannot hold is an argument error, not a missing feature.
  EXPECT_EQ(KvSlabFormatOf(MustParse("int4:g48"), 128, 16).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KvSlabFormatOf(MustParse("int3:chan"), 36, 16).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KvSlabFormatOf(MustParse("fp16"), 0, 16).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------- CPU: encode passes
struct HostRows {
  const float* x;
  int64_t d;
  float operator()(int t, int c) const { return x[t * d + c]; }
};

// The kernel's passes run in order on the host.
void HostEncode(const KvSlabFormat& f, const float* x, uint8_t* slab) {
  std::vector<float> scratch(static_cast<size_t>(2 * f.head_dim));
  const HostRows rows{x, f.head_dim};
  for (int pass = 0; pass < slab::kEncodePasses; ++pass) {
    const int64_t n = slab::EncodeItems(f, pass);
    for (int64_t i = 0; i < n; ++i) slab::EncodeItem(f, rows, slab, scratch.data(), pass, i);
  }
}

int64_t FirstDifference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  }
  return a.size() == b.size() ? -1 : static_cast<int64_t>(std::min(a.size(), b.size()));
}

std::string WhereInSlab(const KvSlabFormat& f, int64_t byte) {
  if (byte < f.codes_bytes) {
    return absl::StrFormat("code byte %d (token %d)", byte, byte / f.row_bytes);
  }
  const int64_t m = (byte - f.codes_bytes) / 2;
  return m < f.n_meta ? absl::StrFormat("scale %d", m)
                      : absl::StrFormat("minimum %d", m - f.n_meta);
}

TEST(KvSlabEncode, HostPassesEqualCodecEncode) {
  std::mt19937_64 rng(gpu_test::FreshSeed());
  for (const Geometry& g : kGeometries) {
    for (const char* text : kSpecs) {
      std::unique_ptr<KvCodec> codec;
      KvSlabFormat f;
      if (!Make(text, g, &codec, &f)) continue;
      SCOPED_TRACE(absl::StrFormat("%s d=%d bt=%d", text, g.head_dim, g.block_tokens));
      int block = 0;
      for (const std::vector<float>& x : Blocks(rng, g, f)) {
        std::vector<uint8_t> want(static_cast<size_t>(f.slab_bytes), 0x5a);
        std::vector<uint8_t> got(static_cast<size_t>(f.slab_bytes), 0xa5);
        codec->Encode(x.data(), want.data());
        HostEncode(f, x.data(), got.data());
        const int64_t at = FirstDifference(got, want);
        EXPECT_EQ(at, -1) << "block input " << block << ": first difference at "
                          << (at < 0 ? std::string("-") : WhereInSlab(f, at)) << ": got "
                          << (at < 0 ? 0 : int{got[at]}) << ", want "
                          << (at < 0 ? 0 : int{want[at]});
        ++block;
      }
    }
  }
}

TEST(KvSlabEncode, ScalarConversionsEqualCpu) {
  std::mt19937_64 rng(gpu_test::FreshSeed());
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const float v = Fp16ToFp32(static_cast<uint16_t>(h));
    ASSERT_TRUE(SameFloat(slab::HalfToFloat(static_cast<uint16_t>(h)), v)) << std::hex << h;
    if (!std::isnan(v)) {
      ASSERT_EQ(slab::HalfFromFloat(v), h) << std::hex << h;
    }
  }
  std::vector<float> xs;
  for (int i = 0; i < 200000; ++i) xs.push_back(Fp32FromBits(static_cast<uint32_t>(rng())));
  // Near the fp16 limits and steps, where rounding is decided.
  const float edges[] = {65504.0f,
                         65519.996f,
                         65520.0f,
                         65536.0f,
                         6.1035156e-05f,
                         6.0975552e-05f,
                         5.9604645e-08f,
                         2.9802322e-08f,
                         2.9802326e-08f,
                         0.0f,
                         -0.0f,
                         1e-30f,
                         -1e-30f,
                         448.0f,
                         464.0f,
                         0.015625f,
                         0.0009765625f,
                         std::numeric_limits<float>::infinity(),
                         -std::numeric_limits<float>::infinity(),
                         std::numeric_limits<float>::quiet_NaN(),
                         -std::numeric_limits<float>::quiet_NaN(),
                         std::numeric_limits<float>::denorm_min()};
  for (float e : edges) {
    for (int k = -3; k <= 3; ++k) {
      xs.push_back(Fp32FromBits(BitsFromFp32(e) + k));
      xs.push_back(-Fp32FromBits(BitsFromFp32(e) + k));
    }
  }
  std::vector<uint16_t> row(xs.size());
  Fp32ToFp16Row(xs.data(), row.data(), static_cast<int64_t>(xs.size()));  // F16C where present
  for (size_t i = 0; i < xs.size(); ++i) {
    const float v = xs[i];
    SCOPED_TRACE(absl::StrFormat("x = %a (0x%08x)", v, BitsFromFp32(v)));
    if (!std::isnan(v)) {
      ASSERT_EQ(slab::HalfFromFloat(v), Fp32ToFp16(v));
    }
    if (i < xs.size() / 8 * 8) {  // converted by F16C where present (NaN payloads kept)
      ASSERT_EQ(slab::HalfFromFloat(v), row[i]);
    }
    ASSERT_EQ(slab::Bf16FromFloat(v), Fp32ToBf16(v));
    ASSERT_EQ(slab::HalfRoundUp(v), kv_codec_internal::Fp16RoundUp(v));
    ASSERT_EQ(slab::HalfRoundDown(v), kv_codec_internal::Fp16RoundDown(v));
  }
}

// ---------------------------------------------------------------- GPU
TEST(KvEncodeGpu, WriteRowsAsCpuCache) {
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
  std::mt19937_64 rng(gpu_test::FreshSeed());
  const int64_t H = 2, d = 64, row = H * d, ring_tokens = 37, sinks = 4;
  // Sequence s gets rows for positions [start[s], start[s] + count[s]): from the start (sinks),
  // across the ring's end, far along.
  const int64_t start[] = {0, 33, 100};
  const int64_t count[] = {10, 11, 6};
  for (KvStorage storage : {KvStorage::kF16, KvStorage::kF32}) {
    SCOPED_TRACE(storage == KvStorage::kF16 ? "fp16 storage" : "fp32 storage");
    const int64_t eb = storage == KvStorage::kF32 ? 4 : 2;
    const int64_t ring_bytes = ring_tokens * row * eb, sink_bytes = sinks * row * eb;
    std::vector<int32_t> positions, row_seq;
    for (int s = 0; s < 3; ++s) {
      for (int64_t i = 0; i < count[s]; ++i) {
        positions.push_back(static_cast<int32_t>(start[s] + i));
        row_seq.push_back(s);
      }
    }
    positions.push_back(-1);  // a padding row: stores nothing
    row_seq.push_back(0);
    const int64_t rows = static_cast<int64_t>(positions.size());
    std::vector<float> x = RandomRows(rng, rows, row, true);
    x[3] = 70000.0f;  // overflows fp16
    x[5] = -1e-9f;    // underflows to -0
    // Random prior contents: untouched rows must stay as they were.
    std::vector<std::vector<uint8_t>> ring(3), sink(3);
    std::vector<std::unique_ptr<DeviceBuffer>> dring, dsink;
    std::vector<KvProtectedRows> seqs(3);
    for (int s = 0; s < 3; ++s) {
      ring[s].resize(static_cast<size_t>(ring_bytes));
      sink[s].resize(static_cast<size_t>(sink_bytes));
      for (uint8_t& b : ring[s]) b = static_cast<uint8_t>(rng());
      for (uint8_t& b : sink[s]) b = static_cast<uint8_t>(rng());
      dring.push_back(std::make_unique<DeviceBuffer>(ring[s]));
      dsink.push_back(std::make_unique<DeviceBuffer>(sink[s]));
      seqs[s].ring = dring[s]->as<uint8_t>();
      seqs[s].sinks = dsink[s]->as<uint8_t>();
    }
    // What KvCache::Write stores.
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = positions[r];
      if (t < 0) continue;
      std::vector<uint8_t>& rg = ring[row_seq[r]];
      uint8_t* dst = rg.data() + (t % ring_tokens) * row * eb;
      if (storage == KvStorage::kF32) {
        std::memcpy(dst, x.data() + r * row, row * 4);
      } else {
        std::vector<uint16_t> h(static_cast<size_t>(row));
        Fp32ToFp16Row(x.data() + r * row, h.data(), row);
        std::memcpy(dst, h.data(), row * 2);
      }
      if (t < sinks) std::memcpy(sink[row_seq[r]].data() + t * row * eb, dst, row * eb);
    }
    DeviceBuffer dx(x), dpos(positions), dseq(row_seq), dseqs(seqs);
    KvWriteBatch batch;
    batch.x = dx.f32();
    batch.positions = dpos.as<int32_t>();
    batch.row_seq = dseq.as<int32_t>();
    batch.seqs = dseqs.as<KvProtectedRows>();
    batch.rows = rows;
    batch.n_kv_heads = H;
    batch.head_dim = d;
    batch.ring_tokens = ring_tokens;
    batch.sink_tokens = sinks;
    batch.storage = storage;
    ASSERT_TRUE(cuda::KvWriteRows(batch, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    for (int s = 0; s < 3; ++s) {
      EXPECT_EQ(dring[s]->ToHost<uint8_t>(), ring[s]) << "ring of sequence " << s;
      EXPECT_EQ(dsink[s]->ToHost<uint8_t>(), sink[s]) << "sinks of sequence " << s;
    }
  }
}

TEST(KvEncodeGpu, EncodeBlocksEqualsCpuEncode) {
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
  std::mt19937_64 rng(gpu_test::FreshSeed());
  constexpr uint8_t kGuard = 0xa5;
  for (const Geometry& g : kGeometries) {
    const int64_t H = 3, d = g.head_dim, bt = g.block_tokens, row = H * d;
    const int64_t ring_tokens = 3 * bt + 7;  // blocks at multiples of bt wrap around its end
    // Two sequences' rings; jobs at block starts that wrap, and one off the block grid.
    const int64_t first[] = {0, bt, 2 * bt, 3 * bt, 5 * bt, 11 * bt, 7 * bt + 3};
    const int n_jobs = static_cast<int>(sizeof(first) / sizeof(first[0]));
    for (KvStorage storage : {KvStorage::kF16, KvStorage::kF32}) {
      const int64_t eb = storage == KvStorage::kF32 ? 4 : 2;
      // Stored rows, and the floats the CPU cache decodes from them.
      std::vector<std::vector<uint8_t>> ring(2);
      std::vector<std::vector<float>> ring_f(2);
      std::vector<std::unique_ptr<DeviceBuffer>> dring;
      for (int s = 0; s < 2; ++s) {
        std::vector<float> x = RandomRows(rng, ring_tokens, row, s == 1);
        ring[s].resize(static_cast<size_t>(ring_tokens * row * eb));
        if (storage == KvStorage::kF32) {
          std::memcpy(ring[s].data(), x.data(), ring[s].size());
          ring_f[s] = x;
        } else {
          std::vector<uint16_t> h(x.size());
          Fp32ToFp16Row(x.data(), h.data(), static_cast<int64_t>(x.size()));
          std::memcpy(ring[s].data(), h.data(), ring[s].size());
          ring_f[s].resize(x.size());
          Fp16ToFp32Row(h.data(), ring_f[s].data(), static_cast<int64_t>(x.size()));
        }
        dring.push_back(std::make_unique<DeviceBuffer>(ring[s]));
      }
      for (const char* text : kSpecs) {
        std::unique_ptr<KvCodec> codec;
        KvSlabFormat f;
        if (!Make(text, g, &codec, &f)) continue;
        SCOPED_TRACE(absl::StrFormat("%s d=%d bt=%d %s storage", text, d, bt,
                                     storage == KvStorage::kF16 ? "fp16" : "fp32"));
        // Job j's slabs at an odd offset, guard bytes between and around them.
        const int64_t slabs = H * f.slab_bytes, stride = slabs + 13, lead = 7;
        std::vector<uint8_t> want(static_cast<size_t>(lead + n_jobs * stride), kGuard);
        DeviceBuffer dst(want);
        std::vector<KvEncodeJob> jobs(static_cast<size_t>(n_jobs));
        std::vector<float> x(static_cast<size_t>(bt * d));
        for (int j = 0; j < n_jobs; ++j) {
          const int s = j % 2;
          jobs[j].ring = dring[s]->as<uint8_t>();
          jobs[j].first_token = first[j];
          jobs[j].dst = dst.as<uint8_t>() + lead + j * stride;
          for (int64_t h = 0; h < H; ++h) {
            for (int64_t t = 0; t < bt; ++t) {
              std::memcpy(x.data() + t * d,
                          ring_f[s].data() + ((first[j] + t) % ring_tokens) * row + h * d,
                          d * sizeof(float));
            }
            codec->Encode(x.data(), want.data() + lead + j * stride + h * f.slab_bytes);
          }
        }
        DeviceBuffer djobs(jobs);
        const absl::Status st = cuda::KvEncodeBlocks(f, H, ring_tokens, storage,
                                                     djobs.as<KvEncodeJob>(), n_jobs, nullptr);
        ASSERT_TRUE(st.ok()) << st;
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const std::vector<uint8_t> got = dst.ToHost<uint8_t>();
        const int64_t at = FirstDifference(got, want);
        if (at >= 0) {
          const int64_t in_job = (at - lead) % stride;
          const std::string where =
              at < lead || in_job >= slabs
                  ? std::string("a guard byte")
                  : absl::StrFormat("job %d head %d %s", (at - lead) / stride,
                                    in_job / f.slab_bytes, WhereInSlab(f, in_job % f.slab_bytes));
          ADD_FAILURE() << "first difference at byte " << at << " (" << where << "): got "
                        << int{got[at]} << ", want " << int{want[at]};
        }
      }
    }
  }
}

// Checked on the host before any launch, so this runs without a GPU too.
TEST(KvEncodeGpu, RejectsBadArguments) {
  const KvSlabFormat f = *KvSlabFormatOf(MustParse("int4:g32"), 128, 16);
  EXPECT_EQ(cuda::KvEncodeBlocks(f, 2, 8, KvStorage::kF16, nullptr, 1, nullptr).code(),
            absl::StatusCode::kInvalidArgument);  // ring shorter than a block
  EXPECT_EQ(cuda::KvEncodeBlocks(f, 2, 64, KvStorage::kF16, nullptr, 1, nullptr).code(),
            absl::StatusCode::kInvalidArgument);  // no jobs array
  EXPECT_TRUE(cuda::KvEncodeBlocks(f, 2, 64, KvStorage::kF16, nullptr, 0, nullptr).ok());
  KvWriteBatch batch;
  batch.rows = 1;
  batch.n_kv_heads = 2;
  batch.head_dim = 128;
  batch.ring_tokens = 64;
  EXPECT_EQ(cuda::KvWriteRows(batch, nullptr).code(), absl::StatusCode::kInvalidArgument);
  batch.rows = 0;
  EXPECT_TRUE(cuda::KvWriteRows(batch, nullptr).ok());
}

}  // namespace
}  // namespace quantkv::kernels
