#include "runtime/tokenizer/chat_template.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

constexpr char kImStart[] = "<|im_start|>";
constexpr char kImEnd[] = "<|im_end|>";

// Undoes the escapes a Jinja string literal may use; false if the text holds an unescaped
// quote or a Jinja delimiter, i.e. it is not the inside of a single literal.
bool UnescapeLiteral(std::string_view body, std::string* out) {
  out->clear();
  for (size_t i = 0; i < body.size(); ++i) {
    char c = body[i];
    if (c == '\\' && i + 1 < body.size()) {
      char e = body[++i];
      switch (e) {
        case 'n':
          out->push_back('\n');
          break;
        case 't':
          out->push_back('\t');
          break;
        case 'r':
          out->push_back('\r');
          break;
        default:
          out->push_back(e);  // \\, \', \"
      }
      continue;
    }
    if (c == '\'' || c == '"' || c == '{' || c == '}') return false;
    out->push_back(c);
  }
  return true;
}

std::string Snippet(std::string_view t) {
  std::string s(t.substr(0, 80));
  return absl::StrReplaceAll(s, {{"\n", "\\n"}});
}

}  // namespace

absl::StatusOr<ChatTemplateInfo> ParseChatTemplate(const TokenizerSpec& spec) {
  const std::string& t = spec.chat_template;
  if (t.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat(spec.source, ": tokenizer.chat_template is absent or empty"));
  }
  if (t.find(kImStart) == std::string::npos || t.find(kImEnd) == std::string::npos) {
    return absl::UnimplementedError(
        absl::StrCat(spec.source,
                     ": tokenizer.chat_template is not supported: only ChatML "
                     "(<|im_start|> ... <|im_end|>) is implemented; the template begins '",
                     Snippet(t), "'"));
  }
  ChatTemplateInfo info;
  info.kind = ChatTemplateKind::kChatMl;
  // A literal "<|im_start|>system\n...<|im_end|>" is the default system prompt, inserted when
  // the conversation lacks one (SmolLM2: `if loop.first and messages[0]['role'] != 'system'`,
  // Qwen2.5: the else branch of `messages[0]['role'] == 'system'`). A block built from
  // messages[0]['content'] is not a literal and is skipped.
  const std::string system_open = absl::StrCat(kImStart, "system");
  for (size_t pos = t.find(system_open); pos != std::string::npos;
       pos = t.find(system_open, pos + 1)) {
    std::string_view rest = std::string_view(t).substr(pos + system_open.size());
    if (rest.substr(0, 1) == "\n") {
      rest.remove_prefix(1);
    } else if (rest.substr(0, 2) == "\\n") {
      rest.remove_prefix(2);
    } else {
      continue;
    }
    size_t end = rest.find(kImEnd);
    if (end == std::string_view::npos) continue;
    std::string prompt;
    if (UnescapeLiteral(rest.substr(0, end), &prompt)) {
      info.default_system_prompt = std::move(prompt);
      info.has_default_system_prompt = true;
      break;
    }
  }
  return info;
}

absl::StatusOr<std::string> ApplyChatTemplate(const TokenizerSpec& spec,
                                              std::span<const ChatMessage> messages,
                                              bool add_generation_prompt) {
  QKV_ASSIGN_OR_RETURN(ChatTemplateInfo info, ParseChatTemplate(spec));
  if (messages.empty()) {
    return absl::InvalidArgumentError(
        "ApplyChatTemplate: the conversation is empty; provide at least one message");
  }
  std::string out;
  size_t size = 64 + info.default_system_prompt.size();
  for (const ChatMessage& m : messages) size += m.role.size() + m.content.size() + 32;
  out.reserve(size);
  auto append = [&out](const std::string& role, const std::string& content) {
    absl::StrAppend(&out, kImStart, role, "\n", content, kImEnd, "\n");
  };
  if (info.has_default_system_prompt && messages.front().role != "system") {
    append("system", info.default_system_prompt);
  }
  for (const ChatMessage& m : messages) append(m.role, m.content);
  if (add_generation_prompt) absl::StrAppend(&out, kImStart, "assistant\n");
  return out;
}

}  // namespace quantkv
