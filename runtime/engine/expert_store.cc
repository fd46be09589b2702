#include "runtime/engine/expert_store.h"

#include "absl/strings/str_format.h"
#include "kernels/dequantize.h"
#include "kernels/quantize.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
absl::StatusOr<std::unique_ptr<ExpertStore>> ExpertStore::Build(
    const std::vector<std::vector<ExpertMatrices>>& experts, const ExpertStoreConfig& config,
    kernels::ThreadPool* pool) {
  if (config.levels.empty()) {
    return absl::InvalidArgumentError("expert precision: no levels given");
  }
  for (kernels::GgmlType t : config.levels) {
    if (!kernels::CanQuantizeTo(t)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "expert precision: cannot hold experts as %s (F32, F16, Q8_0, Q4_0, Q4_1)",
          kernels::GgmlTypeInfoOf(t).name));
    }
  }
  auto s = std::unique_ptr<ExpertStore>(new ExpertStore());
  s->config_ = config;
  s->n_layers_ = static_cast<int64_t>(experts.size());
  s->n_experts_ = experts.empty() ? 0 : static_cast<int64_t>(experts[0].size());
  const int L = static_cast<int>(config.levels.size());
  s->copies_.resize(static_cast<size_t>(s->n_layers_ * s->n_experts_ * L));
  std::vector<float> f;
  for (int64_t l = 0; l < s->n_layers_; ++l) {
    if (static_cast<int64_t>(experts[l].size()) != s->n_experts_) {
      return absl::InvalidArgumentError("expert precision: layers have different expert counts");
    }
    for (int64_t e = 0; e < s->n_experts_; ++e) {
      const ExpertMatrices& src = experts[l][e];
      const kernels::WeightMatrix* parts[3] = {&src.gate, &src.up, &src.down};
      for (int p = 0; p < 3; ++p) {
        const kernels::WeightMatrix& m = *parts[p];
        f.resize(static_cast<size_t>(m.rows * m.cols));
        QKV_RETURN_IF_ERROR(kernels::DequantizeRows(m.type, m.data, f.data(), m.rows, m.cols));
        for (int lv = 0; lv < L; ++lv) {
          Copy& c = s->copies_[(l * s->n_experts_ + e) * L + lv];
          const kernels::GgmlType t = config.levels[lv];
          QKV_ASSIGN_OR_RETURN(const int64_t rb, kernels::GgmlRowBytes(t, m.cols));
          c.bytes[p].resize(static_cast<size_t>(m.rows * rb));
          absl::Status status = absl::OkStatus();
          auto quantize_rows = [&](int64_t r0, int64_t r1, int) {
            for (int64_t r = r0; r < r1; ++r) {
              absl::Status q = kernels::QuantizeRow(t, f.data() + r * m.cols,
                                                    c.bytes[p].data() + r * rb, m.cols);
              if (!q.ok()) status = q;  // every row fails alike (the width); keep any one
            }
          };
          if (pool != nullptr) {
            pool->ParallelFor(m.rows, quantize_rows, 16);
          } else {
            quantize_rows(0, m.rows, 0);
          }
          if (!status.ok()) {
            return absl::Status(status.code(),
                                absl::StrFormat("expert precision: layer %d expert %d: %s", l, e,
                                                status.message()));
          }
          kernels::WeightMatrix w{t, c.bytes[p].data(), m.rows, m.cols};
          if (config.pack && kernels::CanPackWeights(t, config.activations)) {
            QKV_ASSIGN_OR_RETURN(c.packed[p], kernels::PackWeights(w, config.activations));
            w.packed = c.packed[p].get();
          }
          (p == 0 ? c.m.gate : p == 1 ? c.m.up : c.m.down) = w;
        }
      }
    }
  }
  return s;
}

int64_t ExpertStore::Bytes(int64_t layer, int64_t expert, int level) const {
  const ExpertMatrices& m = At(layer, expert, level);
  return kernels::WeightBytes(m.gate) + kernels::WeightBytes(m.up) + kernels::WeightBytes(m.down);
}

double ExpertStore::RelativeError(int64_t layer, int64_t expert, int level, int reference) const {
  const ExpertMatrices& a = At(layer, expert, level);
  const ExpertMatrices& b = At(layer, expert, reference);
  double err = 0, norm = 0;
  std::vector<float> fa, fb;
  for (auto [x, y] : {std::pair{&a.gate, &b.gate}, {&a.up, &b.up}, {&a.down, &b.down}}) {
    const size_t n = static_cast<size_t>(x->rows * x->cols);
    fa.resize(n);
    fb.resize(n);
    if (!kernels::DequantizeRows(x->type, x->data, fa.data(), x->rows, x->cols).ok() ||
        !kernels::DequantizeRows(y->type, y->data, fb.data(), y->rows, y->cols).ok()) {
      return 0;
    }
    for (size_t i = 0; i < n; ++i) {
      err += static_cast<double>(fa[i] - fb[i]) * (fa[i] - fb[i]);
      norm += static_cast<double>(fb[i]) * fb[i];
    }
  }
  return norm > 0 ? err / norm : 0;
}

std::vector<std::vector<int64_t>> ExpertStore::LevelBytes() const {
  std::vector<std::vector<int64_t>> out;
  for (int64_t l = 0; l < n_layers_; ++l) {
    for (int64_t e = 0; e < n_experts_; ++e) {
      std::vector<int64_t> b;
      for (int lv = 0; lv < n_levels(); ++lv) b.push_back(Bytes(l, e, lv));
      out.push_back(std::move(b));
    }
  }
  return out;
}

}  // namespace quantkv
