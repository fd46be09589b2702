#include "runtime/serve/tensor_parallel_executor.h"

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "absl/strings/str_format.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "quantkv/v1/worker.grpc.pb.h"
#include "runtime/comm/mpi_communicator.h"
#include "runtime/serve/worker_server.h"
#include "runtime/util/monotonic_clock.h"
#include "runtime/util/status_macros.h"

namespace quantkv {

struct TensorParallelExecutor::Worker {
  int rank = 0;
  std::string address;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::Worker::Stub> stub;
  RankStepTotals totals;
  // The step call in flight.
  v1::StepResponse response;
  grpc::Status status;
  int64_t sent_ns = 0;
  int64_t done_ns = 0;
};

namespace {

void PrepareContext(grpc::ClientContext& context, const std::string& token,
                    absl::Duration timeout) {
  context.AddMetadata(kWorkerTokenMetadata, token);
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
}

absl::Status WorkerError(int rank, const std::string& address, const char* call,
                         const grpc::Status& s) {
  return absl::UnavailableError(
      absl::StrFormat("tensor-parallel worker rank %d at %s: %s failed: %s (%d)", rank, address,
                      call, s.error_message(), static_cast<int>(s.error_code())));
}

}  // namespace

absl::StatusOr<std::unique_ptr<TensorParallelExecutor>> TensorParallelExecutor::Create(
    std::unique_ptr<Engine> engine, const TensorParallelExecutorConfig& config) {
  if (engine == nullptr)
    return absl::InvalidArgumentError("TensorParallelExecutor needs an engine");
  const TensorShard& shard = engine->shard();
  const int world = shard.ranks;
  if (shard.rank != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("the coordinator must be rank 0, this engine is rank %d", shard.rank));
  }
  if (static_cast<int>(config.worker_addresses.size()) != world - 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tensor parallelism over %d ranks needs %d worker addresses, got %d", world,
                        world - 1, config.worker_addresses.size()));
  }
  if (config.token.empty()) return absl::InvalidArgumentError("no worker token");
  std::unique_ptr<TensorParallelExecutor> x(new TensorParallelExecutor());
  x->engine_ = std::move(engine);
  x->config_ = config;
  x->local_.rank = 0;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  for (int r = 1; r < world; ++r) {
    auto w = std::make_unique<Worker>();
    w->rank = r;
    w->address = config.worker_addresses[r - 1];
    w->totals.rank = r;
    w->channel = grpc::CreateCustomChannel(w->address, grpc::InsecureChannelCredentials(), args);
    if (!w->channel->WaitForConnected(absl::ToChronoTime(absl::Now() + config.connect_timeout))) {
      return absl::UnavailableError(
          absl::StrFormat("tensor-parallel worker rank %d at %s: not reachable within %s", r,
                          w->address, absl::FormatDuration(config.connect_timeout)));
    }
    w->stub = v1::Worker::NewStub(w->channel);

    grpc::ClientContext info_ctx;
    PrepareContext(info_ctx, config.token, config.connect_timeout);
    v1::WorkerInfoResponse info;
    grpc::Status s = w->stub->Info(&info_ctx, v1::WorkerInfoRequest(), &info);
    if (!s.ok()) return WorkerError(r, w->address, "Info", s);
    if (info.rank() != r || info.world_size() != world) {
      return absl::FailedPreconditionError(
          absl::StrFormat("the worker at %s is rank %d of %d; expected rank %d of %d", w->address,
                          info.rank(), info.world_size(), r, world));
    }
    if (info.architecture() != x->engine_->model_config().architecture) {
      return absl::FailedPreconditionError(
          absl::StrFormat("worker rank %d runs a %s model, rank 0 a %s model", r,
                          info.architecture(), x->engine_->model_config().architecture));
    }

    grpc::ClientContext warm_ctx;
    PrepareContext(warm_ctx, config.token, config.connect_timeout);
    v1::WarmupResponse warm;
    s = w->stub->Warmup(&warm_ctx, v1::WarmupRequest(), &warm);
    if (!s.ok()) return WorkerError(r, w->address, "Warmup", s);
    if (warm.caches_size() != x->engine_->kv_cache_count()) {
      return absl::FailedPreconditionError(
          absl::StrFormat("worker rank %d has %d KV caches, rank 0 has %d", r, warm.caches_size(),
                          x->engine_->kv_cache_count()));
    }
    for (int i = 0; i < warm.caches_size(); ++i) {
      const KvCache& kv = x->engine_->kv_cache(i);
      const v1::KvCacheCapacity& c = warm.caches(i);
      if (c.block_tokens() != kv.block_tokens() || c.blocks() < kv.allocator().num_blocks()) {
        return absl::FailedPreconditionError(absl::StrFormat(
            "worker rank %d's KV cache %d holds %d blocks of %d tokens; rank 0 schedules %d "
            "blocks of %d tokens and needs at least as many on every rank",
            r, i, c.blocks(), c.block_tokens(), kv.allocator().num_blocks(), kv.block_tokens()));
      }
    }

    grpc::ClientContext clear_ctx;
    PrepareContext(clear_ctx, config.token, config.connect_timeout);
    v1::ClearCacheResponse cleared;
    s = w->stub->ClearCache(&clear_ctx, v1::ClearCacheRequest(), &cleared);
    if (!s.ok()) return WorkerError(r, w->address, "ClearCache", s);
    x->workers_.push_back(std::move(w));
  }
  x->heartbeat_ = std::thread([p = x.get()] { p->Heartbeat(); });
  return x;
}

void TensorParallelExecutor::Heartbeat() {
  std::unique_lock<std::mutex> lock(heartbeat_mu_);
  while (!heartbeat_cv_.wait_for(lock, std::chrono::seconds(5), [&] { return heartbeat_stop_; })) {
    lock.unlock();  // Shutdown need not wait for the calls
    for (auto& w : workers_) {
      grpc::ClientContext ctx;
      PrepareContext(ctx, config_.token, absl::Seconds(5));
      v1::WorkerHealthResponse health;
      // Only the call matters: it resets the worker's silence watchdog. A worker that does
      // not answer is reported by the next Step, which every request waits on.
      (void)w->stub->Health(&ctx, v1::WorkerHealthRequest(), &health);
    }
    lock.lock();
  }
}

void TensorParallelExecutor::AbortJobForLateWorker(const Worker& w, int64_t local_end_ns) {
  const std::string line = absl::StrFormat(
      "rank 0: tensor-parallel worker rank %d at %s did not answer step %d within %.1f s of rank "
      "0 finishing its part: it may have stopped or hung; aborting all ranks "
      "(QUANTKV_COMM_TIMEOUT_S sets the limit)",
      w.rank, w.address, step_id_, (MonotonicNowNs() - local_end_ns) / 1e9);
  absl::FPrintF(stderr, "quantkv: %s\n", line);
  std::fflush(stderr);
  RunBeforeJobAbortHook(line);
  engine_->config().comm->Abort(kCommTimeoutExitCode);
  // Abort ends the job; should a communicator's return, this process still must not go on.
  std::_Exit(kCommTimeoutExitCode);
}

absl::Status TensorParallelExecutor::ProbeWorkers(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  for (const auto& w : workers_) {
    grpc::ClientContext ctx;
    PrepareContext(ctx, config_.token, std::max(deadline - absl::Now(), absl::ZeroDuration()));
    v1::WorkerHealthResponse health;
    grpc::Status s = w->stub->Health(&ctx, v1::WorkerHealthRequest(), &health);
    if (!s.ok()) return WorkerError(w->rank, w->address, "Health", s);
  }
  return absl::OkStatus();
}

TensorParallelExecutor::~TensorParallelExecutor() { Shutdown(); }

int TensorParallelExecutor::world_size() const { return 1 + static_cast<int>(workers_.size()); }

absl::StatusOr<SequenceId> TensorParallelExecutor::NewSequenceIn(int kv_cache) {
  absl::StatusOr<SequenceId> seq = engine_->NewSequenceIn(kv_cache);
  if (seq.ok()) pending_create_.push_back({*seq, kv_cache});
  return seq;
}

absl::Status TensorParallelExecutor::Release(SequenceId seq) {
  QKV_RETURN_IF_ERROR(engine_->Release(seq));
  // A sequence the workers never saw needs no message.
  auto it = std::find_if(pending_create_.begin(), pending_create_.end(),
                         [&](const auto& p) { return p.first == seq; });
  if (it != pending_create_.end()) {
    pending_create_.erase(it);
  } else {
    pending_release_.push_back(seq);
  }
  return absl::OkStatus();
}

absl::Status TensorParallelExecutor::RequantizeOldest(SequenceId seq, int64_t pairs) {
  QKV_ASSIGN_OR_RETURN(const int64_t done, engine_->RequantizeOldest(seq, pairs));
  if (done != pairs) {
    return absl::InternalError(absl::StrFormat(
        "rank 0: sequence %d had %d block pairs to requantize, the scheduler asked for %d", seq,
        done, pairs));
  }
  pending_requantize_.push_back({seq, pairs});
  return absl::OkStatus();
}

absl::Status TensorParallelExecutor::Step(std::span<const StepInput> inputs,
                                          std::vector<float>* logits) {
  if (!broken_.ok()) return broken_;
  if (shut_down_) return absl::FailedPreconditionError("the tensor-parallel group is shut down");
  if (inputs.empty()) return absl::InvalidArgumentError("a tensor-parallel step needs inputs");
  // Refused here, before any rank starts the step's collectives.
  QKV_RETURN_IF_ERROR(engine_->CheckStep(inputs).status());

  v1::StepRequest request;
  request.set_step_id(++step_id_);
  for (const auto& [seq, cache] : pending_create_) {
    v1::NewSequence* n = request.add_create();
    n->set_seq_id(static_cast<uint64_t>(seq));
    n->set_kv_cache(cache);
  }
  for (SequenceId seq : pending_release_) request.add_release(static_cast<uint64_t>(seq));
  for (const auto& [seq, pairs] : pending_requantize_) {
    v1::SequenceRequantize* r = request.add_requantize();
    r->set_seq_id(static_cast<uint64_t>(seq));
    r->set_pairs(pairs);
  }
  for (const StepInput& in : inputs) {
    v1::SequenceInput* s = request.add_inputs();
    s->set_seq_id(static_cast<uint64_t>(in.seq));
    s->mutable_tokens()->Add(in.tokens.begin(), in.tokens.end());
    s->set_all_logits(in.all_logits);
  }
  pending_create_.clear();
  pending_release_.clear();
  pending_requantize_.clear();

  std::mutex mu;
  std::condition_variable cv;
  int outstanding = static_cast<int>(workers_.size());
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  for (auto& w : workers_) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    PrepareContext(*contexts.back(), config_.token, config_.step_timeout);
    w->response.Clear();
    w->sent_ns = MonotonicNowNs();
    w->done_ns = 0;
    Worker* worker = w.get();
    w->stub->async()->Step(contexts.back().get(), &request, &w->response,
                           [&, worker](grpc::Status s) {
                             std::lock_guard<std::mutex> lock(mu);
                             worker->done_ns = MonotonicNowNs();
                             worker->status = std::move(s);
                             if (--outstanding == 0) cv.notify_one();
                           });
  }
  const int64_t local_start = MonotonicNowNs();
  absl::Status local = engine_->Step(inputs, logits);
  const int64_t local_end = MonotonicNowNs();
  {
    std::unique_lock<std::mutex> lock(mu);
    auto replied = [&] { return outstanding == 0; };
    if (config_.reply_timeout == absl::InfiniteDuration()) {
      cv.wait(lock, replied);
    } else if (!cv.wait_for(lock, absl::ToChronoNanoseconds(config_.reply_timeout), replied)) {
      const Worker* late = nullptr;
      for (const auto& w : workers_) {
        if (w->done_ns == 0 && late == nullptr) late = w.get();
      }
      lock.unlock();
      AbortJobForLateWorker(*late, local_end);
    }
  }
  for (auto& w : workers_) {
    if (!w->status.ok()) {
      broken_ = WorkerError(w->rank, w->address, "Step", w->status);
      return broken_;
    }
  }
  if (!local.ok()) {
    // The workers ran the step and rank 0 did not: their states differ from here on.
    broken_ = absl::InternalError(absl::StrFormat(
        "rank 0 failed a step the workers ran (%s); the tensor-parallel group is out of step",
        local.message()));
    return local;
  }
  ++local_.steps;
  local_.forward_ns += engine_->last_step().forward_ns;
  local_.comm_ns += engine_->last_step().comm_ns;
  local_.total_ns += local_end - local_start;
  for (auto& w : workers_) {
    ++w->totals.steps;
    w->totals.forward_ns += w->response.timings().forward_ns();
    w->totals.comm_ns += w->response.timings().comm_ns();
    w->totals.total_ns += w->done_ns - w->sent_ns;
  }
  return absl::OkStatus();
}

std::vector<RankStepTotals> TensorParallelExecutor::StepTotals() const {
  std::vector<RankStepTotals> out = {local_};
  for (const auto& w : workers_) out.push_back(w->totals);
  return out;
}

void TensorParallelExecutor::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  {
    std::lock_guard<std::mutex> lock(heartbeat_mu_);
    heartbeat_stop_ = true;
  }
  heartbeat_cv_.notify_all();
  if (heartbeat_.joinable()) heartbeat_.join();
  for (auto& w : workers_) {
    grpc::ClientContext ctx;
    PrepareContext(ctx, config_.token, absl::Seconds(5));
    v1::WorkerShutdownResponse response;
    (void)w->stub->Shutdown(&ctx, v1::WorkerShutdownRequest(), &response);
  }
}

}  // namespace quantkv
