// `quantkv client`: a command-line client of `quantkv serve`. `generate` streams the text to
// stdout as it arrives and the final statistics to stderr; `score`, `stats`, `info` and
// `tokenize` print their answer as one JSON object.
#include <fstream>
#include <memory>
#include <sstream>

#include "absl/strings/str_format.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "launcher/commands.h"
#include "launcher/read_file.h"
#include "quantkv/v1/generation.grpc.pb.h"
#include "runtime/serve/service_checks.h"

namespace quantkv::launcher {
namespace {

struct ClientOptions {
  std::vector<std::string> action;
  std::string server;
  std::string api_key_file;
  std::string tls_ca;
  std::string prompt;
  std::string prompt_file;
  bool chat = false;
  std::string system;
  int max_tokens = 64;
  float temperature = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
  int64_t seed = 0;
  std::string stop;
  std::string request_id;
  std::string kv_preset;
  int logprobs = 0;
  bool ignore_eos = false;
  int timeout_s = 0;
};

void Define(FlagSet& f, ClientOptions& o) {
  f.Positional("ACTION", &o.action, 1, 1, "generate | score | tokenize | stats | info");
  f.String("server", &o.server, "127.0.0.1:50051", "address of `quantkv serve`")
      .Placeholder("HOST:PORT");
  f.Path("api-key-file", &o.api_key_file, "", "send the file's first line as the bearer key");
  f.Path("tls-ca", &o.tls_ca, "", "PEM root certificates: connect with TLS");
  f.String("prompt", &o.prompt, "", "text (generate, score, tokenize; with --chat the user turn)")
      .Placeholder("TEXT");
  f.Path("prompt-file", &o.prompt_file, "",
         "read the prompt from this UTF-8 file instead of --prompt (long prompts)",
         PathKind::kFile);
  f.Bool("chat", &o.chat, "send the prompt as a chat message (the server applies the template)");
  f.String("system", &o.system, "", "system message for --chat");
  f.Int("max-tokens", &o.max_tokens, 64, "most new tokens", {.min = 1, .max = 1 << 20});
  f.Float("temperature", &o.temperature, 0.0f, "0 is greedy", {.min = 0.0, .max = 100.0});
  f.Int("top-k", &o.top_k, 0, "0: off", {.min = 0});
  f.Float("top-p", &o.top_p, 1.0f, "nucleus mass", {.min = 0.0, .max = 1.0, .min_exclusive = true});
  f.Int<int64_t>("seed", &o.seed, 0, "sampling seed", {.min = 0});
  f.String("stop", &o.stop, "", "a stop string");
  f.String("request-id", &o.request_id, "", "name the request (for Abort)");
  f.String("kv-preset", &o.kv_preset, "", "KV preset to ask for (empty: the server's)");
  f.Int("logprobs", &o.logprobs, 0, "print the top-n logprobs of each token on stderr",
        {.min = 0, .max = 20});
  f.Bool("ignore-eos", &o.ignore_eos, "keep generating past end-of-turn tokens");
  f.Int("timeout-s", &o.timeout_s, 0, "call deadline in seconds (0: none)", {.min = 0});
}

std::string ToJson(const google::protobuf::Message& m) {
  std::string json;
  google::protobuf::util::JsonPrintOptions opt;
  opt.always_print_primitive_fields = true;
  opt.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &json, opt);
  return json;
}

int Fail(CommandContext& ctx, const grpc::Status& s) {
  ctx.err << absl::StrFormat(
      "%s: error: %s: %s\n", ctx.command,
      absl::StatusCodeToString(static_cast<absl::StatusCode>(s.error_code())), s.error_message());
  return kExitFailure;
}

int Run(const ClientOptions& options, CommandContext& ctx) {
  ClientOptions o = options;
  const std::string& action = o.action[0];
  if (std::optional<int> exit = TakePromptFile(o.prompt_file, &o.prompt, ctx)) return *exit;
  std::string api_key;
  if (!o.api_key_file.empty()) {
    auto key = ReadApiKeyFile(o.api_key_file);
    if (!key.ok()) return ReportFailure(ctx, key.status());
    api_key = *key;
  }
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (o.tls_ca.empty()) {
    creds = grpc::InsecureChannelCredentials();
  } else {
    auto ca = ReadWholeFile(o.tls_ca);
    if (!ca.ok()) return ReportFailure(ctx, ca.status());
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = *ca;
    creds = grpc::SslCredentials(ssl);
  }
  auto stub = v1::Generation::NewStub(grpc::CreateChannel(o.server, creds));
  auto prepare = [&](grpc::ClientContext& c) {
    if (!api_key.empty()) c.AddMetadata("authorization", "Bearer " + api_key);
    if (o.timeout_s > 0) {
      c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(o.timeout_s));
    }
  };

  if (action == "generate") {
    if (o.prompt.empty()) {
      ctx.err << ctx.command << ": generate needs --prompt\n";
      return kExitUsage;
    }
    v1::GenerateRequest req;
    if (o.chat) {
      if (!o.system.empty()) {
        v1::ChatMessage* m = req.mutable_chat()->add_messages();
        m->set_role("system");
        m->set_content(o.system);
      }
      v1::ChatMessage* m = req.mutable_chat()->add_messages();
      m->set_role("user");
      m->set_content(o.prompt);
    } else {
      req.set_text(o.prompt);
    }
    req.set_request_id(o.request_id);
    req.set_max_tokens(o.max_tokens);
    req.mutable_sampling()->set_temperature(o.temperature);
    req.mutable_sampling()->set_top_k(o.top_k);
    req.mutable_sampling()->set_top_p(o.top_p);
    req.mutable_sampling()->set_seed(static_cast<uint64_t>(o.seed));
    if (!o.stop.empty()) req.add_stop(o.stop);
    req.set_kv_preset(o.kv_preset);
    req.set_logprobs(o.logprobs);
    req.set_ignore_eos(o.ignore_eos);
    grpc::ClientContext c;
    prepare(c);
    auto reader = stub->Generate(&c, req);
    v1::GenerateResponse resp;
    std::string stream_error;
    while (reader->Read(&resp)) {
      if (resp.has_chunk()) {
        ctx.out << resp.chunk().text() << std::flush;
        for (const v1::TokenLogprob& lp : resp.chunk().logprobs()) ctx.err << ToJson(lp) << "\n";
      } else if (resp.has_final()) {
        const v1::GenerateFinal& f = resp.final();
        ctx.out << "\n" << std::flush;
        ctx.err << absl::StrFormat(
            "[%s: prompt %d tokens, generated %d, finish %s, ttft %.1f ms, %.1f tok/s, KV %.2f "
            "bits/element, preemptions %d]\n",
            resp.request_id(), f.prompt_tokens(), f.generated_tokens(),
            v1::FinishReason_Name(f.finish_reason()), f.ttft_ms(), f.tokens_per_s(),
            f.kv_bits_per_element(), f.preemptions());
      } else if (resp.has_error()) {
        stream_error = resp.error().message();
      }
    }
    grpc::Status s = reader->Finish();
    // The server ends a stream that carried an error with that error as its status, which
    // says it with its code: print it once, from the status.
    if (!s.ok()) return Fail(ctx, s);
    if (stream_error.empty()) return kExitOk;
    ctx.err << ctx.command << ": error: " << stream_error << "\n";
    return kExitFailure;
  }
  grpc::ClientContext c;
  prepare(c);
  grpc::Status s;
  std::string json;
  if (action == "score" || action == "tokenize") {
    if (o.prompt.empty()) {
      ctx.err << ctx.command << ": " << action << " needs --prompt\n";
      return kExitUsage;
    }
    if (action == "score") {
      v1::ScoreRequest req;
      req.set_text(o.prompt);
      req.set_kv_preset(o.kv_preset);
      v1::ScoreResponse resp;
      s = stub->Score(&c, req, &resp);
      json = ToJson(resp);
    } else {
      v1::TokenizeRequest req;
      req.set_text(o.prompt);
      v1::TokenizeResponse resp;
      s = stub->Tokenize(&c, req, &resp);
      json = ToJson(resp);
    }
  } else if (action == "stats") {
    v1::StatsResponse resp;
    s = stub->Stats(&c, v1::StatsRequest(), &resp);
    json = ToJson(resp);
  } else if (action == "info") {
    v1::ModelInfoResponse resp;
    s = stub->ModelInfo(&c, v1::ModelInfoRequest(), &resp);
    json = ToJson(resp);
  } else {
    ctx.err << ctx.command << ": unknown action '" << action
            << "' (generate, score, tokenize, stats, info)\n";
    return kExitUsage;
  }
  if (!s.ok()) return Fail(ctx, s);
  ctx.out << json << "\n";
  return kExitOk;
}

}  // namespace

Subcommand ClientSubcommand() {
  return MakeSubcommand<ClientOptions>(
      "client", "talk to a `quantkv serve` server: generate, score, tokenize, stats, info", Define,
      Run);
}

}  // namespace quantkv::launcher
