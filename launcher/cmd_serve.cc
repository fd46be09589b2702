// `quantkv serve`: the gRPC generation server (proto/quantkv/v1/generation.proto) over one
// engine with continuous batching. SIGINT/SIGTERM stop it: new calls are refused, streams
// in flight end with FINISH_REASON_ABORT (under --tp N, with UNAVAILABLE naming the rank
// when a worker rank no longer answers), and the process exits. With --metrics-listen it
// also serves Prometheus metrics (vLLM's names, `quantkv:` prefix) over HTTP at /metrics.
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <fstream>
#include <limits>
#include <memory>
#include <sstream>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "launcher/commands.h"
#include "launcher/model_session.h"
#include "launcher/read_file.h"
#include "launcher/serve_tensor_parallel.h"
#include "runtime/comm/communicator.h"
#include "runtime/serve/engine_loop.h"
#include "runtime/serve/generation_server.h"
#include "runtime/serve/metrics_http.h"
#include "runtime/serve/service_checks.h"
#include "runtime/serve/serving_metrics.h"

namespace quantkv::launcher {
namespace {

// --more-kv's ';'-separated presets, trimmed.
std::vector<std::string> SplitMoreKv(const std::string& text) {
  std::vector<std::string> out;
  for (absl::string_view part :
       absl::StrSplit(absl::string_view(text), ';', absl::SkipWhitespace())) {
    out.emplace_back(absl::StripAsciiWhitespace(part));
  }
  return out;
}

// Restores the default handling of SIGINT/SIGTERM once the server is down. Duplicates of
// the signal that stopped it may be pending or still on their way: timeout(1) delivers
// SIGTERM twice (to the child, then to its process group), and under load the second can
// come well after sigwait took the first. Pending ones are consumed; late ones are ignored
// for a grace period, after which the defaults return, so that an exit step that hangs
// (MPI_Finalize, say) can still be stopped. Without this a duplicate killed a rank that was
// exiting cleanly (exit 143 in tcp_launch_test).
void UnblockStopSignals(const sigset_t& stop_signals) {
  const timespec now{};
  while (sigtimedwait(&stop_signals, nullptr, &now) > 0) {
  }
  std::signal(SIGINT, SIG_IGN);
  std::signal(SIGTERM, SIG_IGN);
  pthread_sigmask(SIG_UNBLOCK, &stop_signals, nullptr);
  std::thread([] {
    std::this_thread::sleep_for(std::chrono::seconds(2));
    std::signal(SIGINT, SIG_DFL);
    std::signal(SIGTERM, SIG_DFL);
  }).detach();
}

struct ServeOptions {
  ModelFlags model;
  std::string listen;
  std::string metrics_listen;
  int64_t max_running = 16;
  int64_t max_queued = 256;
  int64_t max_step_tokens = 256;
  std::string api_key_file;
  std::string tls_cert;
  std::string tls_key;
  bool prefill_gemm = false;
  bool fused_decode_attention = false;
  std::string more_kv;
  std::string worker_listen;
};

void Define(FlagSet& f, ServeOptions& o) {
  DefineModelFlags(f, o.model, {.tensor_parallel = true});
  f.String("worker-listen", &o.worker_listen, "127.0.0.1",
           "under --tp N: the host each worker rank (1..N-1) binds its control-plane gRPC "
           "service to, on a free port (rank 0 dials it). Loopback works on one machine; "
           "across machines give this network's address, or 0.0.0.0 to listen everywhere "
           "and advertise the hostname")
      .Placeholder("HOST");
  f.String("listen", &o.listen, "127.0.0.1:50051",
           "HOST:PORT to listen on (port 0: any free one); use 0.0.0.0:PORT or [::]:PORT "
           "explicitly to serve other machines")
      .Placeholder("HOST:PORT");
  f.String("more-kv", &o.more_kv, "",
           "further KV presets or specs, ';'-separated, that a request may choose by name "
           "(GenerateRequest.kv_preset); --kv is the default. The KV budget is split evenly "
           "between the presets' pools")
      .Placeholder("SPEC;SPEC");
  f.String("metrics-listen", &o.metrics_listen, "",
           "HOST:PORT to serve Prometheus metrics on, over HTTP at /metrics (empty: off; port "
           "0: any free one). The endpoint has no authentication or TLS: 127.0.0.1 is advised")
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

  EngineConfig base;
  base.max_chunk_tokens = o.max_step_tokens;
  // Per-row matmuls and one attention kernel keep a request's tokens bit-identical however
  // it is batched, chunked or recomputed after preemption.
  base.gemm_min_rows =
      o.prefill_gemm ? EngineConfig{}.gemm_min_rows : std::numeric_limits<int64_t>::max();
  base.fused_decode_attention = o.fused_decode_attention;

  // Ranks 1..N-1 of `mpirun -np N quantkv serve --tp N` are workers: no front end.
  if (o.model.tp > 1 && LaunchRank(o.model) > 0) {
    base.more_kv_specs = SplitMoreKv(o.more_kv);
    auto session = OpenModelSession(o.model, base);
    if (!session.ok()) return ReportFailure(ctx, session.status());
    const int rc = RunServeWorker(*session, o.worker_listen, stop_signals, ctx);
    UnblockStopSignals(stop_signals);
    return rc;
  }

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

  // Metrics come first so that a taken port fails before the model loads; the endpoint
  // answers (with zero counts) while it does. Declared before the loop: it outlives it.
  std::unique_ptr<ServingMetrics> metrics;
  std::unique_ptr<MetricsHttpServer> metrics_server;
  if (!o.metrics_listen.empty()) {
    auto m = ServingMetrics::Create(o.model.model);
    if (!m.ok()) return ReportFailure(ctx, m.status());
    metrics = std::move(*m);
    auto http = MetricsHttpServer::Start(o.metrics_listen,
                                         [registry = metrics.get()] { return registry->Render(); });
    if (!http.ok()) {
      // A malformed address is a wrong command line; a taken port is a failure to run.
      if (http.status().code() == absl::StatusCode::kInvalidArgument) {
        ctx.err << ctx.command << ": --metrics-listen: " << http.status().message() << "\n";
        return kExitUsage;
      }
      return ReportFailure(ctx, http.status());
    }
    metrics_server = std::move(*http);
  }

  const std::vector<std::string> more_kv = SplitMoreKv(o.more_kv);
  for (size_t i = 0; i < more_kv.size(); ++i) {
    const std::string& name = more_kv[i];
    if (name == o.model.kv ||
        std::find(more_kv.begin(), more_kv.begin() + i, name) != more_kv.begin() + i) {
      ctx.err << ctx.command << ": --more-kv names the preset '" << name << "' twice\n";
      return kExitUsage;
    }
  }
  base.more_kv_specs = more_kv;
  auto session = OpenModelSession(o.model, base);
  if (!session.ok()) return ReportFailure(ctx, session.status());
  server_options.model_path = session->path;
  std::unique_ptr<StepExecutor> executor;
  if (session->comm != nullptr && session->comm->size() > 1) {
    auto group = ConnectServeWorkers(*session, o.worker_listen);
    if (!group.ok()) return ReportSessionFailure(ctx, *session, group.status());
    executor = std::move(*group);
  } else {
    executor = std::make_unique<LocalStepExecutor>(std::move(session->engine));
  }

  EngineLoopConfig loop_config{.max_running = o.max_running,
                               .max_queued = o.max_queued,
                               .max_step_tokens = o.max_step_tokens,
                               .kv_preset = o.model.kv,
                               .more_kv_presets = more_kv,
                               .metrics = metrics.get()};
  auto loop = EngineLoop::Create(std::move(executor), session->tokenizer.get(), loop_config);
  if (!loop.ok()) return ReportSessionFailure(ctx, *session, loop.status());
  auto server = GenerationServer::Start(loop->get(), server_options);
  if (!server.ok()) {
    (*loop)->Shutdown();  // lets the workers go
    return ReportFailure(ctx, server.status());
  }

  ctx.err
      << absl::StrFormat(
             "%s: listening on %s (%s, model %s%s, KV %s: %d tokens in blocks of %d%s%s%s%s)%s\n",
             ctx.command, (*server)->address(), o.tls_cert.empty() ? "plaintext" : "TLS",
             session->path,
             (*loop)->tp_degree() > 1 ? absl::StrFormat(", --tp %d", (*loop)->tp_degree()) : "",
             o.model.kv, (*loop)->capacity_tokens(), (*loop)->block_tokens(),
             more_kv.empty() ? "" : ", also KV " + absl::StrJoin(more_kv, "; "),
             server_options.api_key.empty() ? "" : ", API key required",
             o.prefill_gemm ? ", prefill GEMM" : "",
             o.fused_decode_attention ? ", fused decode attention" : "",
             metrics_server
                 ? absl::StrFormat(", metrics on http://%s/metrics", metrics_server->address())
                 : "")
      << std::flush;

  // A collective that times out on this rank ends the job from inside the step: the clients
  // hear why first (the streams' writers need a moment to send it).
  if ((*loop)->tp_degree() > 1) {
    SetBeforeJobAbortHook([l = loop->get()](std::string_view reason) {
      l->FailAllNow(absl::UnavailableError(
          absl::StrCat("the tensor-parallel job is being aborted, so this request cannot finish (",
                       std::string(reason), ")")));
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    });
  }
  int sig = 0;
  sigwait(&stop_signals, &sig);
  ctx.err << ctx.command << ": " << (sig == SIGINT ? "SIGINT" : "SIGTERM") << ", shutting down\n"
          << std::flush;
  // Under mpirun a SIGTERM usually means another rank exited and mpirun is ending the job:
  // it kills this process 1 s later (odls_base_sigkill_timeout), while the loop thread may
  // wait in a collective that will never complete. So ask the workers first; if one is
  // gone, every client hears which one now, instead of "Socket closed" at the kill.
  bool lost_rank = false;
  if ((*loop)->tp_degree() > 1) {
    if (absl::Status probe = (*loop)->ProbeRanks(absl::Milliseconds(300)); !probe.ok()) {
      lost_rank = true;
      ctx.err << ctx.command << ": " << probe.message() << "\n" << std::flush;
      (*loop)->FailAllNow(absl::UnavailableError(
          absl::StrCat("the tensor-parallel job lost a rank, so this request cannot finish (",
                       probe.message(), ")")));
    }
  }
  // Scrapes stop first: nothing reads the metrics while the loop winds down.
  if (metrics_server) metrics_server->Stop();
  (*server)->Shutdown(absl::Seconds(5));
  (*loop)->Shutdown();
  SetBeforeJobAbortHook(nullptr);
  UnblockStopSignals(stop_signals);
  return lost_rank ? kExitFailure : kExitOk;
}

}  // namespace

Subcommand ServeSubcommand() {
  return MakeSubcommand<ServeOptions>(
      "serve", "serve the model over gRPC (quantkv.v1.Generation) with continuous batching", Define,
      Run);
}

}  // namespace quantkv::launcher
