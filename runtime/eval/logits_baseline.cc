#include "runtime/eval/logits_baseline.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <numeric>

#include "absl/strings/str_format.h"

namespace quantkv {
namespace {

constexpr char kMagic[8] = {'Q', 'K', 'V', 'L', 'O', 'G', 'I', 'T'};
constexpr uint32_t kVersion = 1;

double LogSumExp(std::span<const float> x) {
  const double mx = *std::max_element(x.begin(), x.end());
  double s = 0;
  for (float v : x) s += std::exp(static_cast<double>(v) - mx);
  return mx + std::log(s);
}

}  // namespace

uint64_t HashTokens(std::span<const int32_t> tokens) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (int32_t t : tokens) {
    for (int i = 0; i < 4; ++i) {
      h ^= static_cast<uint8_t>(static_cast<uint32_t>(t) >> (8 * i));
      h *= 1099511628211ull;
    }
  }
  return h;
}

BaselineToken SummariseLogits(std::span<const float> logits, int k) {
  const int n = static_cast<int>(logits.size());
  k = std::min(k, n);
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  const double lse = LogSumExp(logits);
  BaselineToken t;
  double top_mass = 0;
  for (int i = 0; i < k; ++i) {
    const double lp = logits[order[i]] - lse;
    t.ids.push_back(order[i]);
    t.logprobs.push_back(static_cast<float>(lp));
    top_mass += std::exp(lp);
  }
  t.tail_logprob = static_cast<float>(std::log(std::max(1e-30, 1.0 - top_mass)));
  return t;
}

TokenDivergence CompareToBaseline(const BaselineToken& base, std::span<const float> logits) {
  const double lse = LogSumExp(logits);
  TokenDivergence d;
  double q_top = 0;
  for (size_t i = 0; i < base.ids.size(); ++i) {
    const double lq = logits[base.ids[i]] - lse;
    const double p = std::exp(static_cast<double>(base.logprobs[i]));
    d.kl += p * (base.logprobs[i] - lq);
    q_top += std::exp(lq);
  }
  const double p_tail = std::exp(static_cast<double>(base.tail_logprob));
  const double q_tail = std::max(1e-30, 1.0 - q_top);
  if (p_tail > 1e-20) d.kl += p_tail * (base.tail_logprob - std::log(q_tail));
  d.kl = std::max(0.0, d.kl);  // rounding can leave -1e-9
  const int32_t argmax =
      static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  d.top1_agrees = !base.ids.empty() && argmax == base.ids[0];
  return d;
}

absl::Status WriteLogitsBaseline(const std::string& path, const LogitsBaseline& b) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::PermissionDeniedError(absl::StrFormat("%s: cannot write", path));
    auto put = [&](const void* p, size_t n) { out.write(static_cast<const char*>(p), n); };
    const uint32_t k = LogitsBaseline::kTopK;
    const uint64_t n = b.tokens.size();
    put(kMagic, 8);
    put(&kVersion, 4);
    put(&k, 4);
    put(&b.tokens_hash, 8);
    put(&b.ctx, 8);
    put(&b.vocab, 8);
    put(&n, 8);
    for (const BaselineToken& t : b.tokens) {
      std::vector<int32_t> ids(k, -1);
      std::vector<float> lps(k, -INFINITY);
      std::copy(t.ids.begin(), t.ids.end(), ids.begin());
      std::copy(t.logprobs.begin(), t.logprobs.end(), lps.begin());
      put(ids.data(), 4 * k);
      put(lps.data(), 4 * k);
      put(&t.tail_logprob, 4);
    }
    if (!out) return absl::DataLossError(absl::StrFormat("%s: write failed", path));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::PermissionDeniedError(absl::StrFormat("%s: cannot rename from %s", path, tmp));
  }
  return absl::OkStatus();
}

absl::StatusOr<LogitsBaseline> ReadLogitsBaseline(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrFormat("%s: cannot open logits baseline", path));
  auto get = [&](void* p, size_t n) { return static_cast<bool>(in.read(static_cast<char*>(p), n)); };
  char magic[8];
  uint32_t version = 0, k = 0;
  uint64_t n = 0;
  LogitsBaseline b;
  if (!get(magic, 8) || std::memcmp(magic, kMagic, 8) != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: not a QuantKV logits baseline (bad magic)", path));
  }
  if (!get(&version, 4) || version != kVersion || !get(&k, 4) || k != LogitsBaseline::kTopK) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: unsupported baseline version %d / top-k %d", path, version, k));
  }
  if (!get(&b.tokens_hash, 8) || !get(&b.ctx, 8) || !get(&b.vocab, 8) || !get(&n, 8)) {
    return absl::DataLossError(absl::StrFormat("%s: truncated header", path));
  }
  const uint64_t record = 8ull * k + 4;
  in.seekg(0, std::ios::end);
  const uint64_t size = static_cast<uint64_t>(in.tellg());
  const uint64_t header = 8 + 4 + 4 + 8 * 4;
  if (size < header || (size - header) / record != n || (size - header) % record != 0) {
    return absl::DataLossError(absl::StrFormat(
        "%s: %d tokens announced but the file holds %d bytes of records", path, n,
        size - std::min(size, header)));
  }
  in.seekg(header);
  b.tokens.resize(n);
  for (BaselineToken& t : b.tokens) {
    t.ids.resize(k);
    t.logprobs.resize(k);
    get(t.ids.data(), 4 * k);
    get(t.logprobs.data(), 4 * k);
    get(&t.tail_logprob, 4);
    while (!t.ids.empty() && t.ids.back() < 0) {
      t.ids.pop_back();
      t.logprobs.pop_back();
    }
    for (int32_t id : t.ids) {
      if (id >= b.vocab) {
        return absl::DataLossError(
            absl::StrFormat("%s: token id %d outside the vocabulary %d", path, id, b.vocab));
      }
    }
  }
  if (!in) return absl::DataLossError(absl::StrFormat("%s: read failed", path));
  return b;
}

}  // namespace quantkv
