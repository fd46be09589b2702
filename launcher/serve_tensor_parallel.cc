#include "launcher/serve_tensor_parallel.h"

#include "runtime/comm/mpi_communicator.h"

#include <atomic>
#include <cstdlib>
#include <memory>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "runtime/serve/tensor_parallel_executor.h"
#include "runtime/serve/worker_rendezvous.h"
#include "runtime/serve/worker_server.h"
#include "runtime/util/status_macros.h"

namespace quantkv::launcher {
namespace {

// How long a worker that got a stop signal waits for rank 0's Shutdown before it leaves.
constexpr absl::Duration kStopGrace = absl::Seconds(10);
// Rank 0 calls Health every 5 s (TensorParallelExecutor): this long without a call, it is
// gone (under mpirun the launcher would have ended the job; without it, nobody else).
// QUANTKV_COORDINATOR_SILENCE_S overrides the 30 s (at least 10).
absl::Duration CoordinatorSilence() {
  double s = 30;
  if (const char* v = std::getenv("QUANTKV_COORDINATOR_SILENCE_S");
      v != nullptr && absl::SimpleAtod(v, &s) && s >= 10) {
    return absl::Seconds(s);
  }
  return absl::Seconds(30);
}

}  // namespace

absl::StatusOr<std::unique_ptr<StepExecutor>> ConnectServeWorkers(
    ModelSession& session, const std::string& worker_listen) {
  Communicator& comm = *session.comm;
  QKV_ASSIGN_OR_RETURN(std::string token, ShareWorkerToken(comm));
  QKV_RETURN_IF_ERROR(CheckWorkerHostReachable(comm, worker_listen));
  // The workers' start-up results (a port that cannot be bound).
  QKV_RETURN_IF_ERROR(AgreeOnStatus(comm, absl::OkStatus()));
  QKV_ASSIGN_OR_RETURN(std::vector<std::string> addresses, GatherWorkerAddresses(comm, ""));
  TensorParallelExecutorConfig config{.worker_addresses = std::move(addresses),
                                      .token = std::move(token)};
  // A worker's reply waits no longer than one of the collectives would.
  QKV_ASSIGN_OR_RETURN(const double timeout_s, CommTimeoutFromEnv());
  config.reply_timeout = timeout_s > 0 ? absl::Seconds(timeout_s) : absl::InfiniteDuration();
  QKV_ASSIGN_OR_RETURN(std::unique_ptr<TensorParallelExecutor> executor,
                       TensorParallelExecutor::Create(std::move(session.engine), config));
  return std::unique_ptr<StepExecutor>(std::move(executor));
}

int RunServeWorker(ModelSession& session, const std::string& worker_listen,
                   const sigset_t& stop_signals, CommandContext& ctx) {
  Communicator& comm = *session.comm;
  const int rank = comm.rank();
  absl::StatusOr<std::string> token = ShareWorkerToken(comm);
  if (!token.ok()) return ReportSessionFailure(ctx, session, token.status());
  if (absl::Status s = CheckWorkerHostReachable(comm, worker_listen); !s.ok()) {
    return ReportFailure(ctx, s);  // every rank got the same error
  }
  WorkerServerOptions options;
  options.listen = absl::StrCat(worker_listen, ":0");
  options.token = *token;
  options.rank = rank;
  options.world_size = comm.size();
  options.model_path = session.path;
  Communicator* abort_comm = session.comm.get();
  options.on_desync = [abort_comm, &ctx](const absl::Status& s) {
    ctx.err << ctx.command << ": " << s.message() << " (aborting all ranks)\n" << std::flush;
    abort_comm->Abort(kExitFailure);
  };
  absl::StatusOr<std::unique_ptr<WorkerServer>> server =
      WorkerServer::Start(session.engine.get(), options);
  if (absl::Status s = AgreeOnStatus(comm, server.status()); !s.ok()) return ReportFailure(ctx, s);
  const std::string host = AdvertisedWorkerHost(worker_listen);
  const std::string address = absl::StrCat(host, ":", (*server)->port());
  absl::StatusOr<std::vector<std::string>> all = GatherWorkerAddresses(comm, address);
  if (!all.ok()) return ReportSessionFailure(ctx, session, all.status());

  // A thread waits in sigwait for the whole run: a process-directed signal goes to a thread
  // waiting for it rather than to one of the MPI library's threads that may not block it.
  auto signaled = std::make_shared<std::atomic<bool>>(false);
  std::thread([signaled, stop_signals] {
    int sig = 0;
    if (sigwait(&stop_signals, &sig) == 0) signaled->store(true);
  }).detach();
  const absl::Duration silence = CoordinatorSilence();
  absl::Time signaled_at = absl::InfiniteFuture();
  while (!(*server)->WaitForShutdown(absl::Now() + absl::Milliseconds(200))) {
    if (signaled->load() && signaled_at == absl::InfiniteFuture()) signaled_at = absl::Now();
    if (absl::Now() - (*server)->last_call() > silence) {
      ctx.err << absl::StrFormat(
                     "%s: rank %d: no call from rank 0 for %s: it may have died; "
                     "leaving\n",
                     ctx.command, rank, absl::FormatDuration(silence))
              << std::flush;
      (*server)->Stop();
      return kExitFailure;
    }
    if (absl::Now() > signaled_at + kStopGrace) {
      ctx.err << absl::StrFormat(
                     "%s: rank %d: stop signal and no Shutdown from rank 0 within %s; leaving\n",
                     ctx.command, rank, absl::FormatDuration(kStopGrace))
              << std::flush;
      break;
    }
  }
  (*server)->Stop();
  return kExitOk;
}

}  // namespace quantkv::launcher
