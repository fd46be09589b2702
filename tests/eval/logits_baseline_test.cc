#include "runtime/eval/logits_baseline.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include "gtest/gtest.h"

namespace quantkv {
namespace {

std::vector<float> RandomLogits(std::mt19937& rng, int n) {
  std::normal_distribution<float> d(0.0f, 3.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// Full-vocabulary KL(p || q) in float64, the quantity the summary approximates.
double FullKl(const std::vector<float>& p, const std::vector<float>& q) {
  auto lse = [](const std::vector<float>& x) {
    double mx = *std::max_element(x.begin(), x.end()), s = 0;
    for (float v : x) s += std::exp(v - mx);
    return mx + std::log(s);
  };
  const double lp = lse(p), lq = lse(q);
  double kl = 0;
  for (size_t i = 0; i < p.size(); ++i) kl += std::exp(p[i] - lp) * ((p[i] - lp) - (q[i] - lq));
  return kl;
}

TEST(LogitsBaselineTest, KlIsZeroForItselfAndBoundsTheFullKl) {
  std::mt19937 rng(std::random_device{}());
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<float> p = RandomLogits(rng, 500);
    std::vector<float> q = p;
    std::normal_distribution<float> noise(0.0f, 0.3f);
    for (float& x : q) x += noise(rng);
    const BaselineToken base = SummariseLogits(p, 64);
    EXPECT_NEAR(CompareToBaseline(base, p).kl, 0.0, 1e-6);
    EXPECT_TRUE(CompareToBaseline(base, p).top1_agrees);
    const double full = FullKl(p, q);
    const double approx = CompareToBaseline(base, q).kl;
    // Grouping outcomes can only lose divergence (log-sum inequality).
    EXPECT_LE(approx, full + 1e-9);
    EXPECT_GE(approx, 0.5 * full);  // and most of it is in the top 64 for these logits
  }
}

TEST(LogitsBaselineTest, RoundTripsAndRejectsDamagedFiles) {
  std::mt19937 rng(7);
  LogitsBaseline b;
  b.ctx = 16;
  b.vocab = 300;
  b.tokens_hash = 1234;
  for (int i = 0; i < 5; ++i) b.tokens.push_back(SummariseLogits(RandomLogits(rng, 300)));
  const std::string path =
      (std::filesystem::temp_directory_path() / ("qkv_baseline_" + std::to_string(getpid())))
          .string();
  ASSERT_TRUE(WriteLogitsBaseline(path, b).ok());
  auto r = ReadLogitsBaseline(path);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tokens.size(), 5u);
  EXPECT_EQ(r->tokens[3].ids, b.tokens[3].ids);
  EXPECT_EQ(r->tokens[3].logprobs, b.tokens[3].logprobs);
  EXPECT_EQ(r->tokens_hash, 1234u);
  // Truncate: refused with a message naming the file.
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 10);
  auto bad = ReadLogitsBaseline(path);
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find(path), std::string::npos);
  { std::ofstream(path) << "not a baseline"; }
  EXPECT_EQ(ReadLogitsBaseline(path).status().code(), absl::StatusCode::kInvalidArgument);
  std::filesystem::remove(path);
  EXPECT_EQ(ReadLogitsBaseline(path).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace quantkv
