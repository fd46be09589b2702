#include "runtime/engine/attn_correction_fit.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_format.h"

// LAPACK (OpenBLAS ships it): Cholesky factor and solve, and selected eigenpairs of a
// symmetric matrix. Column-major; the trailing arguments are Fortran's hidden string lengths.
extern "C" {
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info, size_t);
void dpotrs_(const char* uplo, const int* n, const int* nrhs, const double* a, const int* lda,
             double* b, const int* ldb, int* info, size_t);
void dsyevr_(const char* jobz, const char* range, const char* uplo, const int* n, double* a,
             const int* lda, const double* vl, const double* vu, const int* il, const int* iu,
             const double* abstol, int* m, double* w, double* z, const int* ldz, int* isuppz,
             double* work, const int* lwork, int* iwork, const int* liwork, int* info, size_t,
             size_t, size_t);
}

namespace quantkv {

AttnCorrectionStats::AttnCorrectionStats(int64_t n_layers, int64_t dim, std::vector<int64_t> layers)
    : n_layers_(n_layers), dim_(dim), layers_(static_cast<size_t>(n_layers)) {
  if (layers.empty()) {
    for (int64_t l = 0; l < n_layers; ++l) layers.push_back(l);
  }
  const size_t d = static_cast<size_t>(dim);
  for (int64_t l : layers) {
    if (l < 0 || l >= n_layers) continue;
    Layer& L = layers_[l];
    L.sx.assign(d, 0.0);
    L.sr.assign(d, 0.0);
    L.sxx.assign(d * d, 0.0);
    L.sxr.assign(d * d, 0.0);
  }
}

bool AttnCorrectionStats::collects(int64_t layer) const {
  return layer >= 0 && layer < n_layers_ && !layers_[layer].sx.empty();
}

int64_t AttnCorrectionStats::rows(int64_t layer) const {
  return collects(layer) ? layers_[layer].n : 0;
}

void AttnCorrectionStats::Add(int64_t layer, int64_t n, const float* x, const float* y) {
  if (!collects(layer) || n <= 0) return;
  Layer& L = layers_[layer];
  const int64_t d = dim_;
  xbuf_.resize(static_cast<size_t>(n * d));
  rbuf_.resize(static_cast<size_t>(n * d));
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * d;
    const float* yi = y + i * d;
    bool finite = true;
    for (int64_t j = 0; j < d && finite; ++j) finite = std::isfinite(xi[j]) && std::isfinite(yi[j]);
    if (!finite) continue;
    double* xo = xbuf_.data() + kept * d;
    double* ro = rbuf_.data() + kept * d;
    for (int64_t j = 0; j < d; ++j) {
      xo[j] = xi[j];
      ro[j] = static_cast<double>(yi[j]) - xi[j];
      L.sx[j] += xo[j];
      L.sr[j] += ro[j];
      L.srr += ro[j] * ro[j];
      L.syy += static_cast<double>(yi[j]) * yi[j];
    }
    ++kept;
  }
  if (kept == 0) return;
  const int di = static_cast<int>(d), ki = static_cast<int>(kept);
  // Σ x xᵀ and Σ x rᵀ over the batch: X is [kept][d] row-major, so Xᵀ X is a "Trans" product.
  cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, di, ki, 1.0, xbuf_.data(), di, 1.0,
              L.sxx.data(), di);
  cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, di, di, ki, 1.0, xbuf_.data(), di,
              rbuf_.data(), di, 1.0, L.sxr.data(), di);
  L.n += kept;
}

absl::StatusOr<LowRankAdapter> AttnCorrectionStats::Fit(
    int64_t layer, const AttnCorrectionFitOptions& options) const {
  if (!collects(layer)) {
    return absl::InvalidArgumentError(absl::StrFormat("layer %d was not collected", layer));
  }
  const Layer& L = layers_[layer];
  if (L.n < 2) {
    return absl::FailedPreconditionError(
        absl::StrFormat("layer %d: %d rows, too few to fit a correction", layer, L.n));
  }
  if (options.rank < 1 || !(options.ridge >= 0)) {
    return absl::InvalidArgumentError("fit: rank must be >= 1 and ridge >= 0");
  }
  const int64_t d = dim_;
  const size_t dd = static_cast<size_t>(d * d);
  const double inv_n = 1.0 / static_cast<double>(L.n);
  std::vector<double> mx(d), mr(d);
  for (int64_t j = 0; j < d; ++j) {
    mx[j] = L.sx[j] * inv_n;
    mr[j] = L.sr[j] * inv_n;
  }
  // Centred covariances; the matrices are symmetric, so row- and column-major agree.
  std::vector<double> cxx(dd), cxr(dd);
  double trace = 0;
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = i; j < d; ++j) {
      const double v = L.sxx[i * d + j] * inv_n - mx[i] * mx[j];
      cxx[i * d + j] = cxx[j * d + i] = v;
    }
    trace += cxx[i * d + i];
    for (int64_t j = 0; j < d; ++j) cxr[i * d + j] = L.sxr[i * d + j] * inv_n - mx[i] * mr[j];
  }
  const double lambda = options.ridge * std::max(trace / static_cast<double>(d), 1e-30);
  std::vector<double> chol = cxx;
  for (int64_t i = 0; i < d; ++i) chol[i * d + i] += lambda;
  const int n = static_cast<int>(d);
  int info = 0;
  dpotrf_("U", &n, chol.data(), &n, &info, 1);
  if (info != 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "layer %d: the covariance of the attention outputs is singular at ridge %g; raise "
        "--ridge",
        layer, options.ridge));
  }
  // Solve (Cxx + λI) M = Cxr. LAPACK reads the right-hand side column-major, i.e. our
  // row-major Cxr as its transpose: transpose in, solve, and M comes back column-major.
  std::vector<double> m(dd);
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j < d; ++j) m[j * d + i] = cxr[i * d + j];
  }
  dpotrs_("U", &n, &n, chol.data(), &n, m.data(), &n, &info, 1);
  if (info != 0)
    return absl::InternalError(absl::StrFormat("layer %d: dpotrs info %d", layer, info));
  // m is column-major M: M[i][j] = m[j * d + i]. Row-major Mr for the products below.
  std::vector<double> mr_rm(dd);
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j < d; ++j) mr_rm[i * d + j] = m[j * d + i];
  }
  // P = Mᵀ Cxx M, the covariance of the predicted residuals.
  std::vector<double> cm(dd), p(dd);
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0, cxx.data(), n, mr_rm.data(),
              n, 0.0, cm.data(), n);
  cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, n, n, 1.0, mr_rm.data(), n, cm.data(), n,
              0.0, p.data(), n);
  const int r = static_cast<int>(std::min<int64_t>(options.rank, d));
  const int il = n - r + 1, iu = n;
  const double zero = 0, abstol = 0;
  int found = 0;
  std::vector<double> w(d), z(static_cast<size_t>(d) * r);
  std::vector<int> isuppz(2 * static_cast<size_t>(d));
  double work_query = 0;
  int iwork_query = 0, lwork = -1, liwork = -1;
  dsyevr_("V", "I", "U", &n, p.data(), &n, &zero, &zero, &il, &iu, &abstol, &found, w.data(),
          z.data(), &n, isuppz.data(), &work_query, &lwork, &iwork_query, &liwork, &info, 1, 1, 1);
  lwork = static_cast<int>(work_query);
  liwork = iwork_query;
  std::vector<double> work(std::max(1, lwork));
  std::vector<int> iwork(std::max(1, liwork));
  dsyevr_("V", "I", "U", &n, p.data(), &n, &zero, &zero, &il, &iu, &abstol, &found, w.data(),
          z.data(), &n, isuppz.data(), work.data(), &lwork, iwork.data(), &liwork, &info, 1, 1, 1);
  if (info != 0 || found != r) {
    return absl::InternalError(absl::StrFormat(
        "layer %d: eigendecomposition failed (info %d, %d of %d)", layer, info, found, r));
  }
  // z is column-major [d][r]: W[j][k] = z[k * d + j]. A = (M W)ᵀ, B = W.
  LowRankAdapter out;
  out.in = out.out = d;
  out.rank = r;
  out.scale = 1.0f;
  out.a.resize(static_cast<size_t>(r * d));
  out.b.resize(static_cast<size_t>(d * r));
  out.bias.resize(static_cast<size_t>(d));
  std::vector<double> mw(static_cast<size_t>(d) * r);  // row-major [d][r]
  std::vector<double> w_rm(static_cast<size_t>(d) * r);
  for (int64_t j = 0; j < d; ++j) {
    for (int k = 0; k < r; ++k) w_rm[j * r + k] = z[k * d + j];
  }
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, r, n, 1.0, mr_rm.data(), n, w_rm.data(),
              r, 0.0, mw.data(), r);
  std::vector<double> amx(r, 0.0);  // A mean(x)
  for (int k = 0; k < r; ++k) {
    for (int64_t i = 0; i < d; ++i) {
      out.a[k * d + i] = static_cast<float>(mw[i * r + k]);
      amx[k] += mw[i * r + k] * mx[i];
    }
  }
  for (int64_t j = 0; j < d; ++j) {
    double bam = 0;
    for (int k = 0; k < r; ++k) {
      out.b[j * r + k] = static_cast<float>(w_rm[j * r + k]);
      bam += w_rm[j * r + k] * amx[k];
    }
    out.bias[j] = static_cast<float>(mr[j] - bam);
  }
  return out;
}

AttnCorrectionError AttnCorrectionStats::Evaluate(int64_t layer, const LowRankAdapter& c) const {
  AttnCorrectionError e;
  if (!collects(layer)) return e;
  const Layer& L = layers_[layer];
  e.rows = L.n;
  e.uncorrected = L.srr;
  e.reference = L.syy;
  e.corrected = L.srr;
  if (c.empty() || L.n == 0) return e;
  // With G = s Aᵀ Bᵀ (x-row convention: prediction x G + b) and r the residual:
  //   Σ |r - x G - b|² = Σ|r|² - 2 tr(Gᵀ Sxr) - 2 b·Σr + tr(Gᵀ Sxx G) + 2 b·(Gᵀ Σx) + n |b|².
  const int64_t d = dim_, rk = c.rank;
  std::vector<double> g(static_cast<size_t>(d * d), 0.0);  // row-major G[i][j]
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t k = 0; k < rk; ++k) {
      const double aki = static_cast<double>(c.scale) * c.a[k * d + i];
      if (aki == 0) continue;
      for (int64_t j = 0; j < d; ++j) g[i * d + j] += aki * c.b[j * rk + k];
    }
  }
  std::vector<double> sxx(L.sxx);  // full symmetric from the upper triangle
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j < i; ++j) sxx[i * d + j] = sxx[j * d + i];
  }
  std::vector<double> sg(static_cast<size_t>(d * d));
  const int n = static_cast<int>(d);
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0, sxx.data(), n, g.data(), n,
              0.0, sg.data(), n);
  double tr_gsg = 0, tr_gsxr = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    tr_gsg += g[i] * sg[i];
    tr_gsxr += g[i] * L.sxr[i];
  }
  double b_sr = 0, b_gsx = 0, bb = 0;
  for (int64_t j = 0; j < d; ++j) {
    const double b = c.bias.empty() ? 0.0 : c.bias[j];
    double gsx = 0;
    for (int64_t i = 0; i < d; ++i) gsx += g[i * d + j] * L.sx[i];
    b_sr += b * L.sr[j];
    b_gsx += b * gsx;
    bb += b * b;
  }
  e.corrected = std::max(
      0.0, L.srr - 2 * tr_gsxr - 2 * b_sr + tr_gsg + 2 * b_gsx + static_cast<double>(L.n) * bb);
  return e;
}

}  // namespace quantkv
