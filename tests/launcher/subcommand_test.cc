#include "launcher/subcommand.h"

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "launcher/commands.h"

namespace quantkv::launcher {
namespace {

using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::StartsWith;

struct EchoOptions {
  int repeat = 0;
  std::string kv;
  bool upper = false;
  std::vector<std::string> words;
};

// A subcommand written the way the model subcommands are: options, flags, run.
Subcommand EchoCommand() {
  return MakeSubcommand<EchoOptions>(
      "echo", "Print the words",
      [](FlagSet& f, EchoOptions& o) {
        f.Int("repeat", &o.repeat, 1, "times to print", {.min = 1, .max = 3});
        f.Choice("kv", &o.kv, std::string("fp32"), {"fp32", "fp16"}, "a choice");
        f.Bool("upper", &o.upper, "upper-case");
        f.Positional("WORD", &o.words, 0, 10, "words to print");
      },
      [](const EchoOptions& o, CommandContext& ctx) {
        for (int i = 0; i < o.repeat; ++i) {
          for (const std::string& w : o.words) ctx.out << (o.upper ? "W:" : "w:") << w << " ";
          ctx.out << o.kv << "\n";
        }
        return kExitOk;
      });
}

Subcommand FailCommand() {
  return MakeSubcommand<int>(
      "fail", "Always fails", [](FlagSet&, int&) {},
      [](const int&, CommandContext& ctx) {
        return ReportFailure(ctx, absl::NotFoundError("model.gguf: no such file"));
      });
}

Subcommand ThrowCommand() {
  return MakeSubcommand<int>(
      "throw", "Throws", [](FlagSet&, int&) {},
      [](const int&, CommandContext&) -> int { throw std::runtime_error("boom"); });
}

struct Result {
  int code;
  std::string out;
  std::string err;
};

Result RunCli(std::vector<std::string> args,
              std::vector<Subcommand> commands = {EchoCommand(), FailCommand(), ThrowCommand()}) {
  std::ostringstream out, err;
  const int code = RunCommandLine(commands, args, out, err);
  return {code, out.str(), err.str()};
}

TEST(SubcommandTest, RunsTheCommandWithParsedOptions) {
  const Result r = RunCli({"echo", "--repeat=2", "a", "--kv", "fp16", "b"});
  EXPECT_EQ(r.code, kExitOk);
  EXPECT_EQ(r.out, "w:a w:b fp16\nw:a w:b fp16\n");
  EXPECT_THAT(r.err, IsEmpty());
}

TEST(SubcommandTest, EachRunGetsFreshOptions) {
  std::vector<Subcommand> commands = {EchoCommand()};
  std::ostringstream out1, out2, err;
  ASSERT_EQ(RunCommandLine(commands, std::vector<std::string>{"echo", "--upper", "x"}, out1, err),
            0);
  ASSERT_EQ(RunCommandLine(commands, std::vector<std::string>{"echo", "y"}, out2, err), 0);
  EXPECT_EQ(out1.str(), "W:x fp32\n");
  EXPECT_EQ(out2.str(), "w:y fp32\n");
}

TEST(SubcommandTest, NoArgumentsPrintsUsageToStderrWithExit2) {
  const Result r = RunCli({});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.out, IsEmpty());
  EXPECT_THAT(r.err, StartsWith("Usage: quantkv COMMAND"));
}

TEST(SubcommandTest, TopLevelHelpListsCommands) {
  for (const char* help : {"--help", "-h", "help"}) {
    const Result r = RunCli({help});
    EXPECT_EQ(r.code, kExitOk) << help;
    EXPECT_THAT(r.out, StartsWith("Usage: quantkv COMMAND")) << help;
    EXPECT_THAT(r.out, HasSubstr("  echo    Print the words\n")) << help;
    EXPECT_THAT(r.out, HasSubstr("  fail    Always fails\n")) << help;
    EXPECT_THAT(r.out, HasSubstr("  help    ")) << help;
    EXPECT_THAT(r.err, IsEmpty());
  }
}

TEST(SubcommandTest, Version) {
  for (const char* v : {"--version", "version"}) {
    const Result r = RunCli({v});
    EXPECT_EQ(r.code, kExitOk);
    EXPECT_EQ(r.out, absl::StrCat("quantkv ", std::string(QuantkvVersion()), "\n"));
  }
  EXPECT_EQ(QuantkvVersion(), QUANTKV_EXPECTED_VERSION);
}

TEST(SubcommandTest, CommandHelp) {
  for (std::vector<std::string> args :
       {std::vector<std::string>{"echo", "--help"}, std::vector<std::string>{"help", "echo"},
        std::vector<std::string>{"echo", "--repeat=9", "-h"}}) {
    const Result r = RunCli(args);
    EXPECT_EQ(r.code, kExitOk);
    EXPECT_THAT(r.out, StartsWith("Usage: quantkv echo [flags] [WORD...]\n\nPrint the words\n"));
    EXPECT_THAT(r.out, HasSubstr("--repeat=INT"));
    EXPECT_THAT(r.out, HasSubstr("(in [1, 3]; default: 1)"));
    EXPECT_THAT(r.err, IsEmpty());
  }
}

TEST(SubcommandTest, UnknownCommandSuggestsAndExits2) {
  Result r = RunCli({"ecko"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("quantkv: unknown command 'ecko'; did you mean 'echo'?"));
  r = RunCli({"frobnicate"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("unknown command 'frobnicate'\n"));
  r = RunCli({"help", "nope"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("unknown command 'nope'"));
}

TEST(SubcommandTest, OptionBeforeCommandExits2) {
  const Result r = RunCli({"--repeat=2", "echo"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("unknown option '--repeat=2'"));
}

TEST(SubcommandTest, FlagErrorsExit2AndNameTheFlag) {
  Result r = RunCli({"echo", "--repeat", "7"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.out, IsEmpty());
  EXPECT_THAT(r.err, HasSubstr("quantkv echo: --repeat: 7 is out of range; allowed: in [1, 3]"));
  EXPECT_THAT(r.err, HasSubstr("Run 'quantkv echo --help' for usage."));
  r = RunCli({"echo", "--kv=int4"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("--kv: 'int4' is not one of fp32|fp16"));
  r = RunCli({"echo", "--bogus"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("unknown flag --bogus"));
  r = RunCli({"fail", "extra"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("unexpected argument 'extra'"));
}

TEST(SubcommandTest, FailureExits1WithTheStatusMessage) {
  const Result r = RunCli({"fail"});
  EXPECT_EQ(r.code, kExitFailure);
  EXPECT_EQ(r.err, "quantkv fail: error: model.gguf: no such file\n");
}

TEST(SubcommandTest, ExceptionIsReportedNotFatal) {
  const Result r = RunCli({"throw"});
  EXPECT_EQ(r.code, kExitFailure);
  EXPECT_THAT(r.err, HasSubstr("quantkv throw: error: unexpected exception: boom"));
}

TEST(SubcommandTest, BrokenFlagDefinitionIsAnInternalFailure) {
  Subcommand broken = MakeSubcommand<int>(
      "broken", "",
      [](FlagSet& f, int& n) {
        f.Int("n", &n, 1, "");
        f.Int("n", &n, 2, "");
      },
      [](const int&, CommandContext&) { return kExitOk; });
  const Result r = RunCli({"broken"}, {broken});
  EXPECT_EQ(r.code, kExitFailure);
  EXPECT_THAT(r.err, HasSubstr("internal error"));
  EXPECT_THAT(r.err, HasSubstr("--n is defined twice"));
}

TEST(SubcommandTest, DuplicateRegistrationIsRejected) {
  const Result r = RunCli({"echo"}, {EchoCommand(), EchoCommand()});
  EXPECT_EQ(r.code, kExitFailure);
  EXPECT_THAT(r.err, HasSubstr("subcommand 'echo' is registered twice"));
}

// Guards every subcommand of the real binary: unique names, a summary, flags that define
// cleanly (--help parses them all) and help text that fits the terminal.
TEST(BuiltinSubcommandsTest, AllHaveWorkingHelp) {
  const std::vector<Subcommand> commands = BuiltinSubcommands();
  ASSERT_FALSE(commands.empty());
  absl::flat_hash_set<std::string> names;
  for (const Subcommand& c : commands) {
    EXPECT_TRUE(names.insert(c.name).second) << c.name;
    EXPECT_FALSE(c.summary.empty()) << c.name;
    std::ostringstream out, err;
    const int code = RunCommandLine(commands, std::vector<std::string>{c.name, "--help"}, out, err);
    EXPECT_EQ(code, kExitOk) << c.name << ": " << err.str();
    EXPECT_THAT(out.str(), StartsWith("Usage: quantkv " + c.name)) << c.name;
    for (absl::string_view line : absl::StrSplit(out.str(), '\n')) {
      EXPECT_LE(line.size(), 100u) << c.name << ": " << line;
    }
  }
  EXPECT_TRUE(names.contains("fetch-model"));
}

}  // namespace
}  // namespace quantkv::launcher
