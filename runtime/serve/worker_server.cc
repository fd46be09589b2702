#include "runtime/serve/worker_server.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <random>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "quantkv/v1/worker.grpc.pb.h"
#include "runtime/serve/service_checks.h"
#include "runtime/util/monotonic_clock.h"

namespace quantkv {

std::string MakeWorkerToken() {
  std::random_device rd;
  std::string token;
  for (int i = 0; i < 4; ++i) absl::StrAppendFormat(&token, "%08x", rd());
  return token;
}

class WorkerServer::Service final : public v1::Worker::Service {
 public:
  Service(Engine* engine, const WorkerServerOptions& options)
      : engine_(engine), options_(options), last_call_ns_(absl::GetCurrentTimeNanos()) {}

  absl::Time last_call() const { return absl::FromUnixNanos(last_call_ns_.load()); }

  grpc::Status Info(grpc::ServerContext* context, const v1::WorkerInfoRequest*,
                    v1::WorkerInfoResponse* response) override {
    if (grpc::Status s = Authorize(context); !s.ok()) return s;
    const TensorShard& shard = engine_->shard();
    response->set_rank(options_.rank);
    response->set_world_size(options_.world_size);
    response->set_model(options_.model_path);
    response->set_architecture(engine_->model_config().architecture);
    response->set_kv_head_begin(static_cast<int32_t>(shard.kv_heads.begin));
    response->set_kv_head_end(static_cast<int32_t>(shard.kv_heads.end()));
    response->set_q_head_begin(static_cast<int32_t>(shard.heads.begin));
    response->set_q_head_end(static_cast<int32_t>(shard.heads.end()));
    response->set_weight_bytes_per_token(engine_->WeightBytesPerToken());
    return grpc::Status::OK;
  }

  grpc::Status Health(grpc::ServerContext* context, const v1::WorkerHealthRequest*,
                      v1::WorkerHealthResponse* response) override {
    if (grpc::Status s = Authorize(context); !s.ok()) return s;
    // Read from snapshots, not under mu_: Health must answer while a step runs, so that the
    // coordinator's probe (TensorParallelExecutor::ProbeWorkers) can tell a busy worker
    // from a dead one within its short deadline.
    response->set_live_sequences(health_live_.load());
    response->set_steps(health_steps_.load());
    return grpc::Status::OK;
  }

  grpc::Status Warmup(grpc::ServerContext* context, const v1::WarmupRequest*,
                      v1::WarmupResponse* response) override {
    if (grpc::Status s = Authorize(context); !s.ok()) return s;
    for (int i = 0; i < engine_->kv_cache_count(); ++i) {
      const KvCache& kv = engine_->kv_cache(i);
      v1::KvCacheCapacity* c = response->add_caches();
      c->set_blocks(kv.allocator().num_blocks());
      c->set_block_tokens(kv.block_tokens());
      c->set_block_bytes(kv.block_bytes_all_layers());
    }
    return grpc::Status::OK;
  }

  grpc::Status Step(grpc::ServerContext* context, const v1::StepRequest* request,
                    v1::StepResponse* response) override {
    if (grpc::Status s = Authorize(context); !s.ok()) return s;
    const int64_t received = MonotonicNowNs();
    std::lock_guard<std::mutex> lock(mu_);
    absl::Status s = RunStep(*request, response);
    last_call_ns_.store(absl::GetCurrentTimeNanos());  // a long step is not silence
    if (!s.ok()) {
      s = absl::FailedPreconditionError(absl::StrFormat(
          "worker rank %d cannot run step %d: %s", options_.rank, request->step_id(), s.message()));
      // The coordinator and the other workers are entering this step's collectives.
      if (request->inputs_size() > 0 && options_.on_desync) options_.on_desync(s);
      return ToGrpcStatus(s);
    }
    response->set_step_id(request->step_id());
    response->set_rank(options_.rank);
    response->mutable_timings()->set_total_ns(MonotonicNowNs() - received);
    return grpc::Status::OK;
  }

  grpc::Status Release(grpc::ServerContext* context, const v1::ReleaseRequest* request,
                       v1::ReleaseResponse* response) override {
    if (grpc::Status s = Authorize(context); !s.ok()) return s;
    std::lock_guard<std::mutex> lock(mu_);
    int64_t released = 0;
    for (uint64_t id : request->seq_ids()) {
      if (ReleaseOne(id).ok()) ++released;
    }
    response->set_released(released);
    return grpc::Status::OK;
  }

  grpc::Status ClearCache(grpc::ServerContext* context, const v1::ClearCacheRequest*,
                          v1::ClearCacheResponse* response) override {
    if (grpc::Status s = Authorize(context); !s.ok()) return s;
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, seq] : sequences_) (void)engine_->Release(seq);
    response->set_released(static_cast<int64_t>(sequences_.size()));
    sequences_.clear();
    PublishHealth();
    return grpc::Status::OK;
  }

  grpc::Status Shutdown(grpc::ServerContext* context, const v1::WorkerShutdownRequest*,
                        v1::WorkerShutdownResponse*) override {
    if (grpc::Status s = Authorize(context); !s.ok()) return s;
    {
      std::lock_guard<std::mutex> lock(shutdown_mu_);
      shutdown_ = true;
    }
    shutdown_cv_.notify_all();
    return grpc::Status::OK;
  }

  bool WaitForShutdown(absl::Time deadline) {
    std::unique_lock<std::mutex> lock(shutdown_mu_);
    return shutdown_cv_.wait_until(lock, absl::ToChronoTime(deadline), [&] { return shutdown_; });
  }

 private:
  grpc::Status Authorize(const grpc::ServerContext* context) {
    const auto& md = context->client_metadata();
    auto it = md.find(kWorkerTokenMetadata);
    if (it == md.end() ||
        !ConstantTimeEquals(std::string_view(it->second.data(), it->second.size()),
                            options_.token)) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          absl::StrCat("worker calls need the job's ", kWorkerTokenMetadata));
    }
    last_call_ns_.store(absl::GetCurrentTimeNanos());
    return grpc::Status::OK;
  }

  absl::Status ReleaseOne(uint64_t id) {
    auto it = sequences_.find(id);
    if (it == sequences_.end()) {
      return absl::NotFoundError(absl::StrFormat("release of unknown sequence %d", id));
    }
    (void)engine_->Release(it->second);
    sequences_.erase(it);
    PublishHealth();
    return absl::OkStatus();
  }

  // Under mu_.
  absl::Status RunStep(const v1::StepRequest& request, v1::StepResponse* response) {
    if (request.step_id() != last_step_id_ + 1) {
      return absl::FailedPreconditionError(
          absl::StrFormat("expected step id %d, got %d", last_step_id_ + 1, request.step_id()));
    }
    // Everything is checked before anything changes, so a refused step leaves no trace.
    for (const v1::NewSequence& n : request.create()) {
      if (sequences_.contains(n.seq_id())) {
        return absl::AlreadyExistsError(absl::StrFormat("sequence %d exists", n.seq_id()));
      }
      if (n.kv_cache() < 0 || n.kv_cache() >= engine_->kv_cache_count()) {
        return absl::OutOfRangeError(absl::StrFormat("sequence %d: KV cache %d of %d", n.seq_id(),
                                                     n.kv_cache(), engine_->kv_cache_count()));
      }
    }
    for (uint64_t id : request.release()) {
      if (!sequences_.contains(id)) {
        return absl::NotFoundError(absl::StrFormat("release of unknown sequence %d", id));
      }
    }
    for (const v1::SequenceRequantize& r : request.requantize()) {
      if (!sequences_.contains(r.seq_id())) {
        return absl::NotFoundError(
            absl::StrFormat("requantization of unknown sequence %d", r.seq_id()));
      }
    }
    for (const v1::NewSequence& n : request.create()) {
      absl::StatusOr<SequenceId> seq = engine_->NewSequenceIn(n.kv_cache());
      if (!seq.ok()) return seq.status();
      sequences_[n.seq_id()] = *seq;
    }
    PublishHealth();
    for (uint64_t id : request.release()) (void)ReleaseOne(id);
    last_step_id_ = request.step_id();
    health_steps_.store(static_cast<int64_t>(last_step_id_));
    for (const v1::SequenceRequantize& r : request.requantize()) {
      absl::StatusOr<int64_t> done = engine_->RequantizeOldest(sequences_[r.seq_id()], r.pairs());
      if (!done.ok()) return done.status();
      if (*done != r.pairs()) {
        return absl::InternalError(
            absl::StrFormat("sequence %d had %d block pairs to requantize, rank 0 did %d",
                            r.seq_id(), *done, r.pairs()));
      }
    }
    if (request.inputs().empty()) return absl::OkStatus();

    std::vector<StepInput> inputs;
    inputs.reserve(request.inputs_size());
    for (const v1::SequenceInput& in : request.inputs()) {
      auto it = sequences_.find(in.seq_id());
      if (it == sequences_.end()) {
        return absl::NotFoundError(absl::StrFormat("input for unknown sequence %d", in.seq_id()));
      }
      inputs.push_back({.seq = it->second,
                        .tokens = std::span<const int32_t>(in.tokens().data(), in.tokens_size()),
                        .all_logits = in.all_logits()});
    }
    logits_.clear();
    absl::Status s = engine_->Step(inputs, &logits_);
    if (!s.ok()) return s;
    const StepTimings& t = engine_->last_step();
    response->mutable_timings()->set_forward_ns(t.forward_ns);
    response->mutable_timings()->set_comm_ns(t.comm_ns);
    response->set_tokens(t.tokens);
    return absl::OkStatus();
  }

  Engine* engine_;
  WorkerServerOptions options_;
  std::mutex mu_;  // serialises calls that touch the engine
  absl::flat_hash_map<uint64_t, SequenceId> sequences_;
  uint64_t last_step_id_ = 0;
  // What Health reports, published under mu_ and read without it.
  std::atomic<int64_t> health_live_{0}, health_steps_{0};
  void PublishHealth() { health_live_.store(static_cast<int64_t>(sequences_.size())); }
  std::vector<float> logits_;  // replicated logits, not needed here
  std::mutex shutdown_mu_;
  std::condition_variable shutdown_cv_;
  bool shutdown_ = false;
  std::atomic<int64_t> last_call_ns_;
};

absl::StatusOr<std::unique_ptr<WorkerServer>> WorkerServer::Start(
    Engine* engine, const WorkerServerOptions& options) {
  if (engine == nullptr) return absl::InvalidArgumentError("WorkerServer needs an engine");
  if (options.token.empty()) {
    return absl::InvalidArgumentError("WorkerServer needs a token (an empty one admits anyone)");
  }
  std::unique_ptr<WorkerServer> w(new WorkerServer());
  w->service_ = std::make_unique<Service>(engine, options);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, grpc::InsecureServerCredentials(), &w->port_);
  // A step carries at most a few prefill chunks of token ids.
  builder.SetMaxReceiveMessageSize(64 << 20);
  builder.RegisterService(w->service_.get());
  w->server_ = builder.BuildAndStart();
  if (w->server_ == nullptr || w->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("worker cannot listen on ", options.listen));
  }
  const size_t colon = options.listen.rfind(':');
  w->address_ = absl::StrCat(options.listen.substr(0, colon), ":", w->port_);
  return w;
}

WorkerServer::~WorkerServer() { Stop(); }

absl::Time WorkerServer::last_call() const { return service_->last_call(); }

bool WorkerServer::WaitForShutdown(absl::Time deadline) {
  return service_->WaitForShutdown(deadline);
}

void WorkerServer::Stop() {
  if (stopped_ || server_ == nullptr) return;
  stopped_ = true;
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  server_->Wait();
}

}  // namespace quantkv
