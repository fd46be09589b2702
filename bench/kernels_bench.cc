// Google Benchmark microbenchmarks of the hot kernels, with bytes processed so the output
// reads as GB/s against the machine's bandwidth.
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "kernels/ggml_types.h"
#include "kernels/matmul.h"

namespace quantkv::kernels {
namespace {

void BM_MatVec(benchmark::State& state, GgmlType type, ActivationPrecision act,
               int64_t gemm_min_rows = INT64_MAX, bool packed = false) {
  const int64_t rows = state.range(0), cols = state.range(1);
  const int64_t row_bytes = *GgmlRowBytes(type, cols);
  std::vector<uint8_t> w(rows * row_bytes);
  std::mt19937 rng(1);
  for (auto& b : w) b = static_cast<uint8_t>(rng());
  // Keep the fp16 scales finite: zero the high byte of every block's first half.
  const auto& info = GgmlTypeInfoOf(type);
  for (size_t b = 0; b < w.size(); b += info.type_size) w[b + 1] = w[b + 3] = 0x20;
  // 4th argument: activation rows (batched decode); the counter reports
  // multiply-accumulates per second, which is what bounds a batch.
  const int64_t m = state.range(3);
  std::vector<float> x(cols * m), y(rows * m);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.5f + 0.001f * static_cast<float>(i % 97);
  ThreadPool pool(static_cast<int>(state.range(2)));
  WeightMatrix matrix{type, w.data(), rows, cols};
  std::unique_ptr<PackedWeights> pack;
  if (packed) {
    auto p = PackWeights(matrix, act);
    if (!p.ok()) {
      state.SkipWithError(std::string(p.status().message()).c_str());
      return;
    }
    pack = std::move(*p);
    matrix.packed = pack.get();
  }
  for (auto _ : state) {
    (void)MatMul(matrix, x.data(), m, y.data(), &pool,
                 {.activations = act, .gemm_min_rows = gemm_min_rows});
    benchmark::DoNotOptimize(y.data());
  }
  state.SetBytesProcessed(state.iterations() * rows * row_bytes);
  state.counters["GMAC/s"] =
      benchmark::Counter(static_cast<double>(state.iterations() * rows * cols * m) * 1e-9,
                         benchmark::Counter::kIsRate);
  state.SetLabel(MatMulIsa());
}

constexpr auto kInt8 = ActivationPrecision::kInt8;
constexpr auto kF32 = ActivationPrecision::kFloat32;
BENCHMARK_CAPTURE(BM_MatVec, q4_1_int8, GgmlType::kQ4_1, kInt8)
    ->Args({1536, 576, 1, 1})
    ->Args({49152, 576, 1, 1})
    ->Args({49152, 576, 2, 1})
    ->Args({1536, 576, 1, 4})
    ->Args({1536, 576, 1, 16});
BENCHMARK_CAPTURE(BM_MatVec, q4_1_packed, GgmlType::kQ4_1, kInt8, INT64_MAX, true)
    ->Args({1536, 576, 1, 1})
    ->Args({1536, 576, 1, 4})
    ->Args({1536, 576, 1, 16})
    ->Args({49152, 576, 1, 1})
    ->Args({49152, 576, 2, 1})
    ->Args({1536, 576, 2, 16});
BENCHMARK_CAPTURE(BM_MatVec, q4_1_sgemm, GgmlType::kQ4_1, kInt8, 8)->Args({1536, 576, 1, 16});
BENCHMARK_CAPTURE(BM_MatVec, q8_0_int16_rows, GgmlType::kQ8_0, ActivationPrecision::kInt16)
    ->Args({49152, 576, 1, 16});
BENCHMARK_CAPTURE(BM_MatVec, q8_0_int16_packed, GgmlType::kQ8_0, ActivationPrecision::kInt16,
                  INT64_MAX, true)
    ->Args({49152, 576, 1, 1})
    ->Args({49152, 576, 1, 16});
BENCHMARK_CAPTURE(BM_MatVec, q4_1_f32, GgmlType::kQ4_1, kF32)->Args({49152, 576, 1, 1});
BENCHMARK_CAPTURE(BM_MatVec, q8_0_int8, GgmlType::kQ8_0, kInt8)
    ->Args({49152, 576, 1, 1})
    ->Args({49152, 576, 2, 1});
BENCHMARK_CAPTURE(BM_MatVec, q8_0_f32, GgmlType::kQ8_0, kF32)->Args({49152, 576, 1, 1});
BENCHMARK_CAPTURE(BM_MatVec, q8_0_int16, GgmlType::kQ8_0, ActivationPrecision::kInt16)
    ->Args({49152, 576, 1, 1});
BENCHMARK_CAPTURE(BM_MatVec, q4_0_int8, GgmlType::kQ4_0, kInt8)->Args({49152, 576, 1, 1});

}  // namespace
}  // namespace quantkv::kernels

BENCHMARK_MAIN();
