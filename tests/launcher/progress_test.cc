#include "launcher/progress.h"

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace quantkv::launcher {
namespace {

using ::testing::ElementsAre;
using ::testing::EndsWith;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

std::vector<std::string> Lines(const std::string& text) {
  return absl::StrSplit(text, '\n', absl::SkipEmpty());
}

struct FakeClock {
  double now = 100.0;  // not zero, to catch elapsed times measured from the epoch
  ProgressReporter::Clock fn() {
    return [this] { return now; };
  }
};

ProgressReporter::Options PlainOptions(int64_t total) {
  ProgressReporter::Options o;
  o.label = "perplexity";
  o.total = total;
  o.unit = "tok";
  o.terminal = false;
  return o;
}

TEST(ProgressTest, PlainLinesEveryTenPercent) {
  FakeClock clock;
  std::ostringstream out;
  ProgressReporter p(PlainOptions(100), &out, clock.fn());
  EXPECT_FALSE(p.terminal());
  clock.now += 1;
  p.Update(5);
  EXPECT_EQ(out.str(), "");
  clock.now += 1;
  p.Update(10);
  EXPECT_EQ(out.str(), "perplexity: 10% 10/100 tok, 5.00 tok/s, ETA 0:18\n");
  clock.now += 1;
  p.Update(35);  // crosses 20% and 30%: one line, not two
  p.Update(20);  // going backwards is ignored
  p.Update(39);
  clock.now += 1;
  p.Advance(1);   // 40%
  p.Update(100);  // the 100% line is Finish()'s
  clock.now += 1;
  p.Finish();
  p.Finish();  // idempotent
  EXPECT_THAT(Lines(out.str()), ElementsAre("perplexity: 10% 10/100 tok, 5.00 tok/s, ETA 0:18",
                                            "perplexity: 35% 35/100 tok, 11.7 tok/s, ETA 0:06",
                                            "perplexity: 40% 40/100 tok, 10.0 tok/s, ETA 0:06",
                                            "perplexity: done, 100/100 tok in 0:05 (20.0 tok/s)"));
  EXPECT_THAT(out.str(), Not(HasSubstr("\r")));
  EXPECT_THAT(out.str(), Not(HasSubstr("\x1b")));
}

TEST(ProgressTest, PlainLineAfterIntervalWithoutPercentStep) {
  FakeClock clock;
  std::ostringstream out;
  auto options = PlainOptions(1000);
  options.line_interval_s = 5;
  ProgressReporter p(options, &out, clock.fn());
  clock.now += 4.9;
  p.Update(1);
  EXPECT_EQ(out.str(), "");
  clock.now += 0.2;
  p.Update(2);
  EXPECT_EQ(out.str(), "perplexity: 0% 2/1000 tok, 0.39 tok/s, ETA 42:25\n");
  clock.now += 1;
  p.Update(3);  // the interval restarts at the last line
  EXPECT_EQ(Lines(out.str()).size(), 1u);
}

TEST(ProgressTest, UnknownTotalShowsCountAndRate) {
  FakeClock clock;
  std::ostringstream out;
  auto options = PlainOptions(0);
  options.unit = "chunk";
  {
    ProgressReporter p(options, &out, clock.fn());
    clock.now += 6;
    p.Update(12);
    clock.now += 2;
    p.Advance(4);  // destructor finishes
  }
  EXPECT_THAT(Lines(out.str()), ElementsAre("perplexity: 12 chunk, 2.00 chunk/s, elapsed 0:06",
                                            "perplexity: done, 16 chunk in 0:08 (2.00 chunk/s)"));
}

TEST(ProgressTest, StoppedEarlySaysSo) {
  FakeClock clock;
  std::ostringstream out;
  auto options = PlainOptions(10);
  options.label = "";
  ProgressReporter p(options, &out, clock.fn());
  clock.now += 3600 + 62;
  p.Update(4);
  p.Finish();
  EXPECT_EQ(Lines(out.str()).back(), "progress: stopped, 4/10 tok in 1:01:02 (0.00 tok/s)");
}

TEST(ProgressTest, TerminalRedrawsInPlaceAtLimitedRate) {
  FakeClock clock;
  std::ostringstream out;
  ProgressReporter::Options options;
  options.label = "bench";
  options.total = 200;
  options.unit = "tok";
  options.terminal = true;
  options.width = 80;
  options.redraw_interval_s = 0.1;
  ProgressReporter p(options, &out, clock.fn());
  EXPECT_TRUE(p.terminal());
  clock.now += 1;
  p.Update(50);
  const std::string first = out.str();
  EXPECT_THAT(first, StartsWith("\rbench ["));
  EXPECT_THAT(first, HasSubstr("] 25% 50/200 tok, 50.0 tok/s, ETA 0:03"));
  EXPECT_THAT(first, EndsWith("\x1b[K"));
  EXPECT_THAT(first, Not(HasSubstr("\n")));
  // A quarter of the bar is filled.
  const size_t open = first.find('[');
  const size_t close = first.find(']');
  const std::string bar = first.substr(open + 1, close - open - 1);
  EXPECT_GE(bar.size(), 10u);
  EXPECT_EQ(std::count(bar.begin(), bar.end(), '#'), static_cast<long>(bar.size() / 4));
  EXPECT_LE(first.size() - 4, 79u);  // "\r" and "\x1b[K" take no columns

  clock.now += 0.05;
  p.Update(60);  // within the redraw interval: nothing
  EXPECT_EQ(out.str(), first);
  clock.now += 0.06;
  p.Update(70);
  EXPECT_GT(out.str().size(), first.size());
  EXPECT_THAT(out.str().substr(first.size()), HasSubstr("35% 70/200"));

  p.Message("layer 3 done");
  EXPECT_THAT(out.str(), HasSubstr("\r\x1b[Klayer 3 done\n\rbench ["));

  clock.now += 1;
  p.Update(200);
  p.Finish();
  EXPECT_THAT(out.str(), EndsWith("\rbench: done, 200/200 tok in 0:02 (94.8 tok/s)\x1b[K\n"));
}

TEST(ProgressTest, NarrowTerminalDropsTheBarButKeepsNumbers) {
  FakeClock clock;
  std::ostringstream out;
  ProgressReporter::Options options;
  options.label = "x";
  options.total = 10;
  options.terminal = true;
  options.width = 40;
  ProgressReporter p(options, &out, clock.fn());
  clock.now += 1;
  p.Update(5);
  EXPECT_EQ(out.str(), "\rx 50% 5/10 it, 5.00 it/s, ETA 0:01\x1b[K");
}

TEST(ProgressTest, MessageInPlainModeIsJustALine) {
  FakeClock clock;
  std::ostringstream out;
  ProgressReporter p(PlainOptions(10), &out, clock.fn());
  p.Message("hello");
  EXPECT_EQ(out.str(), "hello\n");
}

TEST(ProgressTest, DefaultIsPlainForNonStderrStreams) {
  std::ostringstream out;
  ProgressReporter::Options options;
  options.total = 1;
  ProgressReporter p(options, &out);
  EXPECT_FALSE(p.terminal());
}

}  // namespace
}  // namespace quantkv::launcher
