// Chat prompt formatting from the model's tokenizer.chat_template.
//
// No Jinja engine: the template is recognised and rendered natively. Supported: ChatML
// (templates containing "<|im_start|>"), including a default system prompt that the template
// inserts when the conversation does not start with a system message (SmolLM2, Qwen2.5).
// Tool calls, multimodal content and reasoning blocks are not supported.
#pragma once

#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "runtime/tokenizer/tokenizer_spec.h"

namespace quantkv {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant", ...
  std::string content;
};

enum class ChatTemplateKind { kChatMl };

struct ChatTemplateInfo {
  ChatTemplateKind kind = ChatTemplateKind::kChatMl;
  // Inserted as a system message when the first message is not one; empty for none.
  std::string default_system_prompt;
  bool has_default_system_prompt = false;
};

// Recognises the template; an error names tokenizer.chat_template and says what is missing.
absl::StatusOr<ChatTemplateInfo> ParseChatTemplate(const TokenizerSpec& spec);

// The prompt text as HF's apply_chat_template(messages, tokenize=False,
// add_generation_prompt=...) renders it. Special tokens appear as text: encode the result with
// EncodeOptions{.parse_special = true}. An empty conversation is an error, as in HF.
absl::StatusOr<std::string> ApplyChatTemplate(const TokenizerSpec& spec,
                                              std::span<const ChatMessage> messages,
                                              bool add_generation_prompt);

}  // namespace quantkv
