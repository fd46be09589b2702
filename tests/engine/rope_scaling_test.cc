// --rope-scaling (runtime/model/rope_scaling.h): what each kind does to the model's RoPE and
// context, NTK's frequencies against their defining property, and the errors.
#include "runtime/model/rope_scaling.h"

#include <cmath>

#include "gtest/gtest.h"
#include "kernels/rope.h"

namespace quantkv {
namespace {

ModelConfig Smol() {
  ModelConfig c;
  c.head_dim = 64;
  c.context_length = 8192;
  c.rope.theta = 100000.0f;
  return c;
}

TEST(RopeScalingTest, EachKindSetsTheRopeAndScalesTheContext) {
  ModelConfig linear = Smol();
  ASSERT_TRUE(ApplyRopeScaling("linear:4", &linear).ok());
  EXPECT_EQ(linear.rope.scaling, RopeScalingType::kLinear);
  EXPECT_FLOAT_EQ(linear.rope.factor, 4.0f);
  EXPECT_EQ(linear.context_length, 32768);

  ModelConfig yarn = Smol();
  ASSERT_TRUE(ApplyRopeScaling("yarn:2.5", &yarn).ok());
  EXPECT_EQ(yarn.rope.scaling, RopeScalingType::kYarn);
  EXPECT_EQ(yarn.rope.original_context, 8192);
  EXPECT_EQ(yarn.context_length, 20480);

  ModelConfig same = Smol();
  ASSERT_TRUE(ApplyRopeScaling("", &same).ok());
  ASSERT_TRUE(ApplyRopeScaling("model", &same).ok());
  EXPECT_EQ(same.context_length, 8192);
  EXPECT_EQ(same.rope.scaling, RopeScalingType::kNone);
}

// NTK-aware: the fastest pair keeps its frequency, the slowest turns F times slower.
TEST(RopeScalingTest, NtkKeepsTheHighestFrequencyAndStretchesTheLowest) {
  ModelConfig ntk = Smol();
  ASSERT_TRUE(ApplyRopeScaling("ntk:4", &ntk).ok());
  EXPECT_EQ(ntk.rope.scaling, RopeScalingType::kNone);
  EXPECT_EQ(ntk.context_length, 32768);
  kernels::RopeSpec base{.head_dim = 64, .theta = 100000.0};
  kernels::RopeSpec scaled{.head_dim = 64, .theta = ntk.rope.theta};
  const kernels::RopeTable a(base), b(scaled);
  EXPECT_DOUBLE_EQ(b.inv_freq().front(), a.inv_freq().front());
  EXPECT_NEAR(b.inv_freq().back() * 4.0 / a.inv_freq().back(), 1.0, 1e-5);
  EXPECT_LT(b.inv_freq()[16], a.inv_freq()[16]);
}

TEST(RopeScalingTest, BadSpecsAreRefusedByName) {
  for (const char* bad :
       {"linear", "linear:1", "linear:0.5", "linear:100", "linear:x", "foo:2", "ntk:", ":2"}) {
    ModelConfig c = Smol();
    const absl::Status s = ApplyRopeScaling(bad, &c);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(s.message().find("--rope-scaling"), std::string::npos) << s;
    EXPECT_EQ(c.context_length, 8192) << bad;  // unchanged on error
  }
  ModelConfig declared = Smol();
  declared.rope.scaling = RopeScalingType::kYarn;
  const absl::Status s = ApplyRopeScaling("linear:2", &declared);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("already declares"), std::string::npos) << s;
}

}  // namespace
}  // namespace quantkv
