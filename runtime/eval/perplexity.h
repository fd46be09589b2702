// Perplexity the way llama.cpp's llama-perplexity computes it, so numbers compare: the
// tokens are cut into non-overlapping windows of ctx tokens, each window runs from an empty
// cache, and only the second half of each window is scored (every scored token has at least
// ctx/2 tokens of context). Every scored token reads its context through the KV cache exactly
// as decode would (the engine writes K/V first and attends over the cache).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/engine/engine.h"
#include "runtime/eval/logits_baseline.h"

namespace quantkv {

struct PerplexityOptions {
  int64_t ctx = 512;
  int64_t max_chunks = 0;  // 0: every full window of the text
  int32_t bos_id = -1;     // >= 0: the first token of each window is replaced by BOS
  const LogitsBaseline* kl_base = nullptr;  // report KL / top-1 agreement against it
  LogitsBaseline* save_logits = nullptr;    // record this run as a baseline
  std::function<void(int64_t chunks_done, int64_t chunks_total)> progress;
  // > 0: also report the NLL of every position of the windows (not only the scored second
  // halves) in this many equal ranges of position, to see how quality changes along a long
  // context (e.g. past the trained window under --rope-scaling).
  int64_t position_buckets = 0;
  // Elastic precision at its limit: after every engine step of a window (chunks of the
  // engine's max_chunk_tokens), every full block pair of the window's sequence is
  // requantized to the floor codecs (Engine::RequantizeOldest), so later tokens read all but
  // the newest blocks at the floor: the quality cost of the floor under full memory pressure.
  bool requantize_all = false;
};

struct PositionBucket {
  int64_t begin = 0, end = 0;  // positions [begin, end) of the predicting token
  int64_t tokens = 0;
  double ppl = 0;
};

struct PerplexityResult {
  double ppl = 0;
  double ppl_stderr = 0;
  double mean_nll = 0;
  int64_t tokens_scored = 0;
  int64_t chunks = 0;
  double seconds = 0;
  double tokens_per_s = 0;  // all tokens run through the model per second
  bool has_kl = false;
  double kl_mean = 0;
  double kl_stderr = 0;
  double top1_agreement = 0;
  std::vector<PositionBucket> buckets;  // position_buckets > 0
};

absl::StatusOr<PerplexityResult> ComputePerplexity(Engine& engine, std::span<const int32_t> tokens,
                                                   const PerplexityOptions& options);

}  // namespace quantkv
