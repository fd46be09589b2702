// The built `quantkv` binary, run as a user runs it: exit codes, and which stream says what.
#include <filesystem>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/util/model_cache.h"
#include "tests/launcher/test_helpers.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

namespace fs = std::filesystem;
using ::quantkv::testing::ProcessOutput;
using ::quantkv::testing::ScopedEnv;
using ::quantkv::testing::ScratchDir;
using ::quantkv::testing::WriteFile;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::StartsWith;

class QuantkvCliTest : public ::testing::Test {
 protected:
  ProcessOutput Quantkv(std::vector<std::string> args) {
    args.insert(args.begin(), QUANTKV_BINARY);
    return testing::RunProcess(args, scratch_.path());
  }

  ScratchDir scratch_;
  ScratchDir home_;
  // The user's cached model, looked up before the environment is pointed elsewhere.
  fs::path real_model_ = testing::DefaultModelPath();
  // Never the user's real cache, and never a real download.
  ScopedEnv env_home_{"QUANTKV_HOME", home_.path().string()};
  ScopedEnv env_python_{"QUANTKV_PYTHON", "/nonexistent/python3"};
};

TEST_F(QuantkvCliTest, NoArgumentsIsAUsageError) {
  const ProcessOutput r = Quantkv({});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.out, IsEmpty());
  EXPECT_THAT(r.err, StartsWith("Usage: quantkv COMMAND"));
}

TEST_F(QuantkvCliTest, Help) {
  const ProcessOutput r = Quantkv({"--help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, StartsWith("Usage: quantkv COMMAND"));
  EXPECT_THAT(r.out, HasSubstr("fetch-model"));
  EXPECT_THAT(r.err, IsEmpty());
}

TEST_F(QuantkvCliTest, Version) {
  const ProcessOutput r = Quantkv({"--version"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.out, std::string("quantkv ") + QUANTKV_EXPECTED_VERSION + "\n");
  EXPECT_THAT(r.err, IsEmpty());
}

TEST_F(QuantkvCliTest, SubcommandHelp) {
  for (std::vector<std::string> args : {std::vector<std::string>{"fetch-model", "--help"},
                                        std::vector<std::string>{"help", "fetch-model"}}) {
    const ProcessOutput r = Quantkv(args);
    EXPECT_EQ(r.exit_code, 0);
    EXPECT_THAT(r.out, StartsWith("Usage: quantkv fetch-model [flags] [NAME]"));
    EXPECT_THAT(r.out, HasSubstr("--cache-dir=DIR"));
    EXPECT_THAT(r.err, IsEmpty());
  }
}

TEST_F(QuantkvCliTest, UsageErrorsExit2OnStderr) {
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"frobnicate"}, "unknown command 'frobnicate'"},
      {{"fetch-modl"}, "did you mean 'fetch-model'?"},
      {{"--frob"}, "unknown option '--frob'"},
      {{"fetch-model", "--bogus"}, "unknown flag --bogus"},
      {{"fetch-model", "--forc"}, "did you mean --force?"},
      {{"fetch-model", "--cache-dir"}, "--cache-dir needs a value"},
      {{"fetch-model", "--list=maybe"}, "--list: 'maybe' is not a boolean"},
      {{"fetch-model", "--force", "--force"}, "--force is given more than once"},
      {{"fetch-model", "a", "b"}, "at most 1 NAME argument"},
      {{"fetch-model", "llama-7b"}, "unknown model 'llama-7b'; known models: smollm2-135m"},
      {{"perplexity", "--ep-payload", "int9"}, "'int9' is not an expert payload"},
      {{"perplexity", "--ep-payload", "int4/int8/fp32"}, "one '/' at most"},
      {{"generate"}, "--prompt (or --prompt-file) is required"},
      {{"generate", "--prompt", "x", "--prompt-file", "/etc/passwd"}, "not both"},
      {{"generate", "--prompt-file", "/nonexistent/prompt.txt"}, "does not exist"},
  };
  for (const Case& c : cases) {
    const ProcessOutput r = Quantkv(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args[0] << " " << r.err;
    EXPECT_THAT(r.out, IsEmpty()) << c.message;
    EXPECT_THAT(r.err, HasSubstr(c.message));
  }
}

TEST_F(QuantkvCliTest, FetchModelFailureExits1WithoutAPath) {
  const ProcessOutput r = Quantkv({"fetch-model"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, IsEmpty());
  EXPECT_THAT(r.err, HasSubstr("quantkv fetch-model: error: cannot download smollm2-135m"));
  EXPECT_THAT(r.err, HasSubstr("/nonexistent/python3"));
}

TEST_F(QuantkvCliTest, FetchModelListShowsCacheState) {
  ProcessOutput r = Quantkv({"fetch-model", "--list"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, StartsWith("smollm2-135m\tnot cached\t" + home_.path().string()));
  WriteFile(home_.path() / "SmolLM2-135M-Instruct.Q4_1.gguf", "junk");
  r = Quantkv({"fetch-model", "--list"});
  EXPECT_THAT(r.out, StartsWith("smollm2-135m\tdamaged"));
}

TEST_F(QuantkvCliTest, FetchModelRejectsADamagedCopy) {
  WriteFile(home_.path() / "SmolLM2-135M-Instruct.Q4_1.gguf", "junk");
  const ProcessOutput r = Quantkv({"fetch-model"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, IsEmpty());
  EXPECT_THAT(r.err, HasSubstr("not using the cached file"));
  EXPECT_THAT(r.err, HasSubstr("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"));
}

// A verified copy is printed at once; with no usable Python, that proves no download ran.
TEST_F(QuantkvCliTest, FetchModelPrintsACachedModelWithoutNetwork) {
  if (!fs::exists(real_model_)) {
    GTEST_SKIP() << real_model_ << " is not cached; run quantkv fetch-model";
  }
  const fs::path link = home_.path() / "SmolLM2-135M-Instruct.Q4_1.gguf";
  fs::create_symlink(fs::absolute(real_model_), link);
  const ProcessOutput r = Quantkv({"fetch-model", "smollm2-135m"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, link.string() + "\n");
  EXPECT_THAT(r.err, IsEmpty());
}

}  // namespace
}  // namespace quantkv
