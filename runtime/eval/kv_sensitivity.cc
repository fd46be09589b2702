#include "runtime/eval/kv_sensitivity.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "absl/strings/str_format.h"
#include "kernels/kv_codec.h"
#include "nlohmann/json.hpp"
#include "runtime/eval/logits_baseline.h"
#include "runtime/kv/kv_policy.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

using Clock = std::chrono::steady_clock;
double SecondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

struct Score {
  double nll_sum = 0, kl_sum = 0;
  int64_t agree = 0, n = 0;
  double ppl() const { return std::exp(nll_sum / std::max<int64_t>(1, n)); }
  double kl() const { return kl_sum / std::max<int64_t>(1, n); }
  double top1() const { return static_cast<double>(agree) / std::max<int64_t>(1, n); }
};

// The first `chunks` windows of `ctx` tokens, BOS in front when asked (as ComputePerplexity).
std::vector<std::vector<int32_t>> CutWindows(std::span<const int32_t> tokens, int64_t ctx,
                                             int64_t chunks, int32_t bos) {
  std::vector<std::vector<int32_t>> w;
  for (int64_t c = 0; c < chunks; ++c) {
    w.emplace_back(tokens.begin() + c * ctx, tokens.begin() + (c + 1) * ctx);
    if (bos >= 0) w.back()[0] = bos;
  }
  return w;
}

// Scores the windows in KV cache `cache` of `engine` the way ComputePerplexity does (second
// halves), against `base` when given, recording into `save` when given. The first half runs
// without logits: only the scored rows pay for the lm_head.
absl::StatusOr<Score> ScoreWindows(Engine& engine, int cache,
                                   const std::vector<std::vector<int32_t>>& windows,
                                   const LogitsBaseline* base, LogitsBaseline* save,
                                   const std::function<void()>& after_window = {}) {
  Score s;
  const int64_t V = engine.model_config().vocab_size;
  size_t scored = 0;
  for (const std::vector<int32_t>& w : windows) scored += w.size() - 1 - w.size() / 2;
  if (base != nullptr && base->tokens.size() != scored) {
    return absl::InternalError(
        absl::StrFormat("sensitivity: the base run scored %d tokens, this one would score %d",
                        base->tokens.size(), scored));
  }
  std::vector<float> logits;
  for (const std::vector<int32_t>& w : windows) {
    const int64_t ctx = static_cast<int64_t>(w.size());
    const int64_t first = ctx / 2;
    QKV_ASSIGN_OR_RETURN(const SequenceId seq, engine.NewSequenceIn(cache));
    logits.clear();
    absl::Status st = engine.Forward(seq, std::span(w).first(first), false, &logits);
    logits.clear();
    if (st.ok()) st = engine.Forward(seq, std::span(w).subspan(first), true, &logits);
    (void)engine.Release(seq);
    QKV_RETURN_IF_ERROR(st);
    // Row r predicts token first + r + 1; the last row has no target.
    for (int64_t r = 0; r + first + 1 < ctx; ++r) {
      std::span<const float> row(logits.data() + r * V, V);
      const double mx = *std::max_element(row.begin(), row.end());
      double z = 0;
      for (float v : row) z += std::exp(static_cast<double>(v) - mx);
      s.nll_sum += mx + std::log(z) - row[w[first + r + 1]];
      if (base != nullptr) {
        const TokenDivergence d = CompareToBaseline(base->tokens[s.n], row);
        s.kl_sum += d.kl;
        s.agree += d.top1_agrees;
      }
      if (save != nullptr) save->tokens.push_back(SummariseLogits(row));
      ++s.n;
    }
    if (after_window) after_window();
  }
  return s;
}

// The "mse" head proxy: every candidate codec's reconstruction error of each head's rows as
// the base run writes them, block by block as the cache would encode them.
class ReconstructionProxy {
 public:
  static absl::StatusOr<ReconstructionProxy> Create(const ModelConfig& mc, int64_t block,
                                                    const std::vector<std::string>& k_codecs,
                                                    const std::vector<std::string>& v_codecs) {
    ReconstructionProxy p;
    p.heads_ = mc.n_kv_heads;
    p.dim_ = mc.head_dim;
    p.block_ = block;
    for (int kv = 0; kv < 2; ++kv) {
      for (const std::string& name : kv == 0 ? k_codecs : v_codecs) {
        QKV_ASSIGN_OR_RETURN(kernels::KvCodecSpec spec, kernels::ParseKvCodecSpec(name));
        QKV_ASSIGN_OR_RETURN(std::unique_ptr<kernels::KvCodec> c,
                             kernels::KvCodec::Create(spec, mc.head_dim, block));
        p.codecs_[kv].push_back(std::move(c));
      }
      p.err_[kv].assign(mc.n_layers * mc.n_kv_heads * p.codecs_[kv].size(), 0.0);
    }
    p.energy_.assign(mc.n_layers * mc.n_kv_heads * 2, 0.0);
    p.rows_[0].resize(mc.n_layers);
    p.rows_[1].resize(mc.n_layers);
    return p;
  }

  // Rows [n][n_kv_heads * head_dim] of one layer, in position order within a window.
  void Observe(int64_t layer, int64_t n, const float* k, const float* v) {
    const int64_t row = heads_ * dim_;
    rows_[0][layer].insert(rows_[0][layer].end(), k, k + n * row);
    rows_[1][layer].insert(rows_[1][layer].end(), v, v + n * row);
  }

  // Encodes the window's full blocks (a partial tail stays fp16 in the cache too).
  void FlushWindow() {
    const int64_t row = heads_ * dim_;
    std::vector<float> slab(block_ * dim_), back(block_ * dim_);
    std::vector<uint8_t> bytes;
    for (int kv = 0; kv < 2; ++kv) {
      for (size_t layer = 0; layer < rows_[kv].size(); ++layer) {
        std::vector<float>& rows = rows_[kv][layer];
        const int64_t blocks = static_cast<int64_t>(rows.size()) / row / block_;
        for (int64_t b = 0; b < blocks; ++b) {
          for (int64_t h = 0; h < heads_; ++h) {
            double energy = 0;
            for (int64_t t = 0; t < block_; ++t) {
              const float* src = rows.data() + (b * block_ + t) * row + h * dim_;
              std::copy_n(src, dim_, slab.data() + t * dim_);
              for (int64_t e = 0; e < dim_; ++e) energy += double{src[e]} * src[e];
            }
            energy_[(layer * heads_ + h) * 2 + kv] += energy;
            for (size_t c = 0; c < codecs_[kv].size(); ++c) {
              const kernels::KvCodec& codec = *codecs_[kv][c];
              bytes.assign(codec.slab_bytes(), 0);
              codec.Encode(slab.data(), bytes.data());
              codec.Decode(bytes.data(), 0, block_, back.data());
              double err = 0;
              for (size_t i = 0; i < slab.size(); ++i) {
                const double d = double{slab[i]} - back[i];
                err += d * d;
              }
              err_[kv][(layer * heads_ + h) * codecs_[kv].size() + c] += err;
            }
          }
        }
        rows.clear();
      }
    }
  }

  // Relative squared error of one head (head < 0: the whole layer).
  double RelError(int64_t layer, int64_t head, int kv, size_t codec) const {
    double err = 0, energy = 0;
    for (int64_t h = 0; h < heads_; ++h) {
      if (head >= 0 && h != head) continue;
      err += err_[kv][(layer * heads_ + h) * codecs_[kv].size() + codec];
      energy += energy_[(layer * heads_ + h) * 2 + kv];
    }
    return energy > 0 ? err / energy : 0;
  }

 private:
  ReconstructionProxy() = default;
  int64_t heads_ = 0, dim_ = 0, block_ = 0;
  std::vector<std::unique_ptr<kernels::KvCodec>> codecs_[2];
  std::vector<double> err_[2];               // [layer][head][codec]
  std::vector<double> energy_;               // [layer][head][K|V]
  std::vector<std::vector<float>> rows_[2];  // [K|V][layer]: this window's rows
};

// One run: the base with one layer's (or one head's) K or V replaced.
struct RunConfig {
  std::string spec;
  int64_t layer = 0, head = -1;
  int kv = 0;
  size_t codec = 0;
};

// Runs every config on the windows, caches_per_engine configs per engine.
absl::StatusOr<std::vector<Score>> RunConfigs(const KvEngineFactory& make_engine,
                                              const std::vector<RunConfig>& configs,
                                              const std::vector<std::vector<int32_t>>& windows,
                                              const LogitsBaseline& base, int64_t bytes_per_cache,
                                              const KvSensitivityOptions& o,
                                              const std::string& stage) {
  std::vector<Score> scores;
  const int64_t per = std::max<int64_t>(1, o.caches_per_engine);
  for (size_t g0 = 0; g0 < configs.size(); g0 += per) {
    const size_t g1 = std::min(configs.size(), g0 + per);
    EngineConfig ec;
    ec.kv_spec = configs[g0].spec;
    for (size_t i = g0 + 1; i < g1; ++i) ec.more_kv_specs.push_back(configs[i].spec);
    ec.kv_max_bytes = bytes_per_cache * static_cast<int64_t>(g1 - g0);
    ec.max_chunk_tokens = static_cast<int64_t>(windows[0].size());
    ec.pack_weights = false;  // prefill only: the packed decode kernels would go unused
    QKV_ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, make_engine(ec));
    for (size_t i = g0; i < g1; ++i) {
      absl::StatusOr<Score> s =
          ScoreWindows(*engine, static_cast<int>(i - g0), windows, &base, nullptr);
      if (!s.ok()) {
        return absl::Status(s.status().code(), absl::StrFormat("KV spec %s: %s", configs[i].spec,
                                                               s.status().message()));
      }
      scores.push_back(*s);
      if (o.progress) o.progress(stage, static_cast<int64_t>(i + 1), configs.size());
    }
  }
  return scores;
}

// Ranks with ties averaged (1-based).
std::vector<double> Ranks(std::span<const double> x) {
  std::vector<size_t> idx(x.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return x[a] < x[b]; });
  std::vector<double> r(x.size());
  for (size_t i = 0; i < idx.size();) {
    size_t j = i;
    while (j + 1 < idx.size() && x[idx[j + 1]] == x[idx[i]]) ++j;
    for (size_t k = i; k <= j; ++k) r[idx[k]] = 0.5 * static_cast<double>(i + j) + 1;
    i = j + 1;
  }
  return r;
}

}  // namespace

double SpearmanRho(std::span<const double> a, std::span<const double> b) {
  if (a.size() != b.size() || a.size() < 2) return 0;
  const std::vector<double> ra = Ranks(a), rb = Ranks(b);
  const double n = static_cast<double>(a.size());
  const double mean = (n + 1) / 2;
  double sab = 0, saa = 0, sbb = 0;
  for (size_t i = 0; i < ra.size(); ++i) {
    sab += (ra[i] - mean) * (rb[i] - mean);
    saa += (ra[i] - mean) * (ra[i] - mean);
    sbb += (rb[i] - mean) * (rb[i] - mean);
  }
  return saa > 0 && sbb > 0 ? sab / std::sqrt(saa * sbb) : 0;
}

absl::StatusOr<KvSensitivity> MeasureKvSensitivity(const KvEngineFactory& make_engine,
                                                   std::span<const int32_t> tokens,
                                                   const KvSensitivityOptions& o) {
  const auto start = Clock::now();
  if (o.base.empty()) return absl::InvalidArgumentError("sensitivity: the base KV spec is empty");
  if (o.k_codecs.empty() || o.v_codecs.empty()) {
    return absl::InvalidArgumentError("sensitivity: no candidate codecs for K or V");
  }
  if (o.head_proxy != "mse" && o.head_proxy != "kl" && o.head_proxy != "none") {
    return absl::InvalidArgumentError(
        absl::StrFormat("sensitivity: head proxy '%s' (want mse, kl or none)", o.head_proxy));
  }
  if (o.ctx < 4 || o.chunks < 1 ||
      (o.head_proxy == "kl" && (o.proxy_ctx < 4 || o.proxy_chunks < 1))) {
    return absl::InvalidArgumentError("sensitivity: ctx and proxy_ctx must be >= 4, chunks >= 1");
  }
  const int64_t available = static_cast<int64_t>(tokens.size()) / o.ctx;
  if (available < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("sensitivity: the text has %d tokens, fewer than one window of ctx %d",
                        tokens.size(), o.ctx));
  }
  if (o.head_proxy == "kl" && static_cast<int64_t>(tokens.size()) < o.proxy_ctx) {
    return absl::InvalidArgumentError(
        absl::StrFormat("sensitivity: the text has %d tokens, fewer than one proxy window of %d",
                        tokens.size(), o.proxy_ctx));
  }
  const auto windows = CutWindows(tokens, o.ctx, std::min(o.chunks, available), o.bos_id);

  // The base run: the reference distributions, and the rows the "mse" proxy encodes.
  std::unique_ptr<ReconstructionProxy> proxy;
  Engine* base_engine = nullptr;
  bool pre_rope = false;
  std::vector<float> k_pre;
  EngineConfig bc;
  bc.kv_spec = o.base;
  bc.max_chunk_tokens = o.ctx;
  bc.pack_weights = false;
  bc.kv_observer = [&](int64_t layer, int64_t n, const int32_t* pos, const float* k,
                       const float* v) {
    if (proxy == nullptr) return;
    if (!pre_rope) return proxy->Observe(layer, n, k, v);
    // Pre-RoPE keys: the cache encodes the un-rotated key, so the proxy does too.
    const ModelConfig& c = base_engine->model_config();
    k_pre.assign(k, k + n * c.n_kv_heads * c.head_dim);
    for (int64_t t = 0; t < n * c.n_kv_heads; ++t) {
      base_engine->rope().RotateRows(k_pre.data() + t * c.head_dim, 1, pos[t / c.n_kv_heads],
                                     /*inverse=*/true);
    }
    proxy->Observe(layer, n, k_pre.data(), v);
  };
  QKV_ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, make_engine(bc));
  base_engine = engine.get();
  const ModelConfig mc = engine->model_config();
  const KvPolicy& policy = engine->kv_cache().policy();
  if (!policy.static_scales.empty()) {
    return absl::InvalidArgumentError(
        "sensitivity: the base policy has static scales; give a base without them");
  }
  pre_rope = policy.pre_rope_keys;
  const std::string base_spec = o.base[0] == '@' ? policy.ToSpec() : o.base;
  const int64_t block = policy.block_tokens;

  // Candidate codecs: valid for this geometry, and their bits per element.
  std::vector<double> bits[2];
  for (int kv = 0; kv < 2; ++kv) {
    for (const std::string& name : kv == 0 ? o.k_codecs : o.v_codecs) {
      absl::StatusOr<kernels::KvCodecSpec> spec = kernels::ParseKvCodecSpec(name);
      if (!spec.ok()) return spec.status();
      if (spec->granularity == kernels::KvGranularity::kStatic) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "sensitivity: candidate %s has static scales, which need calibration; use dynamic "
            "codecs (gN, chan or block)",
            name));
      }
      absl::StatusOr<std::unique_ptr<kernels::KvCodec>> c =
          kernels::KvCodec::Create(*spec, mc.head_dim, block);
      if (!c.ok()) {
        return absl::InvalidArgumentError(
            absl::StrFormat("sensitivity: candidate %s: %s", name, c.status().message()));
      }
      bits[kv].push_back((*c)->bits_per_element());
    }
  }
  std::vector<int64_t> layers = o.layers;
  if (layers.empty()) {
    layers.resize(mc.n_layers);
    std::iota(layers.begin(), layers.end(), 0);
  }
  for (int64_t l : layers) {
    if (l < 0 || l >= mc.n_layers) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "sensitivity: layer %d is out of range (the model has %d layers)", l, mc.n_layers));
    }
  }
  if (o.head_proxy == "kl") {
    if (absl::Status s = ParseKvPolicy(base_spec + ",0.h0.k=fp16", mc.n_layers).status(); !s.ok()) {
      return absl::UnimplementedError(absl::StrFormat(
          "sensitivity: head proxy kl needs per-head KV policies (L.hH.k=CODEC), which this "
          "build does not parse (%s); use --head-proxy mse",
          s.message()));
    }
  }
  if (o.head_proxy != "none") {  // free, so recorded beside the kl proxy too
    QKV_ASSIGN_OR_RETURN(ReconstructionProxy p,
                         ReconstructionProxy::Create(mc, block, o.k_codecs, o.v_codecs));
    proxy = std::make_unique<ReconstructionProxy>(std::move(p));
  }

  LogitsBaseline baseline;
  baseline.ctx = o.ctx;
  baseline.vocab = mc.vocab_size;
  QKV_ASSIGN_OR_RETURN(Score base_score, ScoreWindows(*engine, 0, windows, nullptr, &baseline, [&] {
                         if (proxy) proxy->FlushWindow();
                       }));
  engine.reset();
  const double base_seconds = SecondsSince(start);
  if (o.progress) o.progress("base", 1, 1);

  // Enough pool for one window of the widest codec (fp32), per cache.
  const int64_t row_bytes = mc.n_layers * 2 * mc.n_kv_heads * mc.head_dim * 4;
  const auto pool_bytes = [&](int64_t ctx) { return (ctx + 2 * block) * row_bytes + (1 << 20); };

  // One layer's K or V at a time. A candidate equal to the base's codec needs no run.
  std::vector<RunConfig> configs;
  std::vector<std::vector<int>> run_of(layers.size());  // [layer idx][kv * n + codec] -> run
  for (size_t li = 0; li < layers.size(); ++li) {
    const LayerKvPolicy& lp = policy.ForLayer(layers[li]);
    for (int kv = 0; kv < 2; ++kv) {
      const std::vector<std::string>& names = kv == 0 ? o.k_codecs : o.v_codecs;
      for (size_t c = 0; c < names.size(); ++c) {
        const std::string canon = kernels::ParseKvCodecSpec(names[c])->ToString();
        if (canon == (kv == 0 ? lp.k : lp.v).ToString()) {
          run_of[li].push_back(-1);
          continue;
        }
        run_of[li].push_back(static_cast<int>(configs.size()));
        configs.push_back({.spec = absl::StrFormat("%s,%d.%s=%s", base_spec, layers[li],
                                                   kv == 0 ? "k" : "v", names[c]),
                           .layer = layers[li],
                           .kv = kv,
                           .codec = c});
      }
    }
  }
  const auto layer_start = Clock::now();
  QKV_ASSIGN_OR_RETURN(
      std::vector<Score> scores,
      RunConfigs(make_engine, configs, windows, baseline, pool_bytes(o.ctx), o, "layers"));
  const double layer_seconds = SecondsSince(layer_start);

  KvSensitivity s;
  s.base = base_spec;
  s.n_layers = mc.n_layers;
  s.n_kv_heads = mc.n_kv_heads;
  s.head_dim = mc.head_dim;
  s.block = block;
  s.ctx = o.ctx;
  s.chunks = static_cast<int64_t>(windows.size());
  s.tokens_scored = base_score.n;
  s.baseline_ppl = base_score.ppl();
  s.baseline_mean_nll = base_score.nll_sum / std::max<int64_t>(1, base_score.n);
  s.head_proxy = o.head_proxy == "none" ? "" : o.head_proxy;
  for (size_t li = 0; li < layers.size(); ++li) {
    KvLayerSensitivity l;
    l.layer = layers[li];
    size_t slot = 0;
    for (int kv = 0; kv < 2; ++kv) {
      const std::vector<std::string>& names = kv == 0 ? o.k_codecs : o.v_codecs;
      for (size_t c = 0; c < names.size(); ++c, ++slot) {
        const int run = run_of[li][slot];
        Score sc = base_score;
        if (run >= 0) {
          sc = scores[run];
        } else {
          sc.kl_sum = 0;
          sc.agree = sc.n;
        }
        KvSensitivityMeasure m{.codec = names[c],
                               .bits_per_element = bits[kv][c],
                               .ppl = sc.ppl(),
                               .dppl = sc.ppl() - s.baseline_ppl,
                               .dppl_pct = 100.0 * (sc.ppl() / s.baseline_ppl - 1),
                               .kl = sc.kl(),
                               .top1 = sc.top1()};
        (kv == 0 ? l.k : l.v).push_back(std::move(m));
      }
    }
    s.layers.push_back(std::move(l));
  }

  // Per-head KL on the proxy windows, against the base on the same windows.
  double head_seconds = 0;
  int64_t head_runs = 0, proxy_scored = 0;
  std::vector<Score> head_scores;
  std::vector<RunConfig> head_configs;
  if (o.head_proxy == "kl") {
    const auto head_start = Clock::now();
    const int64_t proxy_available = static_cast<int64_t>(tokens.size()) / o.proxy_ctx;
    const auto proxy_windows =
        CutWindows(tokens, o.proxy_ctx, std::min(o.proxy_chunks, proxy_available), o.bos_id);
    EngineConfig pc;
    pc.kv_spec = base_spec;
    pc.max_chunk_tokens = o.proxy_ctx;
    pc.pack_weights = false;
    QKV_ASSIGN_OR_RETURN(std::unique_ptr<Engine> pe, make_engine(pc));
    LogitsBaseline proxy_base;
    QKV_ASSIGN_OR_RETURN(Score pb, ScoreWindows(*pe, 0, proxy_windows, nullptr, &proxy_base));
    proxy_scored = pb.n;
    pe.reset();
    for (int64_t l : layers) {
      for (int64_t h = 0; h < mc.n_kv_heads; ++h) {
        for (int kv = 0; kv < 2; ++kv) {
          const std::vector<std::string>& names = kv == 0 ? o.k_codecs : o.v_codecs;
          for (size_t c = 0; c < names.size(); ++c) {
            head_configs.push_back({.spec = absl::StrFormat("%s,%d.h%d.%s=%s", base_spec, l, h,
                                                            kv == 0 ? "k" : "v", names[c]),
                                    .layer = l,
                                    .head = h,
                                    .kv = kv,
                                    .codec = c});
          }
        }
      }
    }
    QKV_ASSIGN_OR_RETURN(head_scores, RunConfigs(make_engine, head_configs, proxy_windows,
                                                 proxy_base, pool_bytes(o.proxy_ctx), o, "heads"));
    head_runs = static_cast<int64_t>(head_configs.size());
    head_seconds = SecondsSince(head_start);
  }
  if (o.head_proxy != "none") {
    size_t next = 0;
    for (size_t li = 0; li < layers.size(); ++li) {
      KvLayerSensitivity& l = s.layers[li];
      for (int64_t h = 0; h < mc.n_kv_heads; ++h) {
        KvHeadSensitivity hs;
        hs.head = h;
        for (int kv = 0; kv < 2; ++kv) {
          const std::vector<std::string>& names = kv == 0 ? o.k_codecs : o.v_codecs;
          for (size_t c = 0; c < names.size(); ++c) {
            KvHeadMeasure m{.codec = names[c]};
            if (proxy) m.mse = proxy->RelError(l.layer, h, kv, c);
            if (!head_scores.empty()) m.kl = std::max(0.0, head_scores[next++].kl());
            (kv == 0 ? hs.k : hs.v).push_back(std::move(m));
          }
        }
        l.heads.push_back(std::move(hs));
      }
    }
  }

  // How well each proxy (summed over a layer's heads) ranks layers like the full runs.
  nlohmann::json spearman = nlohmann::json::object();
  auto rank_report = [&](const std::string& name, auto proxy_of) {
    nlohmann::json r = nlohmann::json::object();
    double sum_dppl = 0, sum_kl = 0;
    int count = 0;
    for (int kv = 0; kv < 2; ++kv) {
      const std::vector<std::string>& names = kv == 0 ? o.k_codecs : o.v_codecs;
      for (size_t c = 0; c < names.size(); ++c) {
        std::vector<double> p, dppl, kl;
        for (const KvLayerSensitivity& l : s.layers) {
          const KvSensitivityMeasure& m = (kv == 0 ? l.k : l.v)[c];
          p.push_back(proxy_of(l, kv, c));
          dppl.push_back(m.dppl);
          kl.push_back(m.kl);
        }
        const double rd = SpearmanRho(p, dppl), rk = SpearmanRho(p, kl);
        r[kv == 0 ? "k" : "v"][names[c]] = {{"vs_dppl", rd}, {"vs_kl", rk}};
        sum_dppl += rd;
        sum_kl += rk;
        ++count;
      }
    }
    r["mean_vs_dppl"] = sum_dppl / count;
    r["mean_vs_kl"] = sum_kl / count;
    spearman[name] = r;
  };
  if (proxy) {
    rank_report("mse", [&](const KvLayerSensitivity& l, int kv, size_t c) {
      return proxy->RelError(l.layer, -1, kv, c);
    });
  }
  if (o.head_proxy == "kl") {
    rank_report("kl", [&](const KvLayerSensitivity& l, int kv, size_t c) {
      double sum = 0;
      for (const KvHeadSensitivity& h : l.heads) sum += (kv == 0 ? h.k : h.v)[c].kl;
      return sum;
    });
  }
  // The full KL against the full ΔPPL: how much of any disagreement is ΔPPL's own noise.
  rank_report("full_kl", [&](const KvLayerSensitivity& l, int kv, size_t c) {
    return (kv == 0 ? l.k : l.v)[c].kl;
  });

  s.seconds = SecondsSince(start);
  nlohmann::json report = {
      {"spearman", spearman},
      {"spearman_note",
       "rank correlation over the measured layers between each proxy (summed over a layer's "
       "heads; full_kl: the layer's own full-run KL) and the full runs' dppl and kl"},
      {"runs", {{"layers", configs.size()}, {"heads", head_runs}}},
      {"seconds", {{"base", base_seconds}, {"layers", layer_seconds}, {"heads", head_seconds}}},
      {"proxy_ctx", o.head_proxy == "kl" ? o.proxy_ctx : 0},
      {"proxy_tokens_scored", proxy_scored}};
  s.report_json = report.dump();
  return s;
}

}  // namespace quantkv
