#include "launcher/flags.h"

#include <algorithm>
#include <filesystem>
#include <system_error>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"

namespace quantkv::launcher {
namespace flags_internal {

std::string FormatDouble(double v) { return absl::StrCat(v); }

std::string DescribeRange(const std::optional<std::string>& min,
                          const std::optional<std::string>& max, bool min_exclusive,
                          bool max_exclusive) {
  if (min && max) {
    return absl::StrCat("in ", min_exclusive ? "(" : "[", *min, ", ", *max,
                        max_exclusive ? ")" : "]");
  }
  if (min) return absl::StrCat(min_exclusive ? "greater than " : "at least ", *min);
  if (max) return absl::StrCat(max_exclusive ? "less than " : "at most ", *max);
  return "";
}

bool ParseDouble(std::string_view text, double* out) {
  const char* begin = text.data();
  const char* end = text.data() + text.size();
  if (begin != end && *begin == '+') ++begin;
  if (begin == end) return false;
  double value = 0;
  const auto [ptr, ec] = std::from_chars(begin, end, value);
  if (ec != std::errc() || ptr != end || !std::isfinite(value)) return false;
  *out = value;
  return true;
}

size_t EditDistance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

}  // namespace flags_internal

namespace {

constexpr size_t kLineWidth = 100;
constexpr size_t kHelpColumn = 28;

bool ValidFlagName(std::string_view name) {
  if (name.empty() || !(absl::ascii_islower(name[0]) || absl::ascii_isdigit(name[0]))) {
    return false;
  }
  return std::all_of(name.begin(), name.end(), [](char c) {
    return absl::ascii_islower(c) || absl::ascii_isdigit(c) || c == '-';
  });
}

// Appends `left` padded to the help column followed by `text` wrapped to the line width;
// a left part too long for the column puts the text on the next line.
void AppendEntry(std::string& out, const std::string& left, const std::string& text) {
  const std::string indent(kHelpColumn, ' ');
  out += "  " + left;
  size_t column = 2 + left.size();
  if (text.empty()) {
    out += "\n";
    return;
  }
  if (column + 2 > kHelpColumn) {
    out += "\n" + indent;
  } else {
    out.append(kHelpColumn - column, ' ');
  }
  column = kHelpColumn;
  bool first = true;
  for (absl::string_view word : absl::StrSplit(text, ' ', absl::SkipEmpty())) {
    if (!first && column + 1 + word.size() > kLineWidth) {
      out += "\n" + indent;
      column = kHelpColumn;
      first = true;
    }
    if (!first) {
      out += ' ';
      ++column;
    }
    out.append(word.data(), word.size());
    column += word.size();
    first = false;
  }
  out += "\n";
}

}  // namespace

FlagSet::FlagSet(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

FlagSet::Flag& FlagSet::Define(std::string_view name, std::string_view help,
                               std::string placeholder) {
  if (!ValidFlagName(name)) {
    definition_errors_.push_back(absl::StrFormat(
        "flag name '%s' must be lower-case letters, digits and '-', starting with a letter or "
        "digit",
        name));
  } else if (name == "help" || name == "h" || Find(name) != nullptr) {
    definition_errors_.push_back(absl::StrFormat("flag --%s is defined twice", name));
  }
  auto flag = std::make_unique<Flag>();
  flag->name_ = std::string(name);
  flag->help_ = std::string(help);
  flag->placeholder_ = std::move(placeholder);
  flags_.push_back(std::move(flag));
  return *flags_.back();
}

FlagSet::Flag& FlagSet::Bool(std::string_view name, bool* dst, std::string_view help) {
  Flag& flag = Define(name, help, "");
  flag.is_bool_ = true;
  *dst = false;
  flag.parse_ = [dst](std::string_view text) -> absl::Status {
    if (text == "true" || text == "1") {
      *dst = true;
    } else if (text == "false" || text == "0") {
      *dst = false;
    } else {
      return absl::InvalidArgumentError(
          absl::StrFormat("'%s' is not a boolean; allowed: true|false|1|0", text));
    }
    return absl::OkStatus();
  };
  return flag;
}

FlagSet::Flag& FlagSet::String(std::string_view name, std::string* dst, std::string default_value,
                               std::string_view help, StringValidator validate) {
  Flag& flag = Define(name, help, "STRING");
  flag.default_text_ = default_value;
  *dst = std::move(default_value);
  flag.parse_ = [dst, validate = std::move(validate)](std::string_view text) -> absl::Status {
    if (validate) {
      absl::Status status = validate(text);
      if (!status.ok()) return status;
    }
    *dst = std::string(text);
    return absl::OkStatus();
  };
  return flag;
}

FlagSet::Flag& FlagSet::Path(std::string_view name, std::string* dst, std::string default_value,
                             std::string_view help, PathKind kind) {
  Flag& flag =
      Define(name, help,
             kind == PathKind::kDirectory ? "DIR" : (kind == PathKind::kFile ? "FILE" : "PATH"));
  flag.default_text_ = default_value;
  *dst = std::move(default_value);
  flag.parse_ = [dst, kind](std::string_view text) -> absl::Status {
    if (text.empty()) return absl::InvalidArgumentError("empty path");
    std::error_code ec;
    const auto status = std::filesystem::status(std::filesystem::path(text), ec);
    if (ec || !std::filesystem::exists(status)) {
      return absl::NotFoundError(absl::StrFormat("'%s' does not exist%s", text,
                                                 ec ? absl::StrCat(" (", ec.message(), ")") : ""));
    }
    if (kind == PathKind::kFile && std::filesystem::is_directory(status)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("'%s' is a directory; expected a file", text));
    }
    if (kind == PathKind::kDirectory && !std::filesystem::is_directory(status)) {
      return absl::InvalidArgumentError(absl::StrFormat("'%s' is not a directory", text));
    }
    *dst = std::string(text);
    return absl::OkStatus();
  };
  return flag;
}

FlagSet::Flag& FlagSet::Choice(std::string_view name, std::string* dst, std::string default_value,
                               const std::vector<std::string>& choices, std::string_view help) {
  std::vector<std::pair<std::string, std::string>> pairs;
  pairs.reserve(choices.size());
  for (const std::string& c : choices) pairs.emplace_back(c, c);
  return Choice<std::string>(name, dst, std::move(default_value), std::move(pairs), help);
}

void FlagSet::Positional(std::string name, std::vector<std::string>* dst, size_t min, size_t max,
                         std::string help) {
  positional_enabled_ = true;
  positional_name_ = std::move(name);
  positional_help_ = std::move(help);
  positional_dst_ = dst;
  positional_min_ = min;
  positional_max_ = std::max(min, max);
  dst->clear();
}

FlagSet::Flag* FlagSet::Find(std::string_view name) {
  for (auto& flag : flags_) {
    if (flag->name_ == name) return flag.get();
  }
  return nullptr;
}

const FlagSet::Flag* FlagSet::Find(std::string_view name) const {
  return const_cast<FlagSet*>(this)->Find(name);
}

bool FlagSet::WasSet(std::string_view name) const {
  const Flag* flag = Find(name);
  return flag != nullptr && flag->set_;
}

std::string FlagSet::Suggest(std::string_view unknown) const {
  const Flag* best = nullptr;
  size_t best_distance = std::numeric_limits<size_t>::max();
  for (const auto& flag : flags_) {
    size_t d = flags_internal::EditDistance(unknown, flag->name_);
    // A prefix ("--max" for "--max-tokens") is as good a hint as a typo.
    if (flag->name_.starts_with(unknown) && unknown.size() >= 3) d = std::min<size_t>(d, 1);
    if (d < best_distance) {
      best_distance = d;
      best = flag.get();
    }
  }
  const size_t limit = std::max<size_t>(2, unknown.size() / 3);
  if (best == nullptr || best_distance > limit) return "";
  return absl::StrCat("; did you mean --", best->name_, "?");
}

absl::Status FlagSet::Apply(Flag& flag, std::string_view value) {
  if (flag.set_) {
    return absl::InvalidArgumentError(absl::StrFormat("--%s is given more than once", flag.name_));
  }
  absl::Status status = flag.parse_(value);
  if (!status.ok()) {
    return absl::Status(status.code(), absl::StrCat("--", flag.name_, ": ", status.message()));
  }
  flag.set_ = true;
  return absl::OkStatus();
}

absl::Status FlagSet::Parse(std::span<const std::string> args) {
  if (!definition_errors_.empty()) {
    return absl::InternalError(absl::StrCat(
        command_, ": bad flag definitions: ", absl::StrJoin(definition_errors_, "; ")));
  }
  help_requested_ = false;
  // Help wins over every other error: whoever typed it wants to read about the flags.
  for (const std::string& arg : args) {
    if (arg == "--") break;
    if (arg == "--help" || arg == "-h") {
      help_requested_ = true;
      return absl::OkStatus();
    }
  }

  std::vector<std::string> positional;
  bool flags_done = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (flags_done || arg == "-" || !absl::StartsWith(arg, "-")) {
      positional.push_back(arg);
      continue;
    }
    if (arg == "--") {
      flags_done = true;
      continue;
    }
    if (!absl::StartsWith(arg, "--")) {
      // Negative numbers only appear as flag values, which are consumed below.
      return absl::InvalidArgumentError(absl::StrFormat(
          "unknown flag '%s' (flags are spelled --name; short flags are not supported)", arg));
    }
    std::string_view body = std::string_view(arg).substr(2);
    std::optional<std::string_view> inline_value;
    if (const size_t eq = body.find('='); eq != std::string_view::npos) {
      inline_value = body.substr(eq + 1);
      body = body.substr(0, eq);
    }
    Flag* flag = Find(body);
    if (flag == nullptr && body.starts_with("no-")) {
      Flag* negated = Find(body.substr(3));
      if (negated != nullptr && negated->is_bool_) {
        if (inline_value) {
          return absl::InvalidArgumentError(
              absl::StrFormat("--%s takes no value; use --%s=%s", body, negated->name_,
                              *inline_value == "true" ? "false" : "true"));
        }
        absl::Status status = Apply(*negated, "false");
        if (!status.ok()) return status;
        continue;
      }
    }
    if (flag == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrFormat("unknown flag --%s%s", body, Suggest(body)));
    }
    if (flag->is_bool_) {
      absl::Status status = Apply(*flag, inline_value.value_or("true"));
      if (!status.ok()) return status;
      continue;
    }
    std::string_view value;
    if (inline_value) {
      value = *inline_value;
    } else if (i + 1 < args.size() && !absl::StartsWith(args[i + 1], "--")) {
      value = args[++i];
    } else {
      const std::string expects =
          flag->constraint_text_.empty()
              ? flag->placeholder_
              : absl::StrCat(flag->placeholder_, " ", flag->constraint_text_);
      return absl::InvalidArgumentError(absl::StrFormat(
          "--%s needs a value (%s)%s", flag->name_, expects,
          i + 1 < args.size() ? absl::StrFormat("; for a value starting with '--' write --%s=%s",
                                                flag->name_, args[i + 1])
                              : ""));
    }
    absl::Status status = Apply(*flag, value);
    if (!status.ok()) return status;
  }

  for (const auto& flag : flags_) {
    if (flag->required_ && !flag->set_) {
      return absl::InvalidArgumentError(
          absl::StrFormat("missing required flag --%s%s", flag->name_,
                          flag->placeholder_.empty() ? "" : absl::StrCat("=", flag->placeholder_)));
    }
  }
  if (!positional_enabled_) {
    if (!positional.empty()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "unexpected argument '%s' (this command takes only flags)", positional.front()));
    }
    return absl::OkStatus();
  }
  if (positional.size() < positional_min_) {
    return absl::InvalidArgumentError(
        absl::StrFormat("expected at least %d %s argument%s, got %d", positional_min_,
                        positional_name_, positional_min_ == 1 ? "" : "s", positional.size()));
  }
  if (positional.size() > positional_max_) {
    return absl::InvalidArgumentError(
        absl::StrFormat("expected at most %d %s argument%s, got %d (first extra: '%s')",
                        positional_max_, positional_name_, positional_max_ == 1 ? "" : "s",
                        positional.size(), positional[positional_max_]));
  }
  *positional_dst_ = std::move(positional);
  return absl::OkStatus();
}

std::string FlagSet::Usage() const {
  std::string positional_usage;
  if (positional_enabled_ && positional_max_ > 0) {
    const bool many = positional_max_ > 1;
    const std::string one = absl::StrCat(positional_name_, many ? "..." : "");
    positional_usage = positional_min_ == 0 ? absl::StrCat(" [", one, "]") : absl::StrCat(" ", one);
  }
  std::string out =
      absl::StrCat("Usage: ", command_, flags_.empty() ? "" : " [flags]", positional_usage, "\n");
  if (!summary_.empty()) absl::StrAppend(&out, "\n", summary_, "\n");
  if (positional_enabled_ && !positional_help_.empty()) {
    absl::StrAppend(&out, "\nArguments:\n");
    AppendEntry(out, positional_name_, positional_help_);
  }
  absl::StrAppend(&out, "\nFlags:\n");
  for (const auto& flag : flags_) {
    const std::string left = flag->placeholder_.empty()
                                 ? absl::StrCat("--", flag->name_)
                                 : absl::StrCat("--", flag->name_, "=", flag->placeholder_);
    std::vector<std::string> notes;
    if (!flag->constraint_text_.empty()) notes.push_back(flag->constraint_text_);
    if (flag->required_) {
      notes.push_back("required");
    } else if (!flag->default_text_.empty()) {
      notes.push_back(absl::StrCat("default: ", flag->default_text_));
    }
    std::string text = flag->help_;
    if (!notes.empty()) absl::StrAppend(&text, " (", absl::StrJoin(notes, "; "), ")");
    AppendEntry(out, left, text);
  }
  AppendEntry(out, "-h, --help", "show this help and exit");
  return out;
}

}  // namespace quantkv::launcher
