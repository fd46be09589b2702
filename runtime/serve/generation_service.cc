#include "runtime/serve/generation_service.h"

#include <cmath>
#include <optional>

#include "absl/strings/str_format.h"
#include "runtime/tokenizer/chat_template.h"

namespace quantkv {
namespace {

// How often a waiting handler looks at ServerContext::IsCancelled().
constexpr absl::Duration kCancelPoll = absl::Milliseconds(20);

v1::FinishReason ToProto(FinishReason r) {
  switch (r) {
    case FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case FinishReason::kAbort:
      return v1::FINISH_REASON_ABORT;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

void FillChunk(const StreamEvent& e, v1::TokenChunk* c) {
  c->set_text(e.text);
  for (int32_t id : e.token_ids) c->add_token_ids(id);
  for (const TokenLogprobs& lp : e.logprobs) {
    v1::TokenLogprob* p = c->add_logprobs();
    p->set_token_id(lp.token_id);
    p->set_logprob(lp.logprob);
    for (const TopLogprob& t : lp.top) {
      v1::TopLogprob* tp = p->add_top();
      tp->set_token_id(t.token_id);
      tp->set_logprob(t.logprob);
    }
  }
}

void FillFinal(const GenerationFinal& f, v1::GenerateFinal* p) {
  p->set_finish_reason(ToProto(f.reason));
  p->set_prompt_tokens(static_cast<int32_t>(f.prompt_tokens));
  p->set_generated_tokens(static_cast<int32_t>(f.generated_tokens));
  p->set_ttft_ms(f.ttft_ms);
  p->set_tokens_per_s(f.tokens_per_s);
  p->set_kv_bits_per_element(f.kv_bits_per_element);
  p->set_preemptions(static_cast<int32_t>(f.preemptions));
}

std::optional<std::string_view> Metadata(const grpc::ServerContext* context, std::string_view key) {
  const auto& md = context->client_metadata();
  auto it = md.find(grpc::string_ref(key.data(), key.size()));
  if (it == md.end()) return std::nullopt;
  return std::string_view(it->second.data(), it->second.size());
}

// Waits for the one final (or error) event of a stream, for unary calls; aborts the request
// when the client cancels.
absl::StatusOr<GenerationFinal> AwaitFinal(grpc::ServerContext* context, EngineLoop* loop,
                                           RequestStream& stream) {
  bool aborted = false;
  while (true) {
    for (StreamEvent& e : stream.Wait(kCancelPoll)) {
      if (e.kind == StreamEvent::Kind::kError) return e.error;
      if (e.kind == StreamEvent::Kind::kFinal) {
        if (aborted) return absl::CancelledError("the call was cancelled");
        return e.final;
      }
    }
    if (!aborted && context->IsCancelled()) {
      loop->Abort(stream.request_id());
      aborted = true;
    }
  }
}

}  // namespace

GenerationService::GenerationService(const GenerationServiceConfig& config) : config_(config) {
  limits_.context_length = config_.loop->model_config().context_length;
  limits_.vocab_size = config_.loop->tokenizer().vocab_size();
  limits_.kv_presets = config_.loop->kv_presets();
}

absl::Status GenerationService::Authorize(const grpc::ServerContext* context) const {
  if (config_.api_key.empty()) return absl::OkStatus();
  return CheckBearer(Metadata(context, "authorization"), config_.api_key);
}

absl::StatusOr<std::vector<int32_t>> GenerationService::EncodeText(const std::string& text) const {
  return config_.loop->tokenizer().Encode(text, {.add_special = true, .parse_special = false});
}

absl::StatusOr<std::vector<int32_t>> GenerationService::EncodeChat(
    const v1::ChatPrompt& chat) const {
  std::vector<ChatMessage> messages;
  for (const v1::ChatMessage& m : chat.messages()) messages.push_back({m.role(), m.content()});
  const Tokenizer& tok = config_.loop->tokenizer();
  auto text = ApplyChatTemplate(tok.spec(), messages, /*add_generation_prompt=*/true);
  if (!text.ok()) return text.status();
  return tok.Encode(*text, {.add_special = true, .parse_special = true});
}

grpc::Status GenerationService::Generate(grpc::ServerContext* context,
                                         const v1::GenerateRequest* request,
                                         grpc::ServerWriter<v1::GenerateResponse>* writer) {
  if (absl::Status s = Authorize(context); !s.ok()) return ToGrpcStatus(s);
  if (absl::Status s = ValidateGenerateRequest(*request, limits_); !s.ok()) {
    return ToGrpcStatus(s);
  }
  GenerationParams p;
  switch (request->prompt_case()) {
    case v1::GenerateRequest::kText: {
      auto ids = EncodeText(request->text());
      if (!ids.ok()) return ToGrpcStatus(ids.status());
      p.prompt = std::move(*ids);
      break;
    }
    case v1::GenerateRequest::kChat: {
      auto ids = EncodeChat(request->chat());
      if (!ids.ok()) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            "GenerateRequest.chat: " + std::string(ids.status().message()));
      }
      p.prompt = std::move(*ids);
      break;
    }
    default:
      p.prompt.assign(request->tokens().ids().begin(), request->tokens().ids().end());
  }
  if (absl::Status s =
          CheckPromptLength(static_cast<int64_t>(p.prompt.size()), request->max_tokens(), limits_);
      !s.ok()) {
    return ToGrpcStatus(s);
  }
  p.request_id = request->request_id();
  p.sampling = SamplingFromProto(request->sampling());
  p.max_tokens = request->max_tokens();
  // The name was checked against the served presets above (ValidateGenerateRequest).
  p.kv_cache = config_.loop->KvPresetIndex(request->kv_preset()).value_or(0);
  p.stop.assign(request->stop().begin(), request->stop().end());
  p.stop_token_ids.assign(request->stop_token_ids().begin(), request->stop_token_ids().end());
  p.ignore_eos = request->ignore_eos();
  p.logprobs = static_cast<int32_t>(request->logprobs());
  p.priority = request->priority();
  auto submitted = config_.loop->Submit(std::move(p));
  if (!submitted.ok()) return ToGrpcStatus(submitted.status());
  RequestStream& stream = **submitted;

  bool aborted = false;  // by us, because the client went away
  bool wrote = false;
  while (true) {
    for (StreamEvent& e : stream.Wait(kCancelPoll)) {
      if (e.kind == StreamEvent::Kind::kError && !wrote) return ToGrpcStatus(e.error);
      v1::GenerateResponse resp;
      resp.set_request_id(stream.request_id());
      switch (e.kind) {
        case StreamEvent::Kind::kChunk:
          FillChunk(e, resp.mutable_chunk());
          break;
        case StreamEvent::Kind::kFinal:
          FillFinal(e.final, resp.mutable_final());
          break;
        case StreamEvent::Kind::kError:
          resp.mutable_error()->set_code(static_cast<int32_t>(e.error.code()));
          resp.mutable_error()->set_message(std::string(e.error.message()));
          break;
      }
      const bool last = e.kind != StreamEvent::Kind::kChunk;
      if (!aborted && !writer->Write(resp)) {
        // The client is gone: stop generating, then wait for the loop's final event.
        config_.loop->Abort(stream.request_id());
        aborted = true;
      }
      wrote = true;
      if (last) {
        if (aborted) return grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled");
        if (e.kind == StreamEvent::Kind::kError) return ToGrpcStatus(e.error);
        return grpc::Status::OK;
      }
    }
    if (!aborted && context->IsCancelled()) {
      config_.loop->Abort(stream.request_id());
      aborted = true;
    }
  }
}

grpc::Status GenerationService::Tokenize(grpc::ServerContext* context,
                                         const v1::TokenizeRequest* request,
                                         v1::TokenizeResponse* response) {
  if (absl::Status s = Authorize(context); !s.ok()) return ToGrpcStatus(s);
  absl::StatusOr<std::vector<int32_t>> ids;
  if (request->has_chat()) {
    for (const v1::ChatMessage& m : request->chat().messages()) {
      if (!IsValidUtf8(m.role()) || !IsValidUtf8(m.content())) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            "TokenizeRequest.chat.messages: not valid UTF-8");
      }
    }
    ids = EncodeChat(request->chat());
    if (!ids.ok()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "TokenizeRequest.chat: " + std::string(ids.status().message()));
    }
  } else {
    if (!IsValidUtf8(request->text())) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "TokenizeRequest.text: not valid UTF-8");
    }
    ids = EncodeText(request->text());
    if (!ids.ok()) return ToGrpcStatus(ids.status());
  }
  for (int32_t id : *ids) response->add_ids(id);
  return grpc::Status::OK;
}

grpc::Status GenerationService::ModelInfo(grpc::ServerContext* context,
                                          const v1::ModelInfoRequest* request,
                                          v1::ModelInfoResponse* response) {
  if (absl::Status s = Authorize(context); !s.ok()) return ToGrpcStatus(s);
  const EngineLoop& loop = *config_.loop;
  response->set_architecture(loop.model_config().architecture);
  response->set_model(config_.model_path);
  response->set_context_length(loop.model_config().context_length);
  response->set_vocab_size(loop.tokenizer().vocab_size());
  response->set_tp_degree(loop.tp_degree());
  for (const std::string& preset : loop.kv_presets()) response->add_kv_presets(preset);
  response->set_block_tokens(loop.block_tokens());
  response->set_capacity_tokens(loop.capacity_tokens());
  response->set_max_running(loop.config().max_running);
  response->set_max_queued(loop.config().max_queued);
  return grpc::Status::OK;
}

grpc::Status GenerationService::Stats(grpc::ServerContext* context, const v1::StatsRequest* request,
                                      v1::StatsResponse* response) {
  if (absl::Status s = Authorize(context); !s.ok()) return ToGrpcStatus(s);
  const EngineLoopStats st = config_.loop->Stats();
  response->set_running(st.scheduler.running);
  response->set_queued(st.scheduler.queued);
  if (!st.scheduler.pools.empty()) {
    response->set_kv_blocks_used(st.scheduler.pools[0].blocks_used);
    response->set_kv_blocks_free(st.scheduler.pools[0].blocks_free);
  }
  response->set_kv_bytes_per_token(st.kv_bytes_per_token);
  response->set_preemptions(st.scheduler.preemptions);
  response->set_kv_requantized_blocks(st.scheduler.requantized_blocks);
  response->set_kv_requantized_bytes_freed(st.kv_requantized_bytes_freed);
  response->set_generated_tokens_per_s(st.generated_tokens_per_s);
  response->set_finished(st.scheduler.finished);
  response->set_aborted(st.scheduler.cancelled);
  response->set_generated_tokens(st.generated_tokens);
  for (const EngineLoopStats::Expert& e : st.experts) {
    v1::ExpertStats* out = response->add_experts();
    out->set_layer(e.layer);
    out->set_expert(e.expert);
    out->set_load(e.load);
    out->set_mean_router_weight(e.mean_weight);
    out->set_precision(e.precision);
    out->set_bytes(e.bytes);
    out->set_precision_changes(e.changes);
  }
  response->set_expert_bytes_active(st.expert_bytes_active);
  response->set_expert_budget_bytes(st.expert_budget_bytes);
  response->set_expert_precision_changes(st.expert_changes);
  for (const RankStepTotals& r : st.ranks) {
    v1::RankStepStats* out = response->add_ranks();
    out->set_rank(r.rank);
    out->set_steps(r.steps);
    out->set_forward_seconds(r.forward_ns * 1e-9);
    out->set_comm_seconds(r.comm_ns * 1e-9);
    out->set_total_seconds(r.total_ns * 1e-9);
  }
  for (size_t i = 0; i < st.scheduler.pools.size(); ++i) {
    const PoolStats& pool = st.scheduler.pools[i];
    v1::KvPoolStats* out = response->add_pools();
    out->set_kv_preset(pool.name);
    out->set_blocks_used(pool.blocks_used);
    out->set_blocks_free(pool.blocks_free);
    if (i < st.pool_bytes_per_token.size()) out->set_bytes_per_token(st.pool_bytes_per_token[i]);
    out->set_capacity_tokens(config_.loop->capacity_tokens(static_cast<int>(i)));
  }
  return grpc::Status::OK;
}

grpc::Status GenerationService::Abort(grpc::ServerContext* context, const v1::AbortRequest* request,
                                      v1::AbortResponse* response) {
  if (absl::Status s = Authorize(context); !s.ok()) return ToGrpcStatus(s);
  if (request->request_id().empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "AbortRequest.request_id is empty");
  }
  response->set_found(config_.loop->Abort(request->request_id()));
  return grpc::Status::OK;
}

grpc::Status GenerationService::Score(grpc::ServerContext* context, const v1::ScoreRequest* request,
                                      v1::ScoreResponse* response) {
  if (absl::Status s = Authorize(context); !s.ok()) return ToGrpcStatus(s);
  GenerationParams p;
  p.score = true;
  auto kv_cache = config_.loop->KvPresetIndex(request->kv_preset());
  if (!kv_cache.ok()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "ScoreRequest.kv_preset: " + std::string(kv_cache.status().message()));
  }
  p.kv_cache = *kv_cache;
  if (request->has_tokens()) {
    p.prompt.assign(request->tokens().ids().begin(), request->tokens().ids().end());
    for (size_t i = 0; i < p.prompt.size(); ++i) {
      if (p.prompt[i] < 0 || p.prompt[i] >= limits_.vocab_size) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            absl::StrFormat("ScoreRequest.tokens.ids[%d]: token id %d outside "
                                            "the vocabulary",
                                            i, p.prompt[i]));
      }
    }
  } else {
    if (!IsValidUtf8(request->text())) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "ScoreRequest.text: not valid UTF-8");
    }
    auto ids = EncodeText(request->text());
    if (!ids.ok()) return ToGrpcStatus(ids.status());
    p.prompt = std::move(*ids);
  }
  const int64_t n = static_cast<int64_t>(p.prompt.size());
  if (n < 2) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrFormat("ScoreRequest.input: %d tokens; scoring needs >= 2", n));
  }
  if (n >= limits_.context_length) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrFormat("ScoreRequest.input: %d tokens exceed the context of %d", n,
                                        limits_.context_length));
  }
  auto submitted = config_.loop->Submit(std::move(p));
  if (!submitted.ok()) return ToGrpcStatus(submitted.status());
  auto done = AwaitFinal(context, config_.loop, **submitted);
  if (!done.ok()) return ToGrpcStatus(done.status());
  if (done->reason == FinishReason::kAbort) {
    return grpc::Status(grpc::StatusCode::ABORTED, "the request was aborted");
  }
  response->set_total_logprob(done->total_logprob);
  response->set_token_count(done->scored_tokens);
  response->set_perplexity(
      done->scored_tokens > 0 ? std::exp(-done->total_logprob / done->scored_tokens) : 0.0);
  return grpc::Status::OK;
}

}  // namespace quantkv
