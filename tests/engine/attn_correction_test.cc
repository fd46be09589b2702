// Attention-output corrections: the closed-form fit on synthetic pairs whose true residual map
// is known (recovery, rank truncation, ridge, held-out error, the analytic error against a
// direct computation), the file format and its error messages, and the engine applying a
// correction to exactly the rows whose attention read quantized blocks. Fresh random data
// each run (seed printed); QUANTKV_TEST_SEED replays one.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>

#include "gtest/gtest.h"
#include "runtime/engine/attn_correction.h"
#include "runtime/engine/attn_correction_fit.h"
#include "runtime/engine/engine.h"
#include "runtime/model/hf_model.h"
#include "runtime/model/safetensors_writer.h"
#include "tests/engine/test_random.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

using Matrix = std::vector<double>;  // row-major

// Pairs (x, y = x + x G + b + noise): x correlated with a mean offset, G of a given spectrum.
struct Synthetic {
  int64_t d = 0;
  Matrix mix;  // [d][d]: x = (z + mu) mix
  std::vector<double> mu, b;
  Matrix g;  // [d][d]
  double noise = 0;

  void Sample(std::mt19937_64& rng, int64_t n, std::vector<float>& x, std::vector<float>& y) const {
    std::normal_distribution<double> nd(0.0, 1.0);
    x.assign(static_cast<size_t>(n * d), 0.0f);
    y.assign(static_cast<size_t>(n * d), 0.0f);
    std::vector<double> z(d), xv(d);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t i = 0; i < d; ++i) z[i] = nd(rng) + mu[i];
      for (int64_t j = 0; j < d; ++j) {
        double s = 0;
        for (int64_t i = 0; i < d; ++i) s += z[i] * mix[i * d + j];
        xv[j] = s;
        x[r * d + j] = static_cast<float>(s);
      }
      for (int64_t j = 0; j < d; ++j) {
        double s = xv[j] + b[j] + noise * nd(rng);
        for (int64_t i = 0; i < d; ++i) s += xv[i] * g[i * d + j];
        y[r * d + j] = static_cast<float>(s);
      }
    }
  }
};

Synthetic MakeSynthetic(std::mt19937_64& rng, int64_t d, const std::vector<double>& spectrum,
                        double noise) {
  std::normal_distribution<double> nd(0.0, 1.0);
  Synthetic s;
  s.d = d;
  s.noise = noise;
  s.mix.resize(d * d);
  // Well conditioned (singular values within 1 +- 0.6), so G is identifiable in every direction.
  for (double& v : s.mix) v = 0.3 * nd(rng) / std::sqrt(static_cast<double>(d));
  for (int64_t i = 0; i < d; ++i) s.mix[i * d + i] += 1.0;
  s.mu.resize(d);
  s.b.resize(d);
  for (int64_t i = 0; i < d; ++i) {
    s.mu[i] = 0.5 * nd(rng);
    s.b[i] = 0.3 * nd(rng);
  }
  // G = Σ_k σ_k u_k v_kᵀ with orthonormal u, v (Gram-Schmidt of random vectors).
  auto orthonormal = [&](int64_t k) {
    std::vector<std::vector<double>> vs;
    for (int64_t a = 0; a < k; ++a) {
      std::vector<double> v(d);
      for (double& e : v) e = nd(rng);
      for (const auto& w : vs) {
        double dot = 0;
        for (int64_t i = 0; i < d; ++i) dot += v[i] * w[i];
        for (int64_t i = 0; i < d; ++i) v[i] -= dot * w[i];
      }
      double norm = 0;
      for (double e : v) norm += e * e;
      for (double& e : v) e /= std::sqrt(norm);
      vs.push_back(v);
    }
    return vs;
  };
  const int64_t k = static_cast<int64_t>(spectrum.size());
  const auto u = orthonormal(k), v = orthonormal(k);
  s.g.assign(d * d, 0.0);
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = 0; j < d; ++j) s.g[i * d + j] += spectrum[a] * u[a][i] * v[a][j];
    }
  }
  return s;
}

// The fitted map in the same convention: x G_fit + bias.
Matrix FittedMap(const LowRankAdapter& c) {
  const int64_t d = c.in, r = c.rank;
  Matrix g(d * d, 0.0);
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j < d; ++j) {
      for (int64_t k = 0; k < r; ++k) g[i * d + j] += double{c.a[k * d + i]} * c.b[j * r + k];
    }
  }
  return g;
}

double RelDiff(const Matrix& a, const Matrix& b) {
  double e = 0, n = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    e += (a[i] - b[i]) * (a[i] - b[i]);
    n += b[i] * b[i];
  }
  return std::sqrt(e / n);
}

double Norm(const Matrix& a) {
  double n = 0;
  for (double v : a) n += v * v;
  return std::sqrt(n);
}

class AttnCorrectionFitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = testing::TestSeed();
    rng_.seed(seed_);
    std::printf("[ seed ] QUANTKV_TEST_SEED=%llu\n", static_cast<unsigned long long>(seed_));
  }
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
};

TEST_F(AttnCorrectionFitTest, RecoversALowRankMapAndItsBias) {
  SCOPED_TRACE(seed_);
  const int64_t d = 24;
  const Synthetic s = MakeSynthetic(rng_, d, {0.6, 0.4, 0.25}, 0.01);
  std::vector<float> x, y;
  s.Sample(rng_, 4000, x, y);
  AttnCorrectionStats stats(2, d, {1});
  stats.Add(1, 4000, x.data(), y.data());
  stats.Add(0, 4000, x.data(), y.data());  // not collected: ignored
  EXPECT_FALSE(stats.collects(0));
  EXPECT_EQ(stats.rows(1), 4000);
  auto fit = stats.Fit(1, {.rank = 3, .ridge = 1e-9});
  ASSERT_TRUE(fit.ok()) << fit.status();
  EXPECT_EQ(fit->rank, 3);
  EXPECT_EQ(fit->a.size(), size_t{3 * d});
  EXPECT_EQ(fit->b.size(), size_t{d * 3});
  EXPECT_LT(RelDiff(FittedMap(*fit), s.g), 0.02);
  EXPECT_LT(RelDiff(Matrix(fit->bias.begin(), fit->bias.end()), s.b), 0.02);
  const AttnCorrectionError e = stats.Evaluate(1, *fit);
  EXPECT_LT(e.corrected, 0.01 * e.uncorrected);
  // What is left is the noise: d * noise² per row.
  EXPECT_NEAR(e.corrected / (4000.0 * d * 0.01 * 0.01), 1.0, 0.1);
  EXPECT_FALSE(stats.Fit(0, {}).ok());
}

TEST_F(AttnCorrectionFitTest, RankTruncationKeepsTheStrongestDirections) {
  SCOPED_TRACE(seed_);
  const int64_t d = 20;
  const std::vector<double> spectrum = {0.8, 0.5, 0.3, 0.2, 0.12, 0.06};
  const Synthetic s = MakeSynthetic(rng_, d, spectrum, 0.005);
  std::vector<float> x, y;
  s.Sample(rng_, 3000, x, y);
  AttnCorrectionStats stats(1, d);
  stats.Add(0, 3000, x.data(), y.data());
  double previous = stats.Evaluate(0, {}).uncorrected;
  for (int64_t r = 1; r <= 8; ++r) {
    auto fit = stats.Fit(0, {.rank = r, .ridge = 1e-9});
    ASSERT_TRUE(fit.ok()) << fit.status();
    const double e = stats.Evaluate(0, *fit).corrected;
    EXPECT_LT(e, previous * (1 + 1e-9)) << "rank " << r;
    // Up to the true rank, each further direction must buy a clear drop.
    if (r <= 6) {
      EXPECT_LT(e, 0.9 * previous) << "rank " << r;
    }
    previous = e;
  }
  auto r1 = stats.Fit(0, {.rank = 1, .ridge = 1e-9});
  auto r6 = stats.Fit(0, {.rank = 6, .ridge = 1e-9});
  ASSERT_TRUE(r1.ok() && r6.ok());
  EXPECT_GT(stats.Evaluate(0, *r1).corrected, 3 * stats.Evaluate(0, *r6).corrected);
  EXPECT_LT(RelDiff(FittedMap(*r6), s.g), 0.03);
  // A rank past the width is the full map.
  auto full = stats.Fit(0, {.rank = 1000, .ridge = 1e-9});
  ASSERT_TRUE(full.ok());
  EXPECT_EQ(full->rank, d);
  EXPECT_LE(stats.Evaluate(0, *full).corrected, stats.Evaluate(0, *r6).corrected * (1 + 1e-9));
}

TEST_F(AttnCorrectionFitTest, RidgeShrinksTheMapAndRescuesDegenerateInputs) {
  SCOPED_TRACE(seed_);
  const int64_t d = 16;
  const Synthetic s = MakeSynthetic(rng_, d, {0.7, 0.3}, 0.05);
  std::vector<float> x, y;
  s.Sample(rng_, 500, x, y);
  AttnCorrectionStats stats(1, d);
  stats.Add(0, 500, x.data(), y.data());
  double previous = 1e300;
  for (double ridge : {1e-6, 1e-2, 1.0, 100.0}) {
    auto fit = stats.Fit(0, {.rank = 4, .ridge = ridge});
    ASSERT_TRUE(fit.ok());
    const double norm = Norm(FittedMap(*fit));
    EXPECT_LT(norm, previous) << "ridge " << ridge;
    previous = norm;
  }
  // An overwhelming ridge leaves only the mean residual.
  auto flat = stats.Fit(0, {.rank = 4, .ridge = 1e9});
  ASSERT_TRUE(flat.ok());
  EXPECT_LT(Norm(FittedMap(*flat)), 1e-6);
  std::vector<double> mean(d, 0.0);
  for (int64_t r = 0; r < 500; ++r) {
    for (int64_t j = 0; j < d; ++j) mean[j] += (double{y[r * d + j]} - x[r * d + j]) / 500;
  }
  EXPECT_LT(RelDiff(Matrix(flat->bias.begin(), flat->bias.end()), mean), 1e-4);

  // Outputs confined to a subspace (dead heads): singular without a ridge, fine with one.
  std::vector<float> xd = x;
  for (int64_t r = 0; r < 500; ++r) {
    for (int64_t j = d / 2; j < d; ++j) xd[r * d + j] = xd[r * d + j % (d / 2)];
  }
  AttnCorrectionStats degenerate(1, d);
  degenerate.Add(0, 500, xd.data(), y.data());
  auto singular = degenerate.Fit(0, {.rank = 4, .ridge = 0.0});
  EXPECT_EQ(singular.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(singular.status().message().find("ridge"), std::string::npos);
  EXPECT_TRUE(degenerate.Fit(0, {.rank = 4, .ridge = 1e-3}).ok());
}

TEST_F(AttnCorrectionFitTest, HeldOutErrorDropsAndMatchesADirectComputation) {
  SCOPED_TRACE(seed_);
  const int64_t d = 32;
  const Synthetic s = MakeSynthetic(rng_, d, {0.5, 0.3, 0.2, 0.1}, 0.05);
  std::vector<float> x, y, hx, hy;
  s.Sample(rng_, 2000, x, y);
  s.Sample(rng_, 1500, hx, hy);
  AttnCorrectionStats train(1, d), held(1, d);
  train.Add(0, 2000, x.data(), y.data());
  // Held-out rows in uneven batches, with a row holding a NaN (skipped).
  hx[700 * d + 3] = NAN;
  held.Add(0, 700, hx.data(), hy.data());
  held.Add(0, 800, hx.data() + 700 * d, hy.data() + 700 * d);
  EXPECT_EQ(held.rows(0), 1499);
  auto fit = train.Fit(0, {.rank = 4, .ridge = 1e-3});
  ASSERT_TRUE(fit.ok());
  const AttnCorrectionError e = held.Evaluate(0, *fit);
  EXPECT_LT(e.corrected, 0.2 * e.uncorrected);
  // The analytic error equals applying the correction with the engine's kernel.
  std::vector<float> corrected(hx);
  std::vector<float> scratch;
  ASSERT_TRUE(AddLowRank(*fit, hx.data(), 1500, corrected.data(), nullptr, scratch).ok());
  double direct = 0, before = 0, ref = 0;
  for (int64_t r = 0; r < 1500; ++r) {
    if (r == 700) continue;
    for (int64_t j = 0; j < d; ++j) {
      const double t = hy[r * d + j];
      direct += (t - corrected[r * d + j]) * (t - corrected[r * d + j]);
      before += (t - hx[r * d + j]) * (t - hx[r * d + j]);
      ref += t * t;
    }
  }
  EXPECT_NEAR(e.corrected / direct, 1.0, 1e-4);
  EXPECT_NEAR(e.uncorrected / before, 1.0, 1e-9);
  EXPECT_NEAR(e.reference / ref, 1.0, 1e-9);
}

// ------------------------------------------------------------------ the file format

std::filesystem::path TempPath(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / "quantkv_attn_correction_test";
  std::filesystem::create_directories(dir);
  return dir / name;
}

AttnCorrection SmallCorrection(std::mt19937_64& rng, int64_t layers, int64_t d, int64_t r) {
  AttnCorrection c;
  c.kv_spec = "int2-comp";
  c.n_layers = layers;
  c.dim = d;
  c.rank = r;
  c.metadata["model"] = "test";
  c.layers.resize(layers);
  for (int64_t l = 0; l < layers; l += 2) {  // odd layers uncorrected
    LowRankAdapter& a = c.layers[l];
    a.in = a.out = d;
    a.rank = r;
    a.a = testing::RandomFloats(rng, r * d);
    a.b = testing::RandomFloats(rng, d * r);
    a.bias = testing::RandomFloats(rng, d);
  }
  return c;
}

TEST(AttnCorrectionFileTest, RoundTripsAndChecksTheModel) {
  std::mt19937_64 rng(testing::TestSeed());
  const AttnCorrection c = SmallCorrection(rng, 3, 8, 2);
  const std::string path = TempPath("ok.safetensors").string();
  ASSERT_TRUE(WriteAttnCorrection(path, c).ok());
  auto r = ReadAttnCorrection(path);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->origin, path);
  EXPECT_EQ(r->kv_spec, "int2-comp");
  EXPECT_EQ(r->n_layers, 3);
  EXPECT_EQ(r->dim, 8);
  EXPECT_EQ(r->rank, 2);
  EXPECT_EQ(r->metadata.at("model"), "test");
  EXPECT_TRUE(r->layers[1].empty());
  for (int64_t l : {0, 2}) {
    EXPECT_EQ(r->layers[l].a, c.layers[l].a);
    EXPECT_EQ(r->layers[l].b, c.layers[l].b);
    EXPECT_EQ(r->layers[l].bias, c.layers[l].bias);
  }
  ModelConfig m;
  m.n_layers = 3;
  m.n_heads = 2;
  m.head_dim = 4;
  EXPECT_TRUE(CheckAttnCorrectionFitsModel(*r, m).ok());
  m.n_layers = 30;
  absl::Status s = CheckAttnCorrectionFitsModel(*r, m);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("fitted for 3 layers of attention width 8"), std::string::npos) << s;
  EXPECT_NE(s.message().find(path), std::string::npos);
  EXPECT_TRUE(CheckAttnCorrectionKv(*r, "int2-comp").ok());
  s = CheckAttnCorrectionKv(*r, "int4-comp");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("--kv int2-comp, not --kv int4-comp"), std::string::npos) << s;
}

// Writes a correction-shaped file with the given tensors and metadata.
std::string Craft(const std::string& name, const std::vector<SafetensorsOutTensor>& tensors,
                  std::map<std::string, std::string> meta) {
  const std::string path = TempPath(name).string();
  EXPECT_TRUE(WriteSafetensors(path, tensors, meta).ok());
  return path;
}

TEST(AttnCorrectionFileTest, BadFilesAreRefusedWithTheFileAndTheProblem) {
  const std::map<std::string, std::string> meta = {{"format", kAttnCorrectionFormat},
                                                   {"kv_spec", "int2"},
                                                   {"n_layers", "2"},
                                                   {"dim", "4"},
                                                   {"rank", "2"}};
  const std::vector<float> a(8, 0.1f), b(8, 0.2f), bias(4, 0.3f), wrong(6, 0.0f);
  std::vector<float> nan_a = a;
  nan_a[5] = NAN;
  auto without = [&](const char* key) {
    auto m = meta;
    m.erase(key);
    return m;
  };
  struct Case {
    std::string name, path, expect;
  };
  std::vector<Case> cases = {
      {"missing", TempPath("does_not_exist.safetensors").string(), "does_not_exist"},
      {"no format",
       Craft("no_format.safetensors", {{"layers.0.attn_corr.a", {2, 4}, a}}, without("format")),
       "not a file written by `quantkv fit-correction`"},
      {"no kv spec",
       Craft("no_kv.safetensors", {{"layers.0.attn_corr.a", {2, 4}, a}}, without("kv_spec")),
       "kv_spec"},
      {"bad dim",
       Craft("bad_dim.safetensors", {},
             [&] {
               auto m = meta;
               m["dim"] = "four";
               return m;
             }()),
       "'dim' = 'four'"},
      {"lone a", Craft("lone_a.safetensors", {{"layers.0.attn_corr.a", {2, 4}, a}}, meta),
       "layer 0 has only some of its tensors"},
      {"wrong shape",
       Craft("wrong_shape.safetensors",
             {{"layers.0.attn_corr.a", {2, 4}, a}, {"layers.0.attn_corr.b", {3, 2}, wrong}}, meta),
       "tensor 'layers.0.attn_corr.b' has the wrong shape"},
      {"rank mismatch",
       Craft("rank_mismatch.safetensors",
             {{"layers.0.attn_corr.a", {2, 4}, a}, {"layers.0.attn_corr.b", {4, 1}, bias}}, meta),
       "ranks 2 and 1"},
      {"unknown tensor", Craft("unknown.safetensors", {{"layers.0.mlp.a", {2, 4}, a}}, meta),
       "unexpected tensor 'layers.0.mlp.a'"},
      {"layer past end",
       Craft("past_end.safetensors",
             {{"layers.7.attn_corr.a", {2, 4}, a}, {"layers.7.attn_corr.b", {4, 2}, b}}, meta),
       "past n_layers = 2"},
      {"nan",
       Craft("nan.safetensors",
             {{"layers.0.attn_corr.a", {2, 4}, nan_a}, {"layers.0.attn_corr.b", {4, 2}, b}}, meta),
       "non-finite"},
      {"empty", Craft("empty.safetensors", {}, meta), "no layer has a correction"},
  };
  // Not a safetensors file at all.
  {
    const std::string path = TempPath("garbage.safetensors").string();
    std::ofstream(path) << "this is not a safetensors file";
    cases.push_back({"garbage", path, "header length"});
  }
  for (const Case& c : cases) {
    auto r = ReadAttnCorrection(c.path);
    ASSERT_FALSE(r.ok()) << c.name;
    const std::string msg(r.status().message());
    EXPECT_NE(msg.find(c.path), std::string::npos) << c.name << ": " << msg;
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.name << ": " << msg;
  }
}

// ------------------------------------------------------------------ the engine applying it

struct Observed {
  std::vector<std::vector<float>> attn;  // [layer] rows of the last sequence run
  std::vector<uint8_t> reads_encoded;
};

std::unique_ptr<Engine> TinyEngine(EngineConfig cfg) {
  auto weights = OpenHfModelDir(testing::FixturePath("models/tiny_llama_f32").string());
  EXPECT_TRUE(weights.ok()) << weights.status();
  cfg.decode_activations = kernels::ActivationPrecision::kFloat32;
  cfg.lm_head_activations = kernels::ActivationPrecision::kFloat32;
  cfg.kv_max_bytes = 1 << 22;
  auto engine = Engine::Create(std::move(*weights), cfg);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(*engine) : nullptr;
}

constexpr char kTinySpec[] = "int4:g16:asym,sink=2,window=4,block=16";

std::vector<int32_t> TinyTokens() {
  std::vector<int32_t> t(64);
  for (int i = 0; i < 64; ++i) t[i] = (i * 37 + 11) % 256;
  return t;
}

TEST(AttnCorrectionEngineTest, CorrectsOnlyRowsThatReadQuantizedBlocks) {
  const int64_t dim = 4 * 16, layers = 2;
  // A bias-only correction on layer 0 (whose input does not depend on it).
  auto corr = std::make_shared<AttnCorrection>();
  corr->kv_spec = kTinySpec;
  corr->n_layers = layers;
  corr->dim = dim;
  corr->rank = 1;
  corr->layers.resize(layers);
  LowRankAdapter& l0 = corr->layers[0];
  l0.in = l0.out = dim;
  l0.rank = 1;
  l0.a.assign(dim, 0.0f);
  l0.b.assign(dim, 0.0f);
  for (int64_t i = 0; i < dim; ++i) l0.bias.push_back(0.01f * static_cast<float>(i + 1));

  auto run = [&](std::shared_ptr<const AttnCorrection> c, Observed* obs,
                 std::vector<float>* logits) {
    EngineConfig cfg;
    cfg.kv_spec = kTinySpec;
    cfg.attn_correction = c;
    if (obs != nullptr) {
      obs->attn.assign(layers, {});
      cfg.attn_observer = [obs](const AttnObservation& o) {
        const int64_t d = 64;
        obs->attn[o.layer].insert(obs->attn[o.layer].end(), o.attn, o.attn + o.n * d);
        if (o.layer == 0) {
          obs->reads_encoded.insert(obs->reads_encoded.end(), o.reads_encoded,
                                    o.reads_encoded + o.n);
        }
      };
    }
    std::unique_ptr<Engine> e = TinyEngine(cfg);
    ASSERT_NE(e, nullptr);
    const SequenceId seq = e->NewSequence();
    const std::vector<int32_t> tokens = TinyTokens();
    // A prefill chunk then token-by-token decode: both paths are corrected.
    ASSERT_TRUE(e->Forward(seq, {tokens.data(), 40}, true, logits).ok());
    for (size_t i = 40; i < tokens.size(); ++i) {
      ASSERT_TRUE(e->Forward(seq, {tokens.data() + i, 1}, true, logits).ok());
    }
  };
  Observed plain, corrected;
  std::vector<float> plain_logits, corrected_logits, unobserved_logits;
  run(nullptr, &plain, &plain_logits);
  run(corr, &corrected, &corrected_logits);
  run(corr, nullptr, &unobserved_logits);
  EXPECT_EQ(corrected_logits, unobserved_logits);  // observing changes nothing
  ASSERT_EQ(plain.reads_encoded.size(), 64u);
  // Query p reads encoded tokens once a full block begins before its window and past the
  // sinks: p >= 15 here (block [0, 16) complete, window 4, sinks 2).
  for (int64_t p = 0; p < 64; ++p) {
    const int64_t ring = std::min(((p + 1) / 16) * 16, std::max<int64_t>(0, p + 1 - 4));
    EXPECT_EQ(plain.reads_encoded[p], ring > std::min<int64_t>(2, p + 1) ? 1 : 0) << p;
  }
  EXPECT_EQ(plain.reads_encoded[14], 0);
  EXPECT_EQ(plain.reads_encoded[15], 1);
  for (int64_t p = 0; p < 64; ++p) {
    for (int64_t i = 0; i < dim; ++i) {
      const float want = plain.attn[0][p * dim + i] + (plain.reads_encoded[p] ? l0.bias[i] : 0.0f);
      ASSERT_NEAR(corrected.attn[0][p * dim + i], want, 1e-6) << p << " " << i;
    }
  }
  // Rows before the first quantized read are untouched all the way to the logits.
  const int64_t V = 256;
  for (int64_t i = 0; i < 15 * V; ++i) ASSERT_EQ(plain_logits[i], corrected_logits[i]) << i;
  double diff = 0;
  for (int64_t i = 15 * V; i < 64 * V; ++i) diff += std::abs(plain_logits[i] - corrected_logits[i]);
  EXPECT_GT(diff, 0.0);
}

TEST(AttnCorrectionEngineTest, OtherCachesStayUncorrectedAndShapesAreChecked) {
  auto corr = std::make_shared<AttnCorrection>();
  corr->kv_spec = kTinySpec;
  corr->n_layers = 2;
  corr->dim = 64;
  corr->rank = 1;
  corr->layers.resize(2);
  LowRankAdapter& l1 = corr->layers[1];
  l1.in = l1.out = 64;
  l1.rank = 1;
  l1.a.assign(64, 0.05f);
  l1.b.assign(64, 0.05f);
  l1.bias.assign(64, 0.1f);
  EngineConfig cfg;
  cfg.kv_spec = kTinySpec;
  cfg.more_kv_specs = {kTinySpec};
  cfg.attn_correction = corr;
  std::unique_ptr<Engine> e = TinyEngine(cfg);
  ASSERT_NE(e, nullptr);
  EngineConfig plain_cfg;
  plain_cfg.kv_spec = kTinySpec;
  std::unique_ptr<Engine> plain = TinyEngine(plain_cfg);
  const std::vector<int32_t> tokens = TinyTokens();
  std::vector<float> in0, in1, ref;
  ASSERT_TRUE(e->Forward(*e->NewSequenceIn(0), tokens, true, &in0).ok());
  ASSERT_TRUE(e->Forward(*e->NewSequenceIn(1), tokens, true, &in1).ok());
  ASSERT_TRUE(plain->Forward(plain->NewSequence(), tokens, true, &ref).ok());
  EXPECT_EQ(in1, ref);
  EXPECT_NE(in0, ref);

  auto wrong = std::make_shared<AttnCorrection>(*corr);
  wrong->dim = 576;
  cfg.attn_correction = wrong;
  auto weights = OpenHfModelDir(testing::FixturePath("models/tiny_llama_f32").string());
  ASSERT_TRUE(weights.ok());
  auto failed = Engine::Create(std::move(*weights), cfg);
  ASSERT_FALSE(failed.ok());
  EXPECT_NE(failed.status().message().find("attention width 576"), std::string::npos)
      << failed.status();
}

}  // namespace
}  // namespace quantkv
