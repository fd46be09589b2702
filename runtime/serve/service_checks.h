// Request checks of the gRPC front end that need no model: field validation of a
// GenerateRequest, UTF-8, bearer-token auth, and absl -> grpc status conversion. Kept apart
// from the service so they are unit-tested without loading weights.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/support/status.h"
#include "quantkv/v1/generation.pb.h"
#include "runtime/engine/sampler.h"
#include "runtime/util/constant_time.h"

namespace quantkv {

// Largest request message the server accepts; longer prompts are refused by gRPC itself
// with RESOURCE_EXHAUSTED before any parsing.
inline constexpr int kMaxRequestBytes = 4 << 20;
inline constexpr uint32_t kMaxTopLogprobs = 20;

// Same code and message.
grpc::Status ToGrpcStatus(const absl::Status& status);

bool IsValidUtf8(std::string_view text);

// ConstantTimeEquals: runtime/util/constant_time.h.

// The key of an --api-key-file: its first line, surrounding whitespace removed. An empty key
// is an error (it would make every request pass).
absl::StatusOr<std::string> ReadApiKeyFile(const std::string& path);

// `authorization` is the metadata value (nullopt when absent). OK when it is
// "Bearer <api_key>"; UNAUTHENTICATED otherwise.
absl::Status CheckBearer(std::optional<std::string_view> authorization, const std::string& api_key);

// What a GenerateRequest is checked against before tokenization.
struct RequestLimits {
  int64_t context_length = 0;
  int32_t vocab_size = 0;
  std::vector<std::string> kv_presets;  // the presets this server runs (first: default)
};

// INVALID_ARGUMENT naming the field ("GenerateRequest.max_tokens: ...") for: no or empty
// prompt, invalid UTF-8 in text, chat or stop strings, out-of-range token ids, max_tokens 0
// or over the context, bad sampling values, too many logprobs, an unknown kv_preset.
absl::Status ValidateGenerateRequest(const v1::GenerateRequest& request,
                                     const RequestLimits& limits);

// After tokenization: the prompt must be non-empty and leave room for max_tokens.
absl::Status CheckPromptLength(int64_t prompt_tokens, int64_t max_tokens,
                               const RequestLimits& limits);

// Proto -> runtime sampling parameters (unset top_p and repetition_penalty mean 1).
SamplingParams SamplingFromProto(const v1::SamplingParams& p);

}  // namespace quantkv
