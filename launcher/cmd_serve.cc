// `quantkv serve`: the gRPC generation server (proto/quantkv/v1/generation.proto) over one
// engine with continuous batching. SIGINT/SIGTERM stop it: new calls are refused, streams
// in flight end with FINISH_REASON_ABORT, and the process exits.
#include <signal.h>

#include <cstdint>
#include <fstream>
#include <limits>
#include <sstream>

#include "absl/strings/str_format.h"
#include "launcher/commands.h"
#include "launcher/read_file.h"
#include "launcher/model_session.h"
#include "runtime/serve/engine_loop.h"
#include "runtime/serve/generation_server.h"
#include "runtime/serve/service_checks.h"

namespace quantkv::launcher {
namespace {

struct ServeOptions {
  ModelFlags model;
  std::string listen;
  int64_t max_running = 16;
  int64_t max_queued = 256;
  int64_t max_step_tokens = 256;
  std::string api_key_file;
  std::string tls_cert;
  std::string tls_key;
  bool prefill_gemm = false;
  bool fused_decode_attention = false;
};

void Define(FlagSet& f, ServeOptions& o) {
  DefineModelFlags(f, o.model);
  f.String("listen", &o.listen, "127.0.0.1:50051",
           "HOST:PORT to listen on (port 0: any free one); use 0.0.0.0:PORT or [::]:PORT "
           "explicitly to serve other machines")
      .Placeholder("HOST:PORT");
  f.Int<int64_t>("max-running", &o.max_running, 16, "most sequences decoding at once",
                 {.min = 1, .max = 4096});
  f.Int<int64_t>("max-queued", &o.max_queued, 256,
                 "most requests waiting; beyond it Generate answers RESOURCE_EXHAUSTED",
                 {.min = 1, .max = 1 << 20});
  f.Int<int64_t>("max-step-tokens", &o.max_step_tokens, 256,
                 "tokens per engine step, prefill chunks and decodes together (>= --max-running)",
                 {.min = 1, .max = 1 << 16});
  f.Path("api-key-file", &o.api_key_file, "",
         "require `authorization: Bearer <key>` metadata, the key being the file's first line");
  f.Path("tls-cert", &o.tls_cert, "", "PEM certificate chain: serve TLS (with --tls-key)");
  f.Path("tls-key", &o.tls_key, "", "PEM private key of --tls-cert");
  f.Bool("prefill-gemm", &o.prefill_gemm,
         "use tiled SGEMM for steps of many rows (faster prefill). Off by default because it "
         "rounds differently from the per-row decode path: greedy output then depends on what "
         "else is batched with a request and on how its prompt was chunked");
  f.Bool("fused-decode-attention", &o.fused_decode_attention,
         "use the fused decode attention kernels for steps of few query rows (faster decode "
         "at long contexts). Off by default for the same reason: they round differently from "
         "the tiled kernel, so a preempted request recomputed by prefill, or a prompt chunked "
         "differently under load, may then continue differently");
}

int Run(const ServeOptions& o, CommandContext& ctx) {
  if (o.tls_cert.empty() != o.tls_key.empty()) {
    ctx.err << ctx.command << ": --tls-cert and --tls-key go together\n";
    return kExitUsage;
  }
  if (o.max_step_tokens < o.max_running) {
    ctx.err << ctx.command << ": --max-step-tokens must be >= --max-running\n";
    return kExitUsage;
  }
  // Blocked before any thread exists, so every thread inherits the mask and the signals
  // reach only the sigwait below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  GenerationServerOptions server_options;
  server_options.listen = o.listen;
  if (!o.api_key_file.empty()) {
    auto key = ReadApiKeyFile(o.api_key_file);
    if (!key.ok()) return ReportFailure(ctx, key.status());
    server_options.api_key = *key;
  }
  if (!o.tls_cert.empty()) {
    auto cert = ReadWholeFile(o.tls_cert);
    if (!cert.ok()) return ReportFailure(ctx, cert.status());
    auto key = ReadWholeFile(o.tls_key);
    if (!key.ok()) return ReportFailure(ctx, key.status());
    server_options.tls_cert_pem = *cert;
    server_options.tls_key_pem = *key;
  }

  EngineConfig base;
  base.max_chunk_tokens = o.max_step_tokens;
  // Per-row matmuls and one attention kernel keep a request's tokens bit-identical however
  // it is batched, chunked or recomputed after preemption.
  base.gemm_min_rows =
      o.prefill_gemm ? EngineConfig{}.gemm_min_rows : std::numeric_limits<int64_t>::max();
  base.fused_decode_attention = o.fused_decode_attention;
  auto session = OpenModelSession(o.model, base);
  if (!session.ok()) return ReportFailure(ctx, session.status());
  server_options.model_path = session->path;

  EngineLoopConfig loop_config{.max_running = o.max_running,
                               .max_queued = o.max_queued,
                               .max_step_tokens = o.max_step_tokens,
                               .kv_preset = o.model.kv};
  auto loop = EngineLoop::Create(std::move(session->engine), session->tokenizer.get(), loop_config);
  if (!loop.ok()) return ReportFailure(ctx, loop.status());
  auto server = GenerationServer::Start(loop->get(), server_options);
  if (!server.ok()) return ReportFailure(ctx, server.status());

  ctx.err << absl::StrFormat(
                 "%s: listening on %s (%s, model %s, KV %s: %d tokens in blocks of %d%s%s%s)\n",
                 ctx.command, (*server)->address(), o.tls_cert.empty() ? "plaintext" : "TLS",
                 session->path, o.model.kv, (*loop)->capacity_tokens(), (*loop)->block_tokens(),
                 server_options.api_key.empty() ? "" : ", API key required",
                 o.prefill_gemm ? ", prefill GEMM" : "",
                 o.fused_decode_attention ? ", fused decode attention" : "")
          << std::flush;

  int sig = 0;
  sigwait(&stop_signals, &sig);
  ctx.err << ctx.command << ": " << (sig == SIGINT ? "SIGINT" : "SIGTERM") << ", shutting down\n"
          << std::flush;
  (*server)->Shutdown(absl::Seconds(5));
  (*loop)->Shutdown();
  pthread_sigmask(SIG_UNBLOCK, &stop_signals, nullptr);
  return kExitOk;
}

}  // namespace

Subcommand ServeSubcommand() {
  return MakeSubcommand<ServeOptions>(
      "serve", "serve the model over gRPC (quantkv.v1.Generation) with continuous batching", Define,
      Run);
}

}  // namespace quantkv::launcher
