// The gRPC front end's model-free checks: GenerateRequest validation names the field,
// UTF-8, bearer auth, API key files and status conversion.
#include "runtime/serve/service_checks.h"

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"

namespace quantkv {
namespace {

RequestLimits Limits() {
  return {.context_length = 8192, .vocab_size = 49152, .kv_presets = {"fp16"}};
}

v1::GenerateRequest Valid() {
  v1::GenerateRequest r;
  r.set_text("Hello");
  r.set_max_tokens(16);
  return r;
}

// The request is INVALID_ARGUMENT and the message names `field`.
void ExpectInvalid(const v1::GenerateRequest& r, const std::string& field) {
  absl::Status s = ValidateGenerateRequest(r, Limits());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(field), absl::string_view::npos) << s << " does not name " << field;
}

TEST(ServiceChecksTest, ValidRequestPasses) {
  EXPECT_TRUE(ValidateGenerateRequest(Valid(), Limits()).ok());
  v1::GenerateRequest r = Valid();
  r.set_kv_preset("fp16");
  r.add_stop("\n\n");
  r.set_logprobs(5);
  r.mutable_sampling()->set_temperature(0.7f);
  r.mutable_sampling()->set_top_p(0.9f);
  EXPECT_TRUE(ValidateGenerateRequest(r, Limits()).ok());
}

TEST(ServiceChecksTest, EachBadFieldIsNamed) {
  v1::GenerateRequest r;
  r.set_max_tokens(16);
  ExpectInvalid(r, "GenerateRequest.prompt");
  r = Valid();
  r.set_text("");
  ExpectInvalid(r, "GenerateRequest.text");
  r = Valid();
  r.set_text("bad \xff\xfe utf-8");
  ExpectInvalid(r, "GenerateRequest.text");
  r = Valid();
  r.mutable_tokens();
  ExpectInvalid(r, "GenerateRequest.tokens");
  r = Valid();
  r.mutable_tokens()->add_ids(1);
  r.mutable_tokens()->add_ids(49152);
  ExpectInvalid(r, "GenerateRequest.tokens.ids[1]");
  r = Valid();
  r.mutable_chat();
  ExpectInvalid(r, "GenerateRequest.chat.messages");
  r = Valid();
  r.set_max_tokens(0);
  ExpectInvalid(r, "GenerateRequest.max_tokens");
  r.set_max_tokens(8193);
  ExpectInvalid(r, "GenerateRequest.max_tokens");
  r = Valid();
  r.mutable_sampling()->set_temperature(-1);
  ExpectInvalid(r, "temperature");
  r = Valid();
  r.mutable_sampling()->set_top_p(0);
  ExpectInvalid(r, "top_p");
  r = Valid();
  r.mutable_sampling()->set_min_p(1.5f);
  ExpectInvalid(r, "min_p");
  r = Valid();
  r.mutable_sampling()->set_repetition_penalty(0);
  ExpectInvalid(r, "repetition_penalty");
  r = Valid();
  r.set_logprobs(21);
  ExpectInvalid(r, "GenerateRequest.logprobs");
  r = Valid();
  r.add_stop("");
  ExpectInvalid(r, "GenerateRequest.stop[0]");
  r = Valid();
  r.add_stop_token_ids(-1);
  ExpectInvalid(r, "GenerateRequest.stop_token_ids[0]");
  r = Valid();
  r.set_kv_preset("int2-comp");
  ExpectInvalid(r, "GenerateRequest.kv_preset");
  // The allowed preset is listed.
  EXPECT_NE(ValidateGenerateRequest(r, Limits()).message().find("fp16"), absl::string_view::npos);
}

TEST(ServiceChecksTest, PromptLengthAgainstContext) {
  EXPECT_TRUE(CheckPromptLength(100, 16, Limits()).ok());
  absl::Status s = CheckPromptLength(8190, 16, Limits());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("GenerateRequest.prompt"), absl::string_view::npos) << s;
  EXPECT_EQ(CheckPromptLength(0, 16, Limits()).code(), absl::StatusCode::kInvalidArgument);
}

TEST(ServiceChecksTest, SamplingDefaultsWhenUnset) {
  const SamplingParams s = SamplingFromProto(v1::SamplingParams());
  EXPECT_EQ(s.temperature, 0.0f);
  EXPECT_EQ(s.top_p, 1.0f);
  EXPECT_EQ(s.repetition_penalty, 1.0f);
  EXPECT_TRUE(ValidateSamplingParams(s).ok());
}

TEST(ServiceChecksTest, Utf8) {
  EXPECT_TRUE(IsValidUtf8(""));
  EXPECT_TRUE(IsValidUtf8("plain ascii"));
  EXPECT_TRUE(IsValidUtf8("h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80"));  // é € 😀
  EXPECT_FALSE(IsValidUtf8("\xc3"));                                       // truncated
  EXPECT_FALSE(IsValidUtf8("\xc0\xaf"));                                   // overlong '/'
  EXPECT_FALSE(IsValidUtf8("\xed\xa0\x80"));                               // surrogate
  EXPECT_FALSE(IsValidUtf8("\xf4\x90\x80\x80"));                           // > U+10FFFF
  EXPECT_FALSE(IsValidUtf8("\x80"));                                       // lone continuation
}

TEST(ServiceChecksTest, BearerAuth) {
  const std::string key = "s3cret-key";
  EXPECT_TRUE(CheckBearer("Bearer s3cret-key", key).ok());
  EXPECT_EQ(CheckBearer(std::nullopt, key).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(CheckBearer("Bearer s3cret-kez", key).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(CheckBearer("Bearer s3cret-key2", key).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(CheckBearer("Bearer ", key).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(CheckBearer("s3cret-key", key).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(CheckBearer("Basic s3cret-key", key).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(ConstantTimeEquals("abc", "abc"));
  EXPECT_FALSE(ConstantTimeEquals("abd", "abc"));
  EXPECT_FALSE(ConstantTimeEquals("ab", "abc"));
  EXPECT_FALSE(ConstantTimeEquals("abcd", "abc"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
}

TEST(ServiceChecksTest, ApiKeyFile) {
  const auto dir = std::filesystem::temp_directory_path();
  const auto good = dir / "quantkv_service_checks_key";
  const auto empty = dir / "quantkv_service_checks_empty";
  std::ofstream(good) << "  the-key \nsecond line ignored\n";
  std::ofstream(empty) << "\n";
  auto key = ReadApiKeyFile(good.string());
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(*key, "the-key");
  EXPECT_EQ(ReadApiKeyFile(empty.string()).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadApiKeyFile((dir / "quantkv_no_such_key").string()).status().code(),
            absl::StatusCode::kNotFound);
  std::filesystem::remove(good);
  std::filesystem::remove(empty);
}

TEST(ServiceChecksTest, GrpcStatusKeepsCodeAndMessage) {
  grpc::Status s = ToGrpcStatus(absl::InvalidArgumentError("GenerateRequest.x: bad"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "GenerateRequest.x: bad");
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_EQ(ToGrpcStatus(absl::ResourceExhaustedError("full")).error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
}

}  // namespace
}  // namespace quantkv
