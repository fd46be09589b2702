// Hadamard-rotated KV storage (rotate=k|v|kv): the rotation is orthonormal and exactly
// undone, an exact codec gives the unrotated attention, and on heads with planted outlier
// channels rotated 4-bit per-token storage has a smaller attention error than the naive
// codec (what QuaRot-style rotations are for).
#include <cmath>

#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/hadamard.h"
#include "runtime/kv/kv_cache.h"
#include "tests/engine/test_cache.h"
#include "tests/engine/test_metrics.h"
#include "tests/engine/test_random.h"

namespace quantkv {
namespace {

using testing::RelError;

constexpr int64_t kD = 64, kKv = 2, kHeads = 6, kCtx = 333;

TEST(HadamardTest, OrthonormalAndInvertible) {
  std::mt19937_64 rng(testing::TestSeed());
  for (int64_t d : {1, 2, 16, 64, 128, 256}) {
    const std::vector<float> signs = kernels::HadamardSigns(d, 7);
    std::vector<float> x = testing::RandomFloats(rng, 5 * d), y = x;
    kernels::HadamardRotate(y.data(), 5, d, signs.data(), false);
    for (int64_t r = 0; r < 5; ++r) {
      double nx = 0, ny = 0;
      for (int64_t i = 0; i < d; ++i) {
        nx += x[r * d + i] * x[r * d + i];
        ny += y[r * d + i] * y[r * d + i];
      }
      EXPECT_NEAR(ny, nx, 1e-5 * nx) << "d " << d;
    }
    kernels::HadamardRotate(y.data(), 5, d, signs.data(), true);
    for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(y[i], x[i], 1e-5) << "d " << d;
  }
  // A one-hot vector spreads evenly over every channel.
  const std::vector<float> signs = kernels::HadamardSigns(64, 1);
  std::vector<float> e(64, 0.0f);
  e[5] = 1.0f;
  kernels::HadamardRotate(e.data(), 1, 64, signs.data(), false);
  for (float v : e) EXPECT_FLOAT_EQ(std::fabs(v), 0.125f);
}

std::vector<float> Attend(const std::string& spec, const std::vector<float>& k,
                          const std::vector<float>& v, const std::vector<float>& q, int n_q) {
  kernels::ThreadPool pool(2);
  return testing::AttendThroughCache({spec, kKv, kD, kHeads, nullptr, &pool}, k, v, q, n_q);
}

TEST(KvRotationTest, ExactCodecUnchangedAndOutliersTamed) {
  std::mt19937_64 rng(testing::TestSeed());
  const int64_t row = kKv * kD;
  std::vector<float> k = testing::RandomFloats(rng, kCtx * row);
  std::vector<float> v = testing::RandomFloats(rng, kCtx * row);
  for (int64_t t = 0; t < kCtx; ++t) {  // planted outlier channels in K and V
    for (int64_t ch = 5; ch < row; ch += 23) {
      k[t * row + ch] *= 12.0f;
      v[t * row + ch] *= 8.0f;
    }
  }
  for (int n_q : {1, 40}) {  // decode and prefill kernels
    SCOPED_TRACE(n_q);
    const std::vector<float> q = testing::RandomFloats(rng, n_q * kHeads * kD, 0.3f);
    const std::vector<float> exact = Attend("fp32,block=32", k, v, q, n_q);
    EXPECT_LT(RelError(Attend("fp32,block=32,rotate=kv", k, v, q, n_q), exact), 2e-6);
    // Attention output error is noisy (softmax amplifies a few scores): only its direction
    // is checked here; the reconstruction test below measures the size of the effect.
    const double naive = RelError(Attend("int4:g64,block=32", k, v, q, n_q), exact);
    const double rotated = RelError(Attend("int4:g64,block=32,rotate=kv", k, v, q, n_q), exact);
    EXPECT_LT(rotated, naive) << "rotated " << rotated << " naive " << naive;
  }
  auto bad = ParseKvPolicy("int4,rotate=q");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("rotate=q"), std::string::npos);
}

// Reconstruction of rows with a few large channels: rotating before a per-token codec and
// back after spreads the outliers, so the shared scale fits every channel.
TEST(KvRotationTest, RotationShrinksPerTokenReconstructionError) {
  std::mt19937_64 rng(testing::TestSeed());
  const int64_t bt = 32;
  auto codec = kernels::KvCodec::Create(*kernels::ParseKvCodecSpec("int4:g64"), kD, bt);
  ASSERT_TRUE(codec.ok());
  const std::vector<float> signs = kernels::HadamardSigns(kD, kernels::kKvRotationSeed);
  double naive = 0, rotated = 0;
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<float> x = testing::RandomFloats(rng, bt * kD);
    for (int64_t t = 0; t < bt; ++t) {
      for (int64_t ch = 5; ch < kD; ch += 23) x[t * kD + ch] *= 12.0f;
    }
    auto roundtrip = [&](std::vector<float> in, bool rotate) {
      if (rotate) kernels::HadamardRotate(in.data(), bt, kD, signs.data(), false);
      std::vector<uint8_t> slab((*codec)->slab_bytes());
      std::vector<float> out(bt * kD);
      (*codec)->Encode(in.data(), slab.data());
      (*codec)->Decode(slab.data(), 0, bt, out.data());
      if (rotate) kernels::HadamardRotate(out.data(), bt, kD, signs.data(), true);
      return out;
    };
    naive += RelError(roundtrip(x, false), x);
    rotated += RelError(roundtrip(x, true), x);
  }
  EXPECT_LT(rotated, 0.6 * naive) << "rotated " << rotated / 20 << " naive " << naive / 20;
}

}  // namespace
}  // namespace quantkv
