#include "launcher/flags.h"

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace quantkv::launcher {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

enum class Kv { kFp32, kFp16 };

// The flags a typical model subcommand has.
struct Options {
  int max_tokens = 0;
  int64_t seed = 0;
  uint32_t threads = 0;
  double temperature = 0;
  float top_p = 0;
  bool chat = false;
  bool json = false;
  std::string model;
  std::string text;
  std::string out_dir;
  std::string kv_name;
  Kv kv = Kv::kFp16;
  std::string spec;
  std::vector<std::string> prompt;
};

class FlagsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    flags_.Int("max-tokens", &o_.max_tokens, 64, "tokens to generate", {.min = 1, .max = 4096});
    flags_.Int<int64_t>("seed", &o_.seed, -1, "random seed");
    flags_.Int<uint32_t>("threads", &o_.threads, 2, "worker threads", {.min = 1});
    flags_.Float("temperature", &o_.temperature, 0.7, "sampling temperature", {.min = 0, .max = 2});
    flags_.Float("top-p", &o_.top_p, 1.0f, "nucleus mass",
                 {.min = 0, .max = 1, .min_exclusive = true});
    flags_.Bool("chat", &o_.chat, "apply the chat template");
    flags_.Bool("json", &o_.json, "print JSON");
    flags_.String("model", &o_.model, "smollm2-135m", "model path or name")
        .Placeholder("PATH|NAME");
    flags_.Path("text", &o_.text, "", "text to score");
    flags_.Path("out-dir", &o_.out_dir, "", "where results go", PathKind::kDirectory);
    flags_.Choice("kv-name", &o_.kv_name, std::string("fp32"), {"fp32", "fp16"}, "KV format");
    flags_.Choice<Kv>("kv", &o_.kv, Kv::kFp32, {{"fp32", Kv::kFp32}, {"fp16", Kv::kFp16}},
                      "KV format as an enum");
    flags_.String(
        "spec", &o_.spec, "", "a spec that must start with 'int'", [](std::string_view v) {
          return v.starts_with("int") ? absl::OkStatus()
                                      : absl::InvalidArgumentError("must start with 'int'");
        });
  }

  absl::Status Parse(std::vector<std::string> args) { return flags_.Parse(args); }

  static std::string TempFile() {
    std::string pattern = (std::filesystem::temp_directory_path() / "qkv_flags_XXXXXX").string();
    const int fd = ::mkstemp(pattern.data());
    EXPECT_GE(fd, 0);
    ::close(fd);
    return pattern;
  }

  Options o_;
  FlagSet flags_{"quantkv test", "A test command."};
};

TEST_F(FlagsTest, DefaultsAreAssignedAtDefinition) {
  EXPECT_EQ(o_.max_tokens, 64);
  EXPECT_EQ(o_.seed, -1);
  EXPECT_EQ(o_.threads, 2u);
  EXPECT_DOUBLE_EQ(o_.temperature, 0.7);
  EXPECT_FLOAT_EQ(o_.top_p, 1.0f);
  EXPECT_FALSE(o_.chat);
  EXPECT_EQ(o_.model, "smollm2-135m");
  EXPECT_EQ(o_.kv_name, "fp32");
  EXPECT_EQ(o_.kv, Kv::kFp32);
  ASSERT_TRUE(Parse({}).ok());
  EXPECT_EQ(o_.max_tokens, 64);
  EXPECT_FALSE(flags_.WasSet("max-tokens"));
}

TEST_F(FlagsTest, SpaceAndEqualsForms) {
  ASSERT_TRUE(Parse({"--max-tokens", "5", "--temperature=0.25", "--model=m.gguf", "--kv", "fp16",
                     "--kv-name=fp16", "--seed", "-3", "--top-p", "+0.5", "--threads=+8"})
                  .ok());
  EXPECT_EQ(o_.max_tokens, 5);
  EXPECT_DOUBLE_EQ(o_.temperature, 0.25);
  EXPECT_EQ(o_.model, "m.gguf");
  EXPECT_EQ(o_.kv, Kv::kFp16);
  EXPECT_EQ(o_.kv_name, "fp16");
  EXPECT_EQ(o_.seed, -3);  // a negative number is a value, not a flag
  EXPECT_FLOAT_EQ(o_.top_p, 0.5f);
  EXPECT_EQ(o_.threads, 8u);
  EXPECT_TRUE(flags_.WasSet("max-tokens"));
  EXPECT_FALSE(flags_.WasSet("chat"));
}

TEST_F(FlagsTest, EmptyValueWithEquals) {
  ASSERT_TRUE(Parse({"--model="}).ok());
  EXPECT_EQ(o_.model, "");
}

TEST_F(FlagsTest, BoolForms) {
  ASSERT_TRUE(Parse({"--chat", "--json=false"}).ok());
  EXPECT_TRUE(o_.chat);
  EXPECT_FALSE(o_.json);

  Options o2;
  FlagSet f2("quantkv t", "");
  f2.Bool("chat", &o2.chat, "");
  std::vector<std::string> args = {"--no-chat"};
  ASSERT_TRUE(f2.Parse(args).ok());
  EXPECT_FALSE(o2.chat);
  EXPECT_TRUE(f2.WasSet("chat"));

  FlagSet f3("quantkv t", "");
  f3.Bool("chat", &o2.chat, "");
  args = {"--chat=1"};
  ASSERT_TRUE(f3.Parse(args).ok());
  EXPECT_TRUE(o2.chat);
}

TEST_F(FlagsTest, BoolDoesNotConsumeTheNextArgument) {
  const absl::Status s = Parse({"--chat", "true"});
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("unexpected argument 'true'"));
}

TEST_F(FlagsTest, BadBoolValue) {
  const absl::Status s = Parse({"--chat=maybe"});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("--chat"));
  EXPECT_THAT(s.message(), HasSubstr("true|false"));
  EXPECT_THAT(Parse({"--no-chat=true"}).message(), HasSubstr("takes no value"));
}

TEST_F(FlagsTest, IntOutOfRangeNamesFlagAndRange) {
  absl::Status s = Parse({"--max-tokens", "0"});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("--max-tokens"));
  EXPECT_THAT(s.message(), HasSubstr("[1, 4096]"));

  FlagSet f("quantkv t", "");
  int n;
  f.Int("n", &n, 1, "", {.min = 1, .max = 4096});
  std::vector<std::string> args = {"--n=4097"};
  s = f.Parse(args);
  EXPECT_THAT(s.message(), HasSubstr("4097 is out of range; allowed: in [1, 4096]"));
}

TEST_F(FlagsTest, IntNotANumber) {
  for (const char* bad : {"abc", "12x", "1.5", "", " 3", "0x10"}) {
    FlagSet f("quantkv t", "");
    int n;
    f.Int("n", &n, 1, "", {.min = 1, .max = 9});
    std::vector<std::string> args = {absl::StrCat("--n=", bad)};
    const absl::Status s = f.Parse(args);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(s.message(), HasSubstr("--n: ")) << bad;
    EXPECT_THAT(s.message(), HasSubstr("is not an integer; allowed: in [1, 9]")) << bad;
  }
}

TEST_F(FlagsTest, IntOverflowForItsType) {
  absl::Status s = Parse({"--max-tokens", "99999999999"});
  EXPECT_THAT(s.message(), HasSubstr("does not fit in a 32-bit signed integer"));
  s = Parse({"--threads", "-1"});
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("--threads"));
}

TEST_F(FlagsTest, FloatRangeAndParsing) {
  absl::Status s = Parse({"--temperature", "2.5"});
  EXPECT_THAT(s.message(), HasSubstr("--temperature: 2.5 is out of range; allowed: in [0, 2]"));

  FlagSet f("quantkv t", "");
  float p;
  f.Float("top-p", &p, 1.0f, "", {.min = 0, .max = 1, .min_exclusive = true});
  std::vector<std::string> args = {"--top-p=0"};
  s = f.Parse(args);
  EXPECT_THAT(s.message(), HasSubstr("allowed: in (0, 1]"));

  for (const char* bad : {"nan", "inf", "abc", "1.0.0", "", "1e999"}) {
    FlagSet g("quantkv t", "");
    double t;
    g.Float("t", &t, 0.0, "");
    args = {absl::StrCat("--t=", bad)};
    s = g.Parse(args);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(s.message(), HasSubstr("--t: ")) << bad;
  }

  FlagSet h("quantkv t", "");
  float small;
  h.Float("x", &small, 0.0f, "");
  args = {"--x=1e300"};
  EXPECT_THAT(h.Parse(args).message(), HasSubstr("does not fit in a 32-bit float"));
}

TEST_F(FlagsTest, ChoiceListsAllowedValues) {
  absl::Status s = Parse({"--kv", "int5"});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("--kv: 'int5' is not one of fp32|fp16"));
  s = Parse({"--kv-name=FP16"});
  EXPECT_THAT(s.message(), HasSubstr("not one of fp32|fp16"));
}

TEST_F(FlagsTest, StringValidator) {
  EXPECT_TRUE(Parse({"--spec=int4"}).ok());
  EXPECT_EQ(o_.spec, "int4");
  FlagSet f("quantkv t", "");
  std::string spec;
  f.String("spec", &spec, "", "", [](std::string_view v) {
    return v.starts_with("int") ? absl::OkStatus()
                                : absl::InvalidArgumentError("must start with 'int'");
  });
  std::vector<std::string> args = {"--spec", "fp8"};
  EXPECT_THAT(f.Parse(args).message(), HasSubstr("--spec: must start with 'int'"));
}

TEST_F(FlagsTest, PathMustExistWithTheRightKind) {
  const std::string file = TempFile();
  const std::string dir = std::filesystem::temp_directory_path().string();
  EXPECT_TRUE(Parse({"--text", file, "--out-dir", dir}).ok());
  EXPECT_EQ(o_.text, file);
  EXPECT_EQ(o_.out_dir, dir);

  FlagSet f1("quantkv t", "");
  std::string p;
  f1.Path("text", &p, "", "");
  std::vector<std::string> args = {"--text=/no/such/file.txt"};
  absl::Status s = f1.Parse(args);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("--text: '/no/such/file.txt' does not exist"));

  FlagSet f2("quantkv t", "");
  f2.Path("text", &p, "", "");
  args = {"--text", dir};
  EXPECT_THAT(f2.Parse(args).message(), HasSubstr("is a directory; expected a file"));

  FlagSet f3("quantkv t", "");
  f3.Path("out-dir", &p, "", "", PathKind::kDirectory);
  args = {"--out-dir", file};
  EXPECT_THAT(f3.Parse(args).message(), HasSubstr("is not a directory"));
  std::filesystem::remove(file);
}

TEST_F(FlagsTest, UnknownFlagSuggestsNearest) {
  absl::Status s = Parse({"--max-token", "3"});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("unknown flag --max-token; did you mean --max-tokens?"));
  s = Parse({"--temp=1"});
  EXPECT_THAT(s.message(), HasSubstr("did you mean --temperature?"));
  s = Parse({"--zzzzzzzz"});
  EXPECT_THAT(s.message(), HasSubstr("unknown flag --zzzzzzzz"));
  EXPECT_THAT(s.message(), Not(HasSubstr("did you mean")));
  s = Parse({"-x"});
  EXPECT_THAT(s.message(), HasSubstr("unknown flag '-x'"));
  // Underscores are not silently mapped; the suggestion says what to type.
  EXPECT_THAT(Parse({"--max_tokens=3"}).message(), HasSubstr("did you mean --max-tokens?"));
}

TEST_F(FlagsTest, MissingValue) {
  absl::Status s = Parse({"--max-tokens"});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("--max-tokens needs a value (INT in [1, 4096])"));
  // A following flag is not taken as the value.
  s = Parse({"--model", "--json"});
  EXPECT_THAT(s.message(), HasSubstr("--model needs a value"));
  EXPECT_THAT(s.message(), HasSubstr("--model=--json"));
}

TEST_F(FlagsTest, ValueStartingWithDashesViaEquals) {
  ASSERT_TRUE(Parse({"--model=--weird"}).ok());
  EXPECT_EQ(o_.model, "--weird");
}

TEST_F(FlagsTest, DuplicateOnCommandLine) {
  absl::Status s = Parse({"--max-tokens=3", "--max-tokens", "4"});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("--max-tokens is given more than once"));
  EXPECT_THAT(Parse({"--chat", "--no-chat"}).message(),
              HasSubstr("--chat is given more than once"));
}

TEST_F(FlagsTest, DuplicateOrBadDefinitionIsInternalError) {
  FlagSet f("quantkv t", "");
  int a, b;
  f.Int("n", &a, 1, "");
  f.Int("n", &b, 2, "");
  absl::Status s = f.Parse({});
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(), HasSubstr("--n is defined twice"));

  FlagSet g("quantkv t", "");
  g.Int("Bad_Name", &a, 1, "");
  EXPECT_THAT(g.Parse({}).message(), HasSubstr("'Bad_Name'"));

  FlagSet h("quantkv t", "");
  bool x;
  h.Bool("help", &x, "");
  EXPECT_EQ(h.Parse({}).code(), absl::StatusCode::kInternal);
}

TEST_F(FlagsTest, DefaultOutsideItsRangeIsInternalError) {
  FlagSet f("quantkv t", "");
  int n;
  f.Int("n", &n, 0, "", {.min = 1, .max = 9});
  EXPECT_THAT(f.Parse({}).message(), HasSubstr("default 0 of --n is not in [1, 9]"));

  FlagSet g("quantkv t", "");
  double p;
  g.Float("p", &p, 0.0, "", {.min = 0, .max = 1, .min_exclusive = true});
  EXPECT_THAT(g.Parse({}).message(), HasSubstr("default 0 of --p is not in (0, 1]"));

  FlagSet h("quantkv t", "");
  std::string kv;
  h.Choice("kv", &kv, std::string("int4"), {"fp32", "fp16"}, "");
  EXPECT_THAT(h.Parse({}).message(), HasSubstr("the default of --kv is none of its choices"));
}

TEST_F(FlagsTest, HelpWinsOverErrors) {
  ASSERT_TRUE(Parse({"--max-tokens", "0", "--help"}).ok());
  EXPECT_TRUE(flags_.help_requested());
  FlagSet f("quantkv t", "");
  ASSERT_TRUE(f.Parse(std::vector<std::string>{"-h"}).ok());
  EXPECT_TRUE(f.help_requested());
  // After "--" it is an argument like any other.
  FlagSet g("quantkv t", "");
  std::vector<std::string> rest;
  g.Positional("ARG", &rest);
  ASSERT_TRUE(g.Parse(std::vector<std::string>{"--", "--help", "-x"}).ok());
  EXPECT_FALSE(g.help_requested());
  EXPECT_EQ(rest, (std::vector<std::string>{"--help", "-x"}));
}

TEST_F(FlagsTest, RequiredFlag) {
  FlagSet f("quantkv t", "");
  std::string model;
  f.String("model", &model, "", "model").Required().Placeholder("PATH");
  absl::Status s = f.Parse({});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("missing required flag --model=PATH"));
  FlagSet g("quantkv t", "");
  g.String("model", &model, "", "model").Required();
  ASSERT_TRUE(g.Parse(std::vector<std::string>{"--model", "x"}).ok());
  EXPECT_EQ(model, "x");
}

TEST_F(FlagsTest, PositionalArguments) {
  FlagSet f("quantkv t", "");
  std::vector<std::string> prompt;
  int n;
  f.Int("n", &n, 1, "");
  f.Positional("PROMPT", &prompt, 1, 2);
  ASSERT_TRUE(f.Parse(std::vector<std::string>{"hello", "--n", "3", "-"}).ok());
  EXPECT_EQ(prompt, (std::vector<std::string>{"hello", "-"}));
  EXPECT_EQ(n, 3);

  FlagSet g("quantkv t", "");
  g.Positional("PROMPT", &prompt, 1, 2);
  EXPECT_THAT(g.Parse({}).message(), HasSubstr("expected at least 1 PROMPT argument, got 0"));
  FlagSet h("quantkv t", "");
  h.Positional("PROMPT", &prompt, 1, 2);
  EXPECT_THAT(h.Parse(std::vector<std::string>{"a", "b", "c"}).message(),
              HasSubstr("at most 2 PROMPT arguments, got 3 (first extra: 'c')"));
  EXPECT_THAT(Parse({"stray"}).message(), HasSubstr("unexpected argument 'stray'"));
}

TEST_F(FlagsTest, UsageListsFlagsWithDefaultsAndRanges) {
  std::vector<std::string> prompt;
  flags_.Positional("PROMPT", &prompt, 0, 100, "text to continue");
  const std::string usage = flags_.Usage();
  EXPECT_THAT(usage, HasSubstr("Usage: quantkv test [flags] [PROMPT...]\n"));
  EXPECT_THAT(usage, HasSubstr("A test command."));
  EXPECT_THAT(usage, HasSubstr("--max-tokens=INT"));
  EXPECT_THAT(usage, HasSubstr("tokens to generate (in [1, 4096]; default: 64)"));
  EXPECT_THAT(usage, HasSubstr("--temperature=FLOAT"));
  EXPECT_THAT(usage, HasSubstr("(in [0, 2]; default: 0.7)"));
  EXPECT_THAT(usage, HasSubstr("(in (0, 1]; default: 1)"));
  EXPECT_THAT(usage, HasSubstr("--threads=INT"));
  EXPECT_THAT(usage, HasSubstr("(at least 1; default: 2)"));
  EXPECT_THAT(usage, HasSubstr("--kv=fp32|fp16"));
  EXPECT_THAT(usage, HasSubstr("KV format as an enum (default: fp32)"));
  EXPECT_THAT(usage, HasSubstr("--model=PATH|NAME"));
  EXPECT_THAT(usage, HasSubstr("(default: smollm2-135m)"));
  EXPECT_THAT(usage, HasSubstr("--chat "));
  EXPECT_THAT(usage, HasSubstr("--text=FILE"));
  EXPECT_THAT(usage, HasSubstr("--out-dir=DIR"));
  EXPECT_THAT(usage, HasSubstr("PROMPT"));
  EXPECT_THAT(usage, HasSubstr("text to continue"));
  EXPECT_THAT(usage, HasSubstr("-h, --help"));
  for (absl::string_view line : absl::StrSplit(usage, '\n')) {
    EXPECT_LE(line.size(), 100u) << line;
  }
}

TEST_F(FlagsTest, UsageWrapsLongHelp) {
  FlagSet f("quantkv t", "");
  std::string s;
  f.String("a-very-long-flag-name-indeed", &s, "",
           std::string(30, 'x') + " " + std::string(40, 'y') + " " + std::string(40, 'z'));
  const std::string usage = f.Usage();
  EXPECT_THAT(usage, HasSubstr("--a-very-long-flag-name-indeed=STRING\n"));
  for (absl::string_view line : absl::StrSplit(usage, '\n')) {
    EXPECT_LE(line.size(), 100u) << line;
  }
}

}  // namespace
}  // namespace quantkv::launcher
