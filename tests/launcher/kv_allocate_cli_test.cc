// `quantkv kv-allocate` and the flag checks of `quantkv sensitivity` as a user meets them
// (in process, no model): exit codes, which flag an error names, and a policy file that
// loads as --kv @FILE.
#include <filesystem>
#include <fstream>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "launcher/commands.h"
#include "runtime/kv/kv_policy.h"
#include "runtime/kv/kv_sensitivity_file.h"

namespace quantkv::launcher {
namespace {

using ::testing::HasSubstr;

struct Result {
  int code;
  std::string out, err;
};

Result RunQuantkv(std::vector<std::string> args) {
  std::ostringstream out, err;
  const std::vector<Subcommand> commands = BuiltinSubcommands();
  const int code = RunCommandLine(commands, args, out, err);
  return {code, out.str(), err.str()};
}

class KvAllocateCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ =
        std::filesystem::temp_directory_path() / ("kv_allocate_cli_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
    KvSensitivity s;
    s.n_layers = 2;
    s.n_kv_heads = 1;
    s.head_dim = 64;
    s.block = 32;
    for (int64_t l = 0; l < 2; ++l) {
      KvLayerSensitivity ls;
      ls.layer = l;
      ls.k = {{.codec = "int4:g64:asym", .kl = 0.01}, {.codec = "int2:g64:asym", .kl = 0.5}};
      ls.v = {{.codec = "int4:g64:asym", .kl = 0.001}, {.codec = "int2:g64:asym", .kl = 0.02}};
      s.layers.push_back(ls);
    }
    sens_ = (dir_ / "sens.json").string();
    ASSERT_TRUE(WriteKvSensitivity(sens_, s).ok());
    out_ = (dir_ / "policy.json").string();
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::filesystem::path dir_;
  std::string sens_, out_;
};

TEST_F(KvAllocateCliTest, WritesAPolicyThatLoads) {
  const Result r =
      RunQuantkv({"kv-allocate", "--sensitivity", sens_, "--kv-budget", "3.5", "--out", out_});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  EXPECT_THAT(r.out, HasSubstr("allocated 3.5000 bits/element"));
  absl::StatusOr<KvPolicy> p = ParseKvPolicy("@" + out_, 2, 1);
  ASSERT_TRUE(p.ok()) << p.status();
  // 3.5 bits fits two int4 and two int2 slabs: the keys, which cost more, get int4.
  EXPECT_EQ(p->ForLayer(0).k.ToString(), "int4:g64:asym");
  EXPECT_EQ(p->ForLayer(1).k.ToString(), "int4:g64:asym");
  EXPECT_EQ(p->ForLayer(0).v.ToString(), "int2:g64:asym");
}

TEST_F(KvAllocateCliTest, BudgetErrorsAreUsageErrorsNamingTheFlag) {
  Result r = RunQuantkv({"kv-allocate", "--sensitivity", sens_, "--out", out_});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("exactly one of --kv-budget"));
  r = RunQuantkv({"kv-allocate", "--sensitivity", sens_, "--kv-budget", "2", "--bytes-budget",
                  "100", "--out", out_});
  EXPECT_EQ(r.code, kExitUsage);
  r = RunQuantkv({"kv-allocate", "--sensitivity", sens_, "--kv-budget", "2", "--out", out_});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("--kv-budget 2: budget 2.0000 bits/element"));
  EXPECT_THAT(r.err, HasSubstr("minimum achievable 2.5000 bits/element"));
  EXPECT_FALSE(std::filesystem::exists(out_));
  r = RunQuantkv({"kv-allocate", "--sensitivity", sens_, "--kv-budget", "-1", "--out", out_});
  EXPECT_EQ(r.code, kExitUsage);
  r = RunQuantkv({"kv-allocate", "--sensitivity", sens_, "--kv-budget", "3", "--granularity",
                  "head", "--out", out_});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("no per-head data"));
}

TEST_F(KvAllocateCliTest, MalformedFileNamesTheField) {
  std::ifstream in(sens_);
  std::stringstream text;
  text << in.rdbuf();
  std::string bad = text.str();
  bad.replace(bad.find("\"kl\""), 4, "\"kx\"");
  std::ofstream(sens_, std::ios::trunc) << bad;
  const Result r =
      RunQuantkv({"kv-allocate", "--sensitivity", sens_, "--kv-budget", "3", "--out", out_});
  EXPECT_EQ(r.code, kExitFailure);
  EXPECT_THAT(r.err, HasSubstr("layers[0].k[0].kl is missing"));
}

TEST(SensitivityCliTest, BadFlagsAreUsageErrors) {
  const std::string text =
      (std::filesystem::temp_directory_path() / "sensitivity_cli.txt").string();
  std::ofstream(text) << "some text";
  for (const auto& [flag, value, message] :
       std::vector<std::tuple<std::string, std::string, std::string>>{
           {"--bits", "5", "'5' is not a bit width"},
           {"--codec-template", "int4", "must contain {b}"},
           {"--k-codec-template", "int{b}:gx", "--k-codec-template"},
           {"--layers", "3-1", "'3-1' is not a layer or range"},
           {"--head-proxy", "cos", "--head-proxy"}}) {
    const Result r =
        RunQuantkv({"sensitivity", "--text", text, "--out", "/tmp/x.json", flag, value});
    EXPECT_EQ(r.code, kExitUsage) << flag;
    EXPECT_THAT(r.err, HasSubstr(message)) << flag;
  }
  std::filesystem::remove(text);
}

}  // namespace
}  // namespace quantkv::launcher
