#include "launcher/progress.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace quantkv::launcher {
namespace {

bool StderrIsTerminal() {
  if (!::isatty(STDERR_FILENO)) return false;
  const char* term = std::getenv("TERM");
  return term == nullptr || std::strcmp(term, "dumb") != 0;
}

int TerminalWidth() {
  int columns = 0;
  if (const char* env = std::getenv("COLUMNS");
      env && absl::SimpleAtoi(env, &columns) && columns > 0) {
    return columns;
  }
  struct winsize ws {};
  if (::ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  return 80;
}

// "0:42", "12:05", "1:02:03".
std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--";
  const int64_t s = static_cast<int64_t>(std::llround(seconds));
  if (s >= 3600) return absl::StrFormat("%d:%02d:%02d", s / 3600, (s / 60) % 60, s % 60);
  return absl::StrFormat("%d:%02d", s / 60, s % 60);
}

std::string FormatRate(double rate) {
  if (rate >= 100) return absl::StrFormat("%.0f", rate);
  if (rate >= 10) return absl::StrFormat("%.1f", rate);
  return absl::StrFormat("%.2f", rate);
}

}  // namespace

ProgressReporter::ProgressReporter(Options options, std::ostream* out, Clock clock)
    : options_(std::move(options)), out_(out), clock_(std::move(clock)) {
  if (!clock_) {
    clock_ = [] {
      return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
          .count();
    };
  }
  terminal_ = options_.terminal.value_or(out_ == &std::cerr && StderrIsTerminal());
  width_ = options_.width > 0 ? options_.width : (terminal_ ? TerminalWidth() : 80);
  options_.line_percent_step = std::clamp(options_.line_percent_step, 1, 100);
  start_ = clock_();
  last_line_ = start_;
}

ProgressReporter::~ProgressReporter() { Finish(); }

double ProgressReporter::Now() const { return clock_(); }

std::string ProgressReporter::Status(double now) const {
  const double elapsed = now - start_;
  const double rate = elapsed > 0 ? static_cast<double>(done_) / elapsed : 0;
  const std::string rate_text = elapsed > 0 && done_ > 0
                                    ? absl::StrCat(FormatRate(rate), " ", options_.unit, "/s")
                                    : absl::StrCat("- ", options_.unit, "/s");
  if (options_.total <= 0) {
    return absl::StrCat(done_, " ", options_.unit, ", ", rate_text, ", elapsed ",
                        FormatDuration(elapsed));
  }
  const int64_t shown = std::min(done_, options_.total);
  const int percent = static_cast<int>(100 * shown / options_.total);
  const double eta = rate > 0 ? static_cast<double>(options_.total - shown) / rate : -1;
  return absl::StrCat(percent, "% ", shown, "/", options_.total, " ", options_.unit, ", ",
                      rate_text, ", ETA ", FormatDuration(eta));
}

void ProgressReporter::DrawBar(double now) {
  const std::string status = Status(now);
  std::string line = options_.label.empty() ? "" : absl::StrCat(options_.label, " ");
  if (options_.total > 0) {
    // The bar takes what is left of the line, within reason.
    const int room = width_ - 1 - static_cast<int>(line.size() + status.size() + 3);
    const int bar = std::clamp(room, 0, 40);
    if (bar >= 10) {
      const int64_t shown = std::min(done_, options_.total);
      const int filled = static_cast<int>(bar * shown / options_.total);
      absl::StrAppend(&line, "[", std::string(filled, '#'), std::string(bar - filled, '.'), "] ");
    }
  }
  absl::StrAppend(&line, status);
  if (static_cast<int>(line.size()) > width_ - 1) line.resize(std::max(width_ - 1, 0));
  // Carriage return and erase-to-end-of-line redraw in place without a full-screen library.
  *out_ << "\r" << line << "\x1b[K" << std::flush;
  bar_drawn_ = true;
  last_draw_ = now;
}

void ProgressReporter::PrintLine(double now) {
  *out_ << (options_.label.empty() ? "progress" : options_.label) << ": " << Status(now) << "\n"
        << std::flush;
  last_line_ = now;
}

void ProgressReporter::Update(int64_t done) {
  std::lock_guard<std::mutex> lock(mu_);
  if (finished_ || done < done_) return;
  done_ = done;
  const double now = Now();
  if (terminal_) {
    if (now - last_draw_ >= options_.redraw_interval_s) DrawBar(now);
    return;
  }
  bool due = now - last_line_ >= options_.line_interval_s;
  if (options_.total > 0) {
    const int64_t percent = 100 * std::min(done_, options_.total) / options_.total;
    const int64_t step = options_.line_percent_step;
    // The last step (100%) is left to Finish(), which says "done".
    if (percent / step > last_line_percent_ / step && percent < 100) {
      due = true;
      last_line_percent_ = percent;
    }
    if (percent >= 100) due = false;
  }
  if (due) PrintLine(now);
}

void ProgressReporter::Advance(int64_t n) {
  int64_t target;
  {
    std::lock_guard<std::mutex> lock(mu_);
    target = done_ + n;
  }
  Update(target);
}

void ProgressReporter::Message(std::string_view line) {
  std::lock_guard<std::mutex> lock(mu_);
  if (terminal_ && bar_drawn_ && !finished_) {
    *out_ << "\r\x1b[K" << line << "\n";
    DrawBar(Now());
  } else {
    *out_ << line << "\n" << std::flush;
  }
}

void ProgressReporter::Finish() {
  std::lock_guard<std::mutex> lock(mu_);
  if (finished_) return;
  finished_ = true;
  const double now = Now();
  const double elapsed = now - start_;
  const std::string rate =
      elapsed > 0 ? absl::StrCat(" (", FormatRate(static_cast<double>(done_) / elapsed), " ",
                                 options_.unit, "/s)")
                  : "";
  const std::string summary =
      absl::StrCat(options_.total > 0 && done_ < options_.total ? "stopped" : "done", ", ", done_,
                   options_.total > 0 ? absl::StrCat("/", options_.total) : "", " ", options_.unit,
                   " in ", FormatDuration(elapsed), rate);
  const std::string label = options_.label.empty() ? "progress" : options_.label;
  if (terminal_) *out_ << "\r";
  *out_ << label << ": " << summary << (terminal_ ? "\x1b[K\n" : "\n") << std::flush;
}

}  // namespace quantkv::launcher
