// The CPU grouped expert GEMM (kernels/moe_grouped_gemm.h) against a float64 reference written
// here, on fresh random inputs over several group layouts, and its argument errors.
#include "kernels/moe_grouped_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/thread_pool.h"
#include "tests/testutil/test_seed.h"

namespace quantkv::kernels {
namespace {

bool MessageHas(const absl::Status& s, std::string_view needle) {
  return std::string(s.message()).find(needle) != std::string::npos;
}

// One problem: host arrays for a MoeGroupedFfnConfig.
struct Problem {
  MoeGroupedFfnShape shape;
  std::vector<float> x, gate, up, down, row_weight, y;
  std::vector<int64_t> offsets;

  MoeGroupedFfnConfig Config(ThreadPool* pool = nullptr) {
    MoeGroupedFfnConfig c;
    c.shape = shape;
    c.x = x;
    c.group_offsets = offsets;
    c.gate = gate;
    c.up = up;
    c.down = down;
    c.row_weight = row_weight;
    c.y = absl::MakeSpan(y);
    c.pool = pool;
    return c;
  }
};

// Random x ~ N(0, 1); weights ~ N(0, 1/fan_in) so that every stage is O(1); router weights in
// (0.05, 1) as after a softmax over a few experts.
Problem RandomProblem(const std::vector<int64_t>& group_sizes, int64_t hidden, int64_t intermediate,
                      std::mt19937_64& rng) {
  Problem p;
  p.offsets = {0};
  for (int64_t g : group_sizes) p.offsets.push_back(p.offsets.back() + g);
  p.shape = {p.offsets.back(), hidden, intermediate, static_cast<int64_t>(group_sizes.size())};
  const int64_t m = p.shape.rows, E = p.shape.n_experts;
  auto normal = [&](int64_t n, double sd) {
    std::normal_distribution<float> d(0.0f, static_cast<float>(sd));
    std::vector<float> v(n);
    for (float& f : v) f = d(rng);
    return v;
  };
  p.x = normal(m * hidden, 1.0);
  p.gate = normal(E * intermediate * hidden, 1.0 / std::sqrt(hidden));
  p.up = normal(E * intermediate * hidden, 1.0 / std::sqrt(hidden));
  p.down = normal(E * hidden * intermediate, 1.0 / std::sqrt(intermediate));
  std::uniform_real_distribution<float> w(0.05f, 1.0f);
  p.row_weight.resize(m);
  for (float& f : p.row_weight) f = w(rng);
  p.y.assign(m * hidden, NAN);
  return p;
}

// The definition in float64, straight from the header comment, and per output the first-order
// magnitude that rounding errors scale with:
//   M[r, i] = |w_r| sum_j |down_ij| (|act_j| + |silu'(g_j) u_j| S_gate,j + |silu(g_j)| S_up,j)
// with g_j, u_j the gate and up products of row r and S_gate,j = sum_k |gate_jk x_rk| (S_up
// likewise): relative errors of at most eps in every product's terms move y[r, i] by at most
// eps * M[r, i] to first order.
struct Reference {
  std::vector<double> y, magnitude;
};

Reference Float64Reference(const Problem& p) {
  const int64_t H = p.shape.hidden, I = p.shape.intermediate;
  Reference ref;
  ref.y.resize(p.shape.rows * H);
  ref.magnitude.resize(p.shape.rows * H);
  std::vector<double> act(I), act_mag(I);
  for (int64_t e = 0; e < p.shape.n_experts; ++e) {
    const float* gate = p.gate.data() + e * I * H;
    const float* up = p.up.data() + e * I * H;
    const float* down = p.down.data() + e * H * I;
    for (int64_t r = p.offsets[e]; r < p.offsets[e + 1]; ++r) {
      const float* xr = p.x.data() + r * H;
      for (int64_t j = 0; j < I; ++j) {
        double g = 0, u = 0, sg = 0, su = 0;
        for (int64_t k = 0; k < H; ++k) {
          const double tg = static_cast<double>(gate[j * H + k]) * xr[k];
          const double tu = static_cast<double>(up[j * H + k]) * xr[k];
          g += tg;
          u += tu;
          sg += std::fabs(tg);
          su += std::fabs(tu);
        }
        const double sig = 1.0 / (1.0 + std::exp(-g)), silu = g * sig;
        const double dsilu = sig * (1.0 + g * (1.0 - sig));
        act[j] = silu * u;
        act_mag[j] = std::fabs(silu * u) + std::fabs(dsilu * u) * sg + std::fabs(silu) * su;
      }
      const double w = p.row_weight[r];
      for (int64_t i = 0; i < H; ++i) {
        double d = 0, mag = 0;
        for (int64_t j = 0; j < I; ++j) {
          d += static_cast<double>(down[i * I + j]) * act[j];
          mag += std::fabs(down[i * I + j]) * act_mag[j];
        }
        ref.y[r * H + i] = w * d;
        ref.magnitude[r * H + i] = std::fabs(w) * mag;
      }
    }
  }
  return ref;
}

// fp32 against float64. The gate and up dots have hidden terms, the down dot intermediate, and
// the SwiGLU and the router weight add a few roundings, each at most 2^-24 relative: so, to
// first order, |got - want| <= (hidden + intermediate + 4) 2^-24 M, a worst case (random-sign
// errors stay below it: measured at most 12% of it over 300 seeds). Any indexing, grouping or
// weighting slip moves outputs by O(|y|), orders of magnitude above. Returns the worst
// |got - want| / tolerance.
double ExpectMatchesReference(const Problem& p, const std::vector<float>& got,
                              const std::string& what) {
  const Reference ref = Float64Reference(p);
  EXPECT_EQ(got.size(), ref.y.size());
  if (got.size() != ref.y.size()) return INFINITY;
  const int64_t H = p.shape.hidden;
  const double factor = (H + p.shape.intermediate + 4) * std::ldexp(1.0, -24);
  int reported = 0;
  double worst = 0;
  for (size_t at = 0; at < got.size(); ++at) {
    const double err = std::fabs(got[at] - ref.y[at]);
    const double tol = factor * ref.magnitude[at];
    worst = std::max(worst, err / tol);
    if (!(err <= tol) && reported < 8) {
      ADD_FAILURE() << what << " row " << at / H << " col " << at % H << ": got " << got[at]
                    << ", want " << ref.y[at] << ", tolerance " << tol;
      ++reported;
    }
  }
  return worst;
}

struct Layout {
  std::string name;
  std::vector<int64_t> groups;
};

std::vector<Layout> Layouts(std::mt19937_64& rng) {
  std::vector<Layout> layouts = {
      {"one expert", {5}},
      {"empty first and middle groups", {0, 3, 0, 2}},
      {"one-row groups", {1, 1, 1, 1, 1}},
      {"all rows in the last of six", {0, 0, 0, 0, 0, 7}},
      {"a group past 64 rows, an empty and a one-row group", {70, 0, 1}},
      {"empty last group", {2, 4, 0}},
  };
  Layout random{"random sizes 0..9 over 8 experts", {}};
  std::uniform_int_distribution<int64_t> size(0, 9);
  for (int e = 0; e < 8; ++e) random.groups.push_back(size(rng));
  if (random.groups[3] == 0) random.groups[3] = 1;  // at least one row
  layouts.push_back(random);
  return layouts;
}

TEST(MoeGroupedFfnTest, MatchesFloat64ReferenceOnRandomLayouts) {
  std::mt19937_64 rng(testing::TestSeed());
  double worst = 0;
  for (const Layout& layout : Layouts(rng)) {
    for (auto [hidden, intermediate] :
         {std::pair<int64_t, int64_t>{8, 4}, {40, 24}, {17, 33}, {72, 100}}) {
      const std::string what = layout.name + ", hidden " + std::to_string(hidden) +
                               ", intermediate " + std::to_string(intermediate);
      SCOPED_TRACE(what);
      Problem p = RandomProblem(layout.groups, hidden, intermediate, rng);
      ASSERT_TRUE(MoeGroupedFfn(p.Config()).ok());
      worst = std::max(worst, ExpectMatchesReference(p, p.y, what));
    }
  }
  std::cout << "[ worst ] |got - want| / tolerance = " << worst << "\n";
}

TEST(MoeGroupedFfnTest, ThreadPoolGivesTheSameBits) {
  std::mt19937_64 rng(testing::TestSeed());
  Problem p = RandomProblem({3, 0, 9, 1, 12}, 24, 40, rng);
  ASSERT_TRUE(MoeGroupedFfn(p.Config()).ok());
  const std::vector<float> serial = p.y;
  ThreadPool pool(2);
  p.y.assign(p.y.size(), NAN);
  ASSERT_TRUE(MoeGroupedFfn(p.Config(&pool)).ok());
  for (size_t i = 0; i < serial.size(); ++i) {
    ASSERT_EQ(std::memcmp(&serial[i], &p.y[i], sizeof(float)), 0) << "element " << i;
  }
}

TEST(MoeGroupedFfnTest, RowWeightScalesEachRow) {
  std::mt19937_64 rng(testing::TestSeed());
  Problem p = RandomProblem({2, 3}, 16, 8, rng);
  ASSERT_TRUE(MoeGroupedFfn(p.Config()).ok());
  const std::vector<float> weighted = p.y;
  const std::vector<float> w = p.row_weight;
  for (float& f : p.row_weight) f = 1.0f;
  ASSERT_TRUE(MoeGroupedFfn(p.Config()).ok());
  // The weight multiplies the finished fp32 down product: exactly one more rounding.
  for (int64_t r = 0; r < p.shape.rows; ++r) {
    for (int64_t i = 0; i < p.shape.hidden; ++i) {
      const size_t at = r * p.shape.hidden + i;
      EXPECT_EQ(weighted[at], w[r] * p.y[at]) << "row " << r << " col " << i;
    }
  }
}

TEST(MoeGroupedFfnTest, NoRowsIsANoOp) {
  MoeGroupedFfnConfig c;
  c.shape = {0, 16, 8, 4};
  EXPECT_TRUE(MoeGroupedFfn(c).ok());  // nothing is read: empty spans are fine
  c.shape = {0, 0, 0, 0};
  EXPECT_TRUE(MoeGroupedFfn(c).ok());
}

TEST(MoeGroupedFfnTest, RejectsBadArgumentsNamingThem) {
  std::mt19937_64 rng(1);
  const Problem good = RandomProblem({2, 0, 3}, 8, 4, rng);
  auto status = [&](auto mutate) {
    Problem p = good;
    MoeGroupedFfnConfig c = p.Config();
    mutate(p, c);
    const absl::Status s = MoeGroupedFfn(c);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    return s;
  };
  auto expect_has = [](const absl::Status& s, std::initializer_list<std::string_view> needles) {
    for (std::string_view n : needles) EXPECT_TRUE(MessageHas(s, n)) << s << " lacks " << n;
  };
  {
    Problem p = good;
    EXPECT_TRUE(MoeGroupedFfn(p.Config()).ok());
  }
  // Offsets.
  expect_has(status([](Problem& p, MoeGroupedFfnConfig& c) {
               p.offsets = {0, 3, 2, 5};
               c.group_offsets = p.offsets;
             }),
             {"group_offsets", "non-decreasing", "group_offsets[2] = 2"});
  expect_has(status([](Problem& p, MoeGroupedFfnConfig& c) {
               p.offsets = {0, 2, 2, 4};
               c.group_offsets = p.offsets;
             }),
             {"group_offsets[3]", "want rows = 5"});
  expect_has(status([](Problem& p, MoeGroupedFfnConfig& c) {
               p.offsets = {0, 2, 2, 6};
               c.group_offsets = p.offsets;
             }),
             {"group_offsets[3]", "want rows = 5"});
  expect_has(status([](Problem& p, MoeGroupedFfnConfig& c) {
               p.offsets = {1, 2, 2, 5};
               c.group_offsets = p.offsets;
             }),
             {"group_offsets[0] = 1"});
  expect_has(status([](Problem& p, MoeGroupedFfnConfig& c) {
               p.offsets = {0, 2, 5};
               c.group_offsets = p.offsets;
             }),
             {"group_offsets has 3", "want 4"});
  // Null pointers with rows > 0.
  expect_has(status([](Problem&, MoeGroupedFfnConfig& c) { c.x = {}; }), {"x is null"});
  expect_has(status([](Problem&, MoeGroupedFfnConfig& c) { c.gate = {}; }), {"gate is null"});
  expect_has(status([](Problem&, MoeGroupedFfnConfig& c) { c.up = {}; }), {"up is null"});
  expect_has(status([](Problem&, MoeGroupedFfnConfig& c) { c.down = {}; }), {"down is null"});
  expect_has(status([](Problem&, MoeGroupedFfnConfig& c) { c.row_weight = {}; }),
             {"row_weight is null"});
  expect_has(status([](Problem&, MoeGroupedFfnConfig& c) { c.y = {}; }), {"y is null"});
  expect_has(status([](Problem&, MoeGroupedFfnConfig& c) { c.group_offsets = {}; }),
             {"group_offsets is null"});
  // Shape mismatches.
  expect_has(status([](Problem&, MoeGroupedFfnConfig& c) { c.x = c.x.subspan(1); }),
             {"x has 39", "want 40"});
  expect_has(status([](Problem&, MoeGroupedFfnConfig& c) { c.shape.hidden = 9; }),
             {"x has 40", "want 45"});
  expect_has(status([](Problem&, MoeGroupedFfnConfig& c) { c.up = c.up.subspan(4); }),
             {"up has", "want 96"});
  expect_has(status([](Problem& p, MoeGroupedFfnConfig& c) {
               p.down.push_back(0);
               c.down = p.down;
             }),
             {"down has 97", "want 96"});
  expect_has(
      status([](Problem&, MoeGroupedFfnConfig& c) { c.row_weight = c.row_weight.subspan(0, 4); }),
      {"row_weight has 4", "want 5"});
  expect_has(status([](Problem&, MoeGroupedFfnConfig& c) { c.y = c.y.subspan(0, 39); }),
             {"y has 39", "want 40"});
  expect_has(status([](Problem&, MoeGroupedFfnConfig& c) { c.gate = c.gate.subspan(0, 64); }),
             {"gate has 64", "want 96"});
  expect_has(status([](Problem&, MoeGroupedFfnConfig& c) { c.shape.n_experts = 2; }),
             {"group_offsets has 4", "want 3"});
  expect_has(status([](Problem&, MoeGroupedFfnConfig& c) { c.shape.intermediate = -1; }),
             {"negative shape"});
  expect_has(status([](Problem&, MoeGroupedFfnConfig& c) { c.shape.intermediate = 0; }),
             {"intermediate"});
}

}  // namespace
}  // namespace quantkv::kernels
