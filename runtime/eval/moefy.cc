#include "runtime/eval/moefy.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "absl/strings/str_format.h"
#include "kernels/dequantize.h"
#include "kernels/matmul.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

// Balanced spherical k-means of the rows of f [n x d] (unit norm) into k clusters of n / k.
std::vector<int32_t> BalancedKMeans(const std::vector<float>& f, int64_t n, int64_t d, int64_t k,
                                    int iterations, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t cap = n / k;
  // k-means++ seeding on cosine distance.
  std::vector<float> cent(static_cast<size_t>(k * d));
  std::vector<double> best(n, 2.0);
  auto dot = [&](const float* a, const float* b) {
    double s = 0;
    for (int64_t j = 0; j < d; ++j) s += static_cast<double>(a[j]) * b[j];
    return s;
  };
  int64_t first = std::uniform_int_distribution<int64_t>(0, n - 1)(rng);
  std::copy(f.begin() + first * d, f.begin() + (first + 1) * d, cent.begin());
  for (int64_t c = 1; c < k; ++c) {
    double total = 0;
    for (int64_t i = 0; i < n; ++i) {
      best[i] = std::min(best[i], 1.0 - dot(f.data() + i * d, cent.data() + (c - 1) * d));
      total += std::max(best[i], 0.0);
    }
    double r = std::uniform_real_distribution<double>(0, total)(rng);
    int64_t pick = n - 1;
    for (int64_t i = 0; i < n; ++i) {
      r -= std::max(best[i], 0.0);
      if (r <= 0) {
        pick = i;
        break;
      }
    }
    std::copy(f.begin() + pick * d, f.begin() + (pick + 1) * d, cent.begin() + c * d);
  }
  std::vector<int32_t> assign(n, 0);
  std::vector<std::pair<double, int64_t>> pairs(static_cast<size_t>(n * k));
  for (int it = 0; it < iterations; ++it) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t c = 0; c < k; ++c) {
        pairs[i * k + c] = {-dot(f.data() + i * d, cent.data() + c * d), i * k + c};
      }
    }
    std::sort(pairs.begin(), pairs.end());
    std::vector<int64_t> size(k, 0);
    std::vector<uint8_t> done(n, 0);
    for (const auto& [neg, ic] : pairs) {
      const int64_t i = ic / k, c = ic % k;
      if (done[i] || size[c] == cap) continue;
      done[i] = 1;
      assign[i] = static_cast<int32_t>(c);
      ++size[c];
    }
    std::fill(cent.begin(), cent.end(), 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < d; ++j) cent[assign[i] * d + j] += f[i * d + j];
    }
    for (int64_t c = 0; c < k; ++c) {
      const double norm = std::sqrt(dot(cent.data() + c * d, cent.data() + c * d));
      if (norm > 0) {
        for (int64_t j = 0; j < d; ++j)
          cent[c * d + j] = static_cast<float>(cent[c * d + j] / norm);
      }
    }
  }
  return assign;
}

// Solves (A + lambda I') w = b for symmetric positive definite A [n x n] (I' leaves the last
// coordinate, the bias, unregularised) for m right-hand sides b [n x m], by Cholesky.
absl::Status RidgeSolve(std::vector<double> a, int64_t n, double lambda, std::vector<double>& b,
                        int64_t m) {
  for (int64_t i = 0; i + 1 < n; ++i) a[i * n + i] += lambda;
  for (int64_t j = 0; j < n; ++j) {
    double s = a[j * n + j];
    for (int64_t k = 0; k < j; ++k) s -= a[j * n + k] * a[j * n + k];
    if (!(s > 0)) return absl::InternalError("moefy: the router's normal equations are singular");
    const double l = std::sqrt(s);
    a[j * n + j] = l;
    for (int64_t i = j + 1; i < n; ++i) {
      double t = a[i * n + j];
      for (int64_t k = 0; k < j; ++k) t -= a[i * n + k] * a[j * n + k];
      a[i * n + j] = t / l;
    }
  }
  for (int64_t c = 0; c < m; ++c) {
    for (int64_t i = 0; i < n; ++i) {  // L y = b
      double t = b[i * m + c];
      for (int64_t k = 0; k < i; ++k) t -= a[i * n + k] * b[k * m + c];
      b[i * m + c] = t / a[i * n + i];
    }
    for (int64_t i = n - 1; i >= 0; --i) {  // Lᵀ w = y
      double t = b[i * m + c];
      for (int64_t k = i + 1; k < n; ++k) t -= a[k * n + i] * b[k * m + c];
      b[i * m + c] = t / a[i * n + i];
    }
  }
  return absl::OkStatus();
}

// The top-k indices of v[0..E) (ties: lower index).
std::vector<int> TopK(const double* v, int64_t E, int64_t k) {
  std::vector<int> o(E);
  std::iota(o.begin(), o.end(), 0);
  std::stable_sort(o.begin(), o.end(), [v](int a, int b) { return v[a] > v[b]; });
  o.resize(k);
  return o;
}

}  // namespace

absl::StatusOr<MoeSplit> FitMoeSplit(
    const std::function<absl::StatusOr<std::unique_ptr<Engine>>(const EngineConfig&)>& make_engine,
    std::span<const int32_t> tokens, const MoefyOptions& o, MoefyReport* report) {
  if (o.n_experts < 2 || o.top_k < 1 || o.top_k > o.n_experts || o.ctx < 2 || o.max_tokens < 8 ||
      o.kmeans_iterations < 1 || !(o.ridge >= 0)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "moefy: --experts %d (>= 2), --top-k %d (1..experts), --ctx %d, --tokens %d (>= 8) and "
        "the ridge %g are out of range",
        o.n_experts, o.top_k, o.ctx, o.max_tokens, o.ridge));
  }
  const int64_t T = std::min<int64_t>(o.max_tokens, static_cast<int64_t>(tokens.size()));
  if (T < 64) {
    return absl::InvalidArgumentError(
        absl::StrFormat("moefy: the text has %d tokens; at least 64 are needed", tokens.size()));
  }
  // 1. Activations of the dense model.
  std::vector<std::vector<float>> xs, acts;
  int64_t H = 0, I = 0;
  EngineConfig ec;
  ec.max_chunk_tokens = o.ctx;
  ec.kv_spec = "fp16";
  std::unique_ptr<Engine> engine;
  ec.mlp_observer = [&](int64_t layer, int64_t n, const float* x, const float* a) {
    xs[layer].insert(xs[layer].end(), x, x + n * H);
    acts[layer].insert(acts[layer].end(), a, a + n * I);
  };
  {
    QKV_ASSIGN_OR_RETURN(engine, make_engine(ec));
    const ModelConfig& c = engine->model_config();
    if (c.moe.enabled()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "moefy: %s is already a mixture-of-experts model", engine->weights().origin()));
    }
    if (o.shared_neurons < 0 || o.shared_neurons >= c.intermediate ||
        (c.intermediate - o.shared_neurons) % o.n_experts != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "moefy: --experts %d does not divide the MLP's %d neurons less --shared-neurons %d",
          o.n_experts, c.intermediate, o.shared_neurons));
    }
    H = c.hidden;
    I = c.intermediate;
    xs.resize(c.n_layers);
    acts.resize(c.n_layers);
    for (int64_t pos = 0; pos < T; pos += o.ctx) {
      const int64_t n = std::min<int64_t>(o.ctx, T - pos);
      const SequenceId seq = engine->NewSequence();
      std::vector<float> logits;
      QKV_RETURN_IF_ERROR(engine->Forward(seq, tokens.subspan(pos, n), false, &logits));
      QKV_RETURN_IF_ERROR(engine->Release(seq));
    }
  }
  const ModelConfig& c = engine->model_config();
  const int64_t E = o.n_experts, S = o.shared_neurons, Ie = (I - S) / E;
  const int64_t fit = T * 3 / 4, held = T - fit;
  MoeSplit split;
  split.n_layers = c.n_layers;
  split.hidden = H;
  split.intermediate = I;
  split.n_experts = E;
  split.top_k = o.top_k;
  split.shared = S;
  if (report != nullptr) {
    report->fit_tokens = fit;
    report->heldout_tokens = held;
    report->layers.assign(c.n_layers, {});
  }
  kernels::MatMulOptions sgemm;
  sgemm.activations = kernels::ActivationPrecision::kFloat32;
  sgemm.gemm_min_rows = 1;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const std::vector<float>& X = xs[l];
    const std::vector<float>& A = acts[l];
    const WeightTensor* down = engine->weights().Find(absl::StrFormat("blk.%d.ffn_down.weight", l));
    if (down == nullptr) return absl::NotFoundError("moefy: the model has no ffn_down weights");
    std::vector<float> D(static_cast<size_t>(H * I));
    QKV_RETURN_IF_ERROR(kernels::DequantizeRows(down->type, down->data, D.data(), H, I));
    // Shared neurons: the S that contribute most on average, mean |a_j| x ||W_down[:, j]||.
    std::vector<int32_t> neurons, rest;
    {
      std::vector<std::pair<double, int32_t>> importance(static_cast<size_t>(I));
      for (int64_t j = 0; j < I; ++j) {
        double a = 0, w = 0;
        for (int64_t t = 0; t < fit; ++t) a += std::fabs(A[t * I + j]);
        for (int64_t r = 0; r < H; ++r) w += static_cast<double>(D[r * I + j]) * D[r * I + j];
        importance[j] = {-a * std::sqrt(w), static_cast<int32_t>(j)};
      }
      std::sort(importance.begin(), importance.end());
      for (int64_t i = 0; i < I; ++i) (i < S ? neurons : rest).push_back(importance[i].second);
      std::sort(neurons.begin(), neurons.end());
      std::sort(rest.begin(), rest.end());
    }
    // 2. Clustering of the other neurons on |a| over (up to 1024 of) the fit tokens, each
    // neuron's row normalised.
    const int64_t d = std::min<int64_t>(fit, 1024);
    const int64_t R = static_cast<int64_t>(rest.size());
    std::vector<float> feat(static_cast<size_t>(R * d));
    for (int64_t i = 0; i < R; ++i) {
      const int64_t j = rest[i];
      double norm = 0;
      for (int64_t t = 0; t < d; ++t) {
        const float v = std::fabs(A[t * (fit / d) * I + j]);
        feat[i * d + t] = v;
        norm += static_cast<double>(v) * v;
      }
      const float inv = norm > 0 ? static_cast<float>(1.0 / std::sqrt(norm)) : 0.0f;
      for (int64_t t = 0; t < d; ++t) feat[i * d + t] *= inv;
    }
    const std::vector<int32_t> assign =
        BalancedKMeans(feat, R, d, E, o.kmeans_iterations, o.seed + static_cast<uint64_t>(l));
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t i = 0; i < R; ++i) {
        if (assign[i] == e) neurons.push_back(rest[i]);
      }
    }
    // 3. Each expert's contribution for every token: out_e = A[:, S_e] · W_down[:, S_e]ᵀ.
    std::vector<double> norms(static_cast<size_t>(T * E));
    std::vector<float> out_all(static_cast<size_t>(held * E * H));  // held-out contributions
    std::vector<float> De(static_cast<size_t>(H * Ie)), Ae(static_cast<size_t>(T * Ie)),
        out(static_cast<size_t>(T * H));
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t r = 0; r < H; ++r) {
        for (int64_t i = 0; i < Ie; ++i) De[r * Ie + i] = D[r * I + neurons[S + e * Ie + i]];
      }
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < Ie; ++i) Ae[t * Ie + i] = A[t * I + neurons[S + e * Ie + i]];
      }
      const kernels::WeightMatrix W{kernels::GgmlType::kF32,
                                    reinterpret_cast<const uint8_t*>(De.data()), H, Ie};
      QKV_RETURN_IF_ERROR(kernels::MatMul(W, Ae.data(), T, out.data(), nullptr, sgemm));
      for (int64_t t = 0; t < T; ++t) {
        double s = 0;
        for (int64_t j = 0; j < H; ++j) s += static_cast<double>(out[t * H + j]) * out[t * H + j];
        norms[t * E + e] = std::sqrt(s);
        if (t >= fit) {
          std::copy(out.begin() + t * H, out.begin() + (t + 1) * H,
                    out_all.begin() + ((t - fit) * E + e) * H);
        }
      }
    }
    // The shared neurons' part of the held-out outputs, for the report's dense output.
    std::vector<float> shared_out;
    if (S > 0 && report != nullptr) {
      std::vector<float> Ds(static_cast<size_t>(H * S)), As(static_cast<size_t>(held * S));
      for (int64_t r = 0; r < H; ++r) {
        for (int64_t i = 0; i < S; ++i) Ds[r * S + i] = D[r * I + neurons[i]];
      }
      for (int64_t t = fit; t < T; ++t) {
        for (int64_t i = 0; i < S; ++i) As[(t - fit) * S + i] = A[t * I + neurons[i]];
      }
      shared_out.resize(static_cast<size_t>(held * H));
      const kernels::WeightMatrix W{kernels::GgmlType::kF32,
                                    reinterpret_cast<const uint8_t*>(Ds.data()), H, S};
      QKV_RETURN_IF_ERROR(kernels::MatMul(W, As.data(), held, shared_out.data(), nullptr, sgemm));
    }
    // Ridge regression on [x, 1] over the fit tokens, all experts at once.
    const int64_t n = H + 1;
    std::vector<double> xtx(static_cast<size_t>(n * n), 0.0), xty(static_cast<size_t>(n * E), 0.0);
    std::vector<double> row(n);
    for (int64_t t = 0; t < fit; ++t) {
      for (int64_t j = 0; j < H; ++j) row[j] = X[t * H + j];
      row[H] = 1.0;
      for (int64_t i = 0; i < n; ++i) {
        const double ri = row[i];
        double* a = xtx.data() + i * n;
        for (int64_t j = 0; j <= i; ++j) a[j] += ri * row[j];
        for (int64_t e = 0; e < E; ++e) xty[i * E + e] += ri * norms[t * E + e];
      }
    }
    double diag = 0;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < i; ++j) xtx[j * n + i] = xtx[i * n + j];
      if (i < H) diag += xtx[i * n + i];
    }
    QKV_RETURN_IF_ERROR(RidgeSolve(xtx, n, o.ridge * diag / H, xty, E));
    std::vector<float> router(static_cast<size_t>(E * H)), bias(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t j = 0; j < H; ++j) router[e * H + j] = static_cast<float>(xty[j * E + e]);
      bias[e] = static_cast<float>(xty[H * E + e]);
    }
    // The report, on held-out tokens.
    if (report != nullptr) {
      MoefyLayerReport& r = report->layers[l];
      double ss_res = 0, ss_tot = 0, mean = 0, hits = 0, err = 0, oerr = 0, ref = 0;
      for (int64_t t = fit; t < T; ++t) {
        for (int64_t e = 0; e < E; ++e) mean += norms[t * E + e];
      }
      mean /= static_cast<double>(held * E);
      std::vector<double> pred(E);
      for (int64_t t = fit; t < T; ++t) {
        for (int64_t e = 0; e < E; ++e) {
          double p = bias[e];
          for (int64_t j = 0; j < H; ++j)
            p += static_cast<double>(router[e * H + j]) * X[t * H + j];
          pred[e] = p;
          const double y = norms[t * E + e];
          ss_res += (y - p) * (y - p);
          ss_tot += (y - mean) * (y - mean);
        }
        const std::vector<int> chosen = TopK(pred.data(), E, o.top_k);
        const std::vector<int> oracle = TopK(norms.data() + t * E, E, o.top_k);
        for (int e : chosen) hits += std::count(oracle.begin(), oracle.end(), e);
        const float* contrib = out_all.data() + (t - fit) * E * H;
        for (int64_t j = 0; j < H; ++j) {
          double dense = S > 0 ? shared_out[(t - fit) * H + j] : 0.0;
          double routed = dense, best = dense;
          for (int64_t e = 0; e < E; ++e) dense += contrib[e * H + j];
          for (int e : chosen) routed += contrib[e * H + j];
          for (int e : oracle) best += contrib[e * H + j];
          err += (routed - dense) * (routed - dense);
          oerr += (best - dense) * (best - dense);
          ref += dense * dense;
        }
      }
      r.router_r2 = ss_tot > 0 ? 1.0 - ss_res / ss_tot : 0.0;
      r.oracle_recall = hits / static_cast<double>(held * o.top_k);
      r.routed_rel_err = ref > 0 ? std::sqrt(err / ref) : 0.0;
      r.oracle_rel_err = ref > 0 ? std::sqrt(oerr / ref) : 0.0;
    }
    split.neurons.push_back(std::move(neurons));
    split.router.push_back(std::move(router));
    split.router_bias.push_back(std::move(bias));
    std::vector<float>().swap(xs[l]);  // free as we go
    std::vector<float>().swap(acts[l]);
    if (o.progress) o.progress(l);
  }
  split.notes["note.source"] = c.name;
  split.notes["note.fit_tokens"] = absl::StrFormat("%d", fit);
  QKV_RETURN_IF_ERROR(CheckMoeSplit(split));
  return split;
}

}  // namespace quantkv
