// Progress of a long run (perplexity over a text, a benchmark, a calibration pass).
//
// On a terminal the reporter redraws one status line in place -- a bar, percent, count, rate and
// ETA -- at most every `redraw_interval_s`. Anywhere else (CI logs, `2> file`) it writes plain
// lines instead, one each time another `line_percent_step` percent is done or `line_interval_s`
// has passed, so logs stay short and readable. Time and the output stream are injected so tests
// can drive both modes deterministically.
#pragma once

#include <cstdint>
#include <functional>
#include <iostream>
#include <mutex>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>

namespace quantkv::launcher {

class ProgressReporter {
 public:
  struct Options {
    std::string label;        // what is being done, e.g. "perplexity"
    int64_t total = 0;        // units of work in all; 0 when unknown (no percent, no ETA)
    std::string unit = "it";  // e.g. "tok", "chunk"
    // Redrawn bar (true) or plain lines (false); unset: whether `out` is std::cerr and stderr is
    // a terminal whose TERM is not "dumb".
    std::optional<bool> terminal;
    double redraw_interval_s = 0.1;
    double line_interval_s = 5.0;
    int line_percent_step = 10;
    int width = 0;  // columns of the terminal line; 0: ask the terminal ($COLUMNS, ioctl), or 80
  };
  // Seconds on a monotonic clock.
  using Clock = std::function<double()>;

  // `out` must outlive the reporter; an empty `clock` means std::chrono::steady_clock.
  explicit ProgressReporter(Options options, std::ostream* out = &std::cerr, Clock clock = {});
  // Finishes the display (a final line), so later output does not land on the bar.
  ~ProgressReporter();
  ProgressReporter(const ProgressReporter&) = delete;
  ProgressReporter& operator=(const ProgressReporter&) = delete;

  // Sets the units done so far (monotonic; a smaller value is ignored). Thread-safe.
  void Update(int64_t done);
  void Advance(int64_t n = 1);
  // Prints a whole line without tearing the bar: above it on a terminal, in order in a log.
  void Message(std::string_view line);
  // Prints the final state ("done, N unit in T (R unit/s)"); later calls do nothing.
  void Finish();

  bool terminal() const { return terminal_; }

 private:
  double Now() const;
  // The status text after the label, e.g. "45% 450/1000 tok, 123 tok/s, ETA 0:04".
  std::string Status(double now) const;
  void DrawBar(double now);
  void PrintLine(double now);

  Options options_;
  std::ostream* out_;
  Clock clock_;
  bool terminal_;
  int width_;
  std::mutex mu_;
  double start_;
  int64_t done_ = 0;
  bool finished_ = false;
  bool bar_drawn_ = false;
  double last_draw_ = -1e300;
  double last_line_ = 0;
  int64_t last_line_percent_ = 0;
};

}  // namespace quantkv::launcher
