#include "runtime/eval/perplexity.h"

#include <chrono>
#include <cmath>
#include <vector>

#include "absl/strings/str_format.h"
#include "runtime/util/status_macros.h"

namespace quantkv {

absl::StatusOr<PerplexityResult> ComputePerplexity(Engine& engine, std::span<const int32_t> tokens,
                                                   const PerplexityOptions& opt) {
  if (opt.position_buckets < 0 || opt.position_buckets > opt.ctx - 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("perplexity: --position-buckets %d must be in [0, ctx - 1 = %d]",
                        opt.position_buckets, opt.ctx - 1));
  }
  if (opt.ctx < 4) {
    return absl::InvalidArgumentError(absl::StrFormat("perplexity: --ctx %d is below 4", opt.ctx));
  }
  const int64_t available = static_cast<int64_t>(tokens.size()) / opt.ctx;
  if (available < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("perplexity: the text has %d tokens, fewer than one window of --ctx %d",
                        tokens.size(), opt.ctx));
  }
  const int64_t chunks = opt.max_chunks > 0 ? std::min(opt.max_chunks, available) : available;
  const int64_t first = opt.ctx / 2;
  const int64_t V = engine.model_config().vocab_size;
  const std::span<const int32_t> used = tokens.first(chunks * opt.ctx);
  const uint64_t hash = HashTokens(used);
  if (opt.kl_base != nullptr) {
    const int64_t expect = chunks * (opt.ctx - 1 - first);
    if (opt.kl_base->tokens_hash != hash || opt.kl_base->ctx != opt.ctx ||
        static_cast<int64_t>(opt.kl_base->tokens.size()) != expect || opt.kl_base->vocab != V) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "perplexity: the --kl-base file was made from other tokens, ctx or chunk count "
          "(it has ctx %d and %d scored tokens; this run has ctx %d and %d)",
          opt.kl_base->ctx, opt.kl_base->tokens.size(), opt.ctx, expect));
    }
  }
  if (opt.save_logits != nullptr) {
    opt.save_logits->tokens_hash = hash;
    opt.save_logits->ctx = opt.ctx;
    opt.save_logits->vocab = V;
    opt.save_logits->tokens.clear();
  }

  PerplexityResult r;
  double nll_sum = 0, nll_sq = 0, kl_sum = 0, kl_sq = 0;
  int64_t agree = 0;
  const auto start = std::chrono::steady_clock::now();
  std::vector<int32_t> window(opt.ctx);
  std::vector<float> logits;
  // Position j predicts token j + 1, for j in [0, ctx - 1): bucket b holds
  // [b * (ctx-1) / B, (b+1) * (ctx-1) / B).
  const int64_t n_buckets = opt.position_buckets;
  std::vector<double> bucket_nll(n_buckets, 0.0);
  std::vector<int64_t> bucket_tokens(n_buckets, 0);
  auto row_nll = [&](int64_t j) {
    std::span<const float> row(logits.data() + j * V, V);
    const double mx = *std::max_element(row.begin(), row.end());
    double z = 0;
    for (float v : row) z += std::exp(static_cast<double>(v) - mx);
    return mx + std::log(z) - row[window[j + 1]];
  };
  for (int64_t c = 0; c < chunks; ++c) {
    std::copy_n(used.begin() + c * opt.ctx, opt.ctx, window.begin());
    if (opt.bos_id >= 0) window[0] = opt.bos_id;
    const SequenceId seq = engine.NewSequence();
    logits.clear();
    absl::Status s;
    if (opt.requantize_all) {
      const int64_t step = engine.config().max_chunk_tokens;
      for (int64_t pos = 0; pos < opt.ctx && s.ok(); pos += step) {
        const int64_t n = std::min(step, opt.ctx - pos);
        s = engine.Forward(seq, std::span<const int32_t>(window.data() + pos, n), true, &logits);
        if (s.ok()) s = engine.RequantizeOldest(seq, std::numeric_limits<int64_t>::max()).status();
      }
    } else {
      s = engine.Forward(seq, window, /*all_logits=*/true, &logits);
    }
    (void)engine.Release(seq);
    QKV_RETURN_IF_ERROR(s);
    for (int64_t j = 0; n_buckets > 0 && j < opt.ctx - 1; ++j) {
      const int64_t b = j * n_buckets / (opt.ctx - 1);
      bucket_nll[b] += row_nll(j);
      ++bucket_tokens[b];
    }
    for (int64_t j = first; j < opt.ctx - 1; ++j) {
      std::span<const float> row(logits.data() + j * V, V);
      const double nll = row_nll(j);
      nll_sum += nll;
      nll_sq += nll * nll;
      if (opt.kl_base != nullptr) {
        const TokenDivergence d = CompareToBaseline(opt.kl_base->tokens[r.tokens_scored], row);
        kl_sum += d.kl;
        kl_sq += d.kl * d.kl;
        agree += d.top1_agrees;
      }
      if (opt.save_logits != nullptr) opt.save_logits->tokens.push_back(SummariseLogits(row));
      ++r.tokens_scored;
    }
    if (opt.progress) opt.progress(c + 1, chunks);
  }
  for (int64_t b = 0; b < n_buckets; ++b) {
    r.buckets.push_back({.begin = (b * (opt.ctx - 1) + n_buckets - 1) / n_buckets,
                         .end = ((b + 1) * (opt.ctx - 1) + n_buckets - 1) / n_buckets,
                         .tokens = bucket_tokens[b],
                         .ppl = std::exp(bucket_nll[b] / std::max<int64_t>(1, bucket_tokens[b]))});
  }
  r.chunks = chunks;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.tokens_per_s = chunks * opt.ctx / std::max(r.seconds, 1e-9);
  const double n = static_cast<double>(r.tokens_scored);
  r.mean_nll = nll_sum / n;
  r.ppl = std::exp(r.mean_nll);
  // As llama.cpp: the standard error of the mean NLL, carried through exp().
  const double var = n > 1 ? std::max(0.0, (nll_sq / n - r.mean_nll * r.mean_nll) / (n - 1)) : 0;
  r.ppl_stderr = r.ppl * std::sqrt(var);
  if (opt.kl_base != nullptr) {
    r.has_kl = true;
    r.kl_mean = kl_sum / n;
    r.kl_stderr =
        n > 1 ? std::sqrt(std::max(0.0, (kl_sq / n - r.kl_mean * r.kl_mean) / (n - 1))) : 0;
    r.top1_agreement = agree / n;
  }
  return r;
}

}  // namespace quantkv
