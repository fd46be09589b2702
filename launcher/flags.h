// Typed command-line flags for one subcommand.
//
// Each subcommand owns a FlagSet instead of sharing process-wide flag globals, so `generate` and
// `perplexity` can both have a `--model` with different help and defaults, and a flag of one
// subcommand is an error when given to another. A flag is bound to a variable that receives the
// default at definition time and the parsed value in Parse():
//
//   FlagSet flags("quantkv generate", "Generate text from a prompt.");
//   flags.Int("max-tokens", &opt.max_tokens, 64, "new tokens to generate", {.min = 1, .max =
//   4096}); flags.Choice("kv", &opt.kv, std::string("fp32"), {"fp32", "fp16"}, "KV cache format");
//   flags.Bool("json", &opt.json, "print one JSON object instead of text");
//   QKV_RETURN_IF_ERROR(flags.Parse(args));
//
// Accepted forms: `--name value`, `--name=value`, `--flag` / `--no-flag` / `--flag=false` for
// booleans, `-h` / `--help`, and `--` to end the flags. A value that itself starts with `--` must
// use the `=` form, so that `--model --json` reports the missing value instead of loading a model
// named "--json".
#pragma once

#include <charconv>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace quantkv::launcher {

// Inclusive bounds of an integer flag; an empty side is unbounded.
template <typename T>
struct IntRange {
  std::optional<T> min = std::nullopt;
  std::optional<T> max = std::nullopt;
};

// Bounds of a floating-point flag; either side may be open, e.g. top-p in (0, 1].
struct FloatRange {
  std::optional<double> min = std::nullopt;
  std::optional<double> max = std::nullopt;
  bool min_exclusive = false;
  bool max_exclusive = false;
};

// What a path flag must name. Checked when the flag is given, not for the default, which
// the subcommand validates when it opens the file.
enum class PathKind { kAny, kFile, kDirectory };

// Checks a string flag's value; the message of a non-OK status is shown after the flag name.
using StringValidator = std::function<absl::Status(std::string_view value)>;

class FlagSet {
 public:
  // A defined flag; the modifiers refine how it is parsed and documented.
  class Flag {
   public:
    // Parse() fails unless the flag is given.
    Flag& Required() {
      required_ = true;
      return *this;
    }
    // The value's name in --help, e.g. "PATH|NAME" for `--model=PATH|NAME`.
    Flag& Placeholder(std::string placeholder) {
      placeholder_ = std::move(placeholder);
      return *this;
    }
    const std::string& name() const { return name_; }

   private:
    friend class FlagSet;
    std::string name_;
    std::string help_;
    std::string placeholder_;
    std::string default_text_;     // empty: not shown
    std::string constraint_text_;  // e.g. "in [1, 4096]"; empty: none
    bool is_bool_ = false;
    bool required_ = false;
    bool set_ = false;
    // Parses and stores a value; the message of an error does not repeat the flag name.
    std::function<absl::Status(std::string_view)> parse_;
  };

  // `command` is the usage prefix ("quantkv generate"); `summary` is shown under the usage line.
  FlagSet(std::string command, std::string summary);
  FlagSet(const FlagSet&) = delete;
  FlagSet& operator=(const FlagSet&) = delete;

  template <typename T>
  requires std::integral<T> &&
      (!std::same_as<T, bool>)Flag& Int(std::string_view name, T* dst, T default_value,
                                        std::string_view help, IntRange<T> range = {});

  template <typename T>
  requires std::floating_point<T> Flag& Float(std::string_view name, T* dst, T default_value,
                                              std::string_view help, FloatRange range = {});

  // A boolean switch, false unless given.
  Flag& Bool(std::string_view name, bool* dst, std::string_view help);

  Flag& String(std::string_view name, std::string* dst, std::string default_value,
               std::string_view help, StringValidator validate = nullptr);

  // A value that must name an existing file system entry of `kind`.
  Flag& Path(std::string_view name, std::string* dst, std::string default_value,
             std::string_view help, PathKind kind = PathKind::kFile);

  // One of a fixed set of spellings, each mapped to a value (an enum, or the string itself).
  template <typename T>
  Flag& Choice(std::string_view name, T* dst, T default_value,
               std::vector<std::pair<std::string, T>> choices, std::string_view help);
  Flag& Choice(std::string_view name, std::string* dst, std::string default_value,
               const std::vector<std::string>& choices, std::string_view help);

  // Accepts arguments that are not flags, between `min` and `max` of them; without this call
  // any such argument is an error. `name` is how --help shows them (e.g. "PROMPT").
  void Positional(std::string name, std::vector<std::string>* dst, size_t min = 0,
                  size_t max = std::numeric_limits<size_t>::max(), std::string help = "");

  // Parses `args` (everything after the subcommand's name). On error the message names the flag
  // and what it accepts; the bound variables may then be partly assigned and should not be used.
  absl::Status Parse(std::span<const std::string> args);

  // True when Parse() saw -h or --help; the caller prints Usage() and nothing else is checked.
  bool help_requested() const { return help_requested_; }
  // Whether the flag was given on the command line (as opposed to keeping its default).
  bool WasSet(std::string_view name) const;

  // Usage line, summary, and one entry per flag with its constraints and default.
  std::string Usage() const;

  const std::string& command() const { return command_; }

 private:
  Flag& Define(std::string_view name, std::string_view help, std::string placeholder);
  Flag* Find(std::string_view name);
  const Flag* Find(std::string_view name) const;
  absl::Status Apply(Flag& flag, std::string_view value);
  std::string Suggest(std::string_view unknown) const;

  std::string command_;
  std::string summary_;
  std::vector<std::unique_ptr<Flag>> flags_;
  // A flag defined twice or with a malformed name is a programming error in the subcommand;
  // it is kept here and reported by Parse(), so `--help` tests catch it.
  std::vector<std::string> definition_errors_;
  bool help_requested_ = false;

  bool positional_enabled_ = false;
  std::string positional_name_;
  std::string positional_help_;
  std::vector<std::string>* positional_dst_ = nullptr;
  size_t positional_min_ = 0;
  size_t positional_max_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Template definitions.

namespace flags_internal {

// A double printed as the user would type it (1, 0.5, 1e-06), without trailing zeros.
std::string FormatDouble(double v);
// "in [1, 4096]", "at least 1", "in (0, 1]", or "" for an unbounded range.
std::string DescribeRange(const std::optional<std::string>& min,
                          const std::optional<std::string>& max, bool min_exclusive,
                          bool max_exclusive);
// Parses a finite double with nothing before or after it.
bool ParseDouble(std::string_view text, double* out);
// Levenshtein distance (insertions, deletions, substitutions), for "did you mean" hints.
size_t EditDistance(std::string_view a, std::string_view b);

}  // namespace flags_internal

template <typename T>
requires std::integral<T> &&
    (!std::same_as<T, bool>)FlagSet::Flag& FlagSet::Int(std::string_view name, T* dst,
                                                        T default_value, std::string_view help,
                                                        IntRange<T> range) {
  Flag& flag = Define(name, help, "INT");
  *dst = default_value;
  flag.default_text_ = absl::StrCat(default_value);
  std::optional<std::string> lo, hi;
  if (range.min) lo = absl::StrCat(*range.min);
  if (range.max) hi = absl::StrCat(*range.max);
  flag.constraint_text_ = flags_internal::DescribeRange(lo, hi, false, false);
  if ((range.min && default_value < *range.min) || (range.max && default_value > *range.max)) {
    definition_errors_.push_back(absl::StrFormat("default %d of --%s is not %s", default_value,
                                                 flag.name(), flag.constraint_text_));
  }
  const std::string constraint = flag.constraint_text_;
  flag.parse_ = [dst, range, constraint](std::string_view text) -> absl::Status {
    const std::string allowed = constraint.empty() ? "" : absl::StrCat("; allowed: ", constraint);
    T value{};
    const char* begin = text.data();
    const char* end = text.data() + text.size();
    // from_chars rejects a leading '+', which users do type.
    if (begin != end && *begin == '+') ++begin;
    const auto [ptr, ec] = std::from_chars(begin, end, value);
    if (ec == std::errc::result_out_of_range) {
      return absl::InvalidArgumentError(
          absl::StrFormat("'%s' does not fit in a %d-bit %s integer%s", text, sizeof(T) * 8,
                          std::is_signed_v<T> ? "signed" : "unsigned", allowed));
    }
    if (text.empty() || ec != std::errc() || ptr != end) {
      return absl::InvalidArgumentError(absl::StrFormat("'%s' is not an integer%s", text, allowed));
    }
    if ((range.min && value < *range.min) || (range.max && value > *range.max)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s is out of range; allowed: %s", text, constraint));
    }
    *dst = value;
    return absl::OkStatus();
  };
  return flag;
}

template <typename T>
requires std::floating_point<T> FlagSet::Flag& FlagSet::Float(std::string_view name, T* dst,
                                                              T default_value,
                                                              std::string_view help,
                                                              FloatRange range) {
  Flag& flag = Define(name, help, "FLOAT");
  *dst = default_value;
  flag.default_text_ = flags_internal::FormatDouble(static_cast<double>(default_value));
  std::optional<std::string> lo, hi;
  if (range.min) lo = flags_internal::FormatDouble(*range.min);
  if (range.max) hi = flags_internal::FormatDouble(*range.max);
  flag.constraint_text_ =
      flags_internal::DescribeRange(lo, hi, range.min_exclusive, range.max_exclusive);
  const double d = static_cast<double>(default_value);
  if ((range.min && (range.min_exclusive ? d <= *range.min : d < *range.min)) ||
      (range.max && (range.max_exclusive ? d >= *range.max : d > *range.max))) {
    definition_errors_.push_back(absl::StrFormat("default %s of --%s is not %s", flag.default_text_,
                                                 flag.name(), flag.constraint_text_));
  }
  const std::string constraint = flag.constraint_text_;
  flag.parse_ = [dst, range, constraint](std::string_view text) -> absl::Status {
    const std::string allowed = constraint.empty() ? "" : absl::StrCat("; allowed: ", constraint);
    double value = 0;
    if (!flags_internal::ParseDouble(text, &value)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("'%s' is not a finite number%s", text, allowed));
    }
    if (std::abs(value) > static_cast<double>(std::numeric_limits<T>::max())) {
      return absl::InvalidArgumentError(
          absl::StrFormat("'%s' does not fit in a %d-bit float%s", text, sizeof(T) * 8, allowed));
    }
    const bool below =
        range.min && (range.min_exclusive ? value <= *range.min : value < *range.min);
    const bool above =
        range.max && (range.max_exclusive ? value >= *range.max : value > *range.max);
    if (below || above) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s is out of range; allowed: %s", text, constraint));
    }
    *dst = static_cast<T>(value);
    return absl::OkStatus();
  };
  return flag;
}

template <typename T>
FlagSet::Flag& FlagSet::Choice(std::string_view name, T* dst, T default_value,
                               std::vector<std::pair<std::string, T>> choices,
                               std::string_view help) {
  std::vector<std::string> spellings;
  spellings.reserve(choices.size());
  for (const auto& [spelling, value] : choices) spellings.push_back(spelling);
  Flag& flag = Define(name, help, absl::StrJoin(spellings, "|"));
  *dst = default_value;
  for (const auto& [spelling, value] : choices) {
    if (value == default_value) {
      flag.default_text_ = spelling;
      break;
    }
  }
  if (flag.default_text_.empty()) {
    definition_errors_.push_back(
        absl::StrFormat("the default of --%s is none of its choices", flag.name()));
  }
  flag.parse_ = [dst, choices = std::move(choices),
                 spellings = std::move(spellings)](std::string_view text) -> absl::Status {
    for (const auto& [spelling, value] : choices) {
      if (spelling == text) {
        *dst = value;
        return absl::OkStatus();
      }
    }
    return absl::InvalidArgumentError(
        absl::StrFormat("'%s' is not one of %s", text, absl::StrJoin(spellings, "|")));
  };
  return flag;
}

}  // namespace quantkv::launcher
