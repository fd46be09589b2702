#include "runtime/serve/service_checks.h"

#include "runtime/util/secret_file.h"

#include <algorithm>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace quantkv {
namespace {

absl::Status Field(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("GenerateRequest.", field, ": ", what));
}

absl::Status CheckText(const std::string& field, const std::string& text) {
  if (!IsValidUtf8(text)) return Field(field, "is not valid UTF-8");
  return absl::OkStatus();
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

bool IsValidUtf8(std::string_view s) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > n) return false;
    for (size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    // Overlong forms, surrogates and values past U+10FFFF are not UTF-8.
    static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

absl::StatusOr<std::string> ReadApiKeyFile(const std::string& path) {
  return ReadSecretFile(path, "the API key file");
}

absl::Status CheckBearer(std::optional<std::string_view> authorization,
                         const std::string& api_key) {
  if (!authorization) {
    return absl::UnauthenticatedError("missing 'authorization: Bearer <key>' metadata");
  }
  constexpr std::string_view kPrefix = "Bearer ";
  if (authorization->substr(0, kPrefix.size()) != kPrefix ||
      !ConstantTimeEquals(authorization->substr(kPrefix.size()), api_key)) {
    return absl::UnauthenticatedError("invalid API key");
  }
  return absl::OkStatus();
}

absl::Status ValidateGenerateRequest(const v1::GenerateRequest& r, const RequestLimits& limits) {
  switch (r.prompt_case()) {
    case v1::GenerateRequest::PROMPT_NOT_SET:
      return Field("prompt", "one of text, tokens or chat is required");
    case v1::GenerateRequest::kText:
      if (r.text().empty()) return Field("text", "the prompt is empty");
      if (absl::Status s = CheckText("text", r.text()); !s.ok()) return s;
      break;
    case v1::GenerateRequest::kTokens:
      if (r.tokens().ids().empty()) return Field("tokens", "the prompt is empty");
      for (int i = 0; i < r.tokens().ids_size(); ++i) {
        const int32_t id = r.tokens().ids(i);
        if (id < 0 || id >= limits.vocab_size) {
          return Field(
              absl::StrFormat("tokens.ids[%d]", i),
              absl::StrFormat("token id %d outside the vocabulary [0, %d)", id, limits.vocab_size));
        }
      }
      break;
    case v1::GenerateRequest::kChat:
      if (r.chat().messages().empty()) return Field("chat.messages", "the conversation is empty");
      for (int i = 0; i < r.chat().messages_size(); ++i) {
        const v1::ChatMessage& m = r.chat().messages(i);
        if (absl::Status s = CheckText(absl::StrFormat("chat.messages[%d].role", i), m.role());
            !s.ok()) {
          return s;
        }
        if (absl::Status s =
                CheckText(absl::StrFormat("chat.messages[%d].content", i), m.content());
            !s.ok()) {
          return s;
        }
      }
      break;
  }
  if (r.max_tokens() == 0 || r.max_tokens() > limits.context_length) {
    return Field("max_tokens", absl::StrFormat("must be in [1, %d] (the context), got %d",
                                               limits.context_length, r.max_tokens()));
  }
  if (absl::Status s = ValidateSamplingParams(SamplingFromProto(r.sampling())); !s.ok()) {
    return Field("sampling", std::string(s.message()));
  }
  if (r.logprobs() > kMaxTopLogprobs) {
    return Field("logprobs", absl::StrFormat("at most %d, got %d", kMaxTopLogprobs, r.logprobs()));
  }
  for (int i = 0; i < r.stop_size(); ++i) {
    if (r.stop(i).empty()) return Field(absl::StrFormat("stop[%d]", i), "empty stop string");
    if (absl::Status s = CheckText(absl::StrFormat("stop[%d]", i), r.stop(i)); !s.ok()) return s;
  }
  for (int i = 0; i < r.stop_token_ids_size(); ++i) {
    const int32_t id = r.stop_token_ids(i);
    if (id < 0 || id >= limits.vocab_size) {
      return Field(absl::StrFormat("stop_token_ids[%d]", i),
                   absl::StrFormat("token id %d outside the vocabulary", id));
    }
  }
  if (!r.kv_preset().empty() && std::find(limits.kv_presets.begin(), limits.kv_presets.end(),
                                          r.kv_preset()) == limits.kv_presets.end()) {
    return Field("kv_preset", absl::StrFormat("'%s' is not served here; allowed: %s", r.kv_preset(),
                                              absl::StrJoin(limits.kv_presets, ", ")));
  }
  return absl::OkStatus();
}

absl::Status CheckPromptLength(int64_t prompt_tokens, int64_t max_tokens,
                               const RequestLimits& limits) {
  if (prompt_tokens == 0) return Field("prompt", "encodes to no tokens");
  if (prompt_tokens + max_tokens > limits.context_length) {
    return Field("prompt", absl::StrFormat("%d prompt tokens + max_tokens %d exceed the context "
                                           "of %d tokens",
                                           prompt_tokens, max_tokens, limits.context_length));
  }
  return absl::OkStatus();
}

SamplingParams SamplingFromProto(const v1::SamplingParams& p) {
  SamplingParams s;
  s.temperature = p.temperature();
  s.top_k = p.top_k();
  s.top_p = p.has_top_p() ? p.top_p() : 1.0f;
  s.min_p = p.min_p();
  s.repetition_penalty = p.has_repetition_penalty() ? p.repetition_penalty() : 1.0f;
  s.frequency_penalty = p.frequency_penalty();
  s.presence_penalty = p.presence_penalty();
  s.seed = p.seed();
  return s;
}

}  // namespace quantkv
