// Inputs and expected results shared by the collective tests (MPI: tp_collectives_test, TCP:
// tcp_comm_test): data whose sums show their order in the bits, and uneven all-to-all counts.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace quantkv::testing {

// Rank r's n values over six decades (the order of a sum shows in its bits).
inline std::vector<float> RankData(int r, int64_t n, uint32_t seed) {
  std::mt19937 rng(seed * 131 + r);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int> exp(-3, 3);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = std::ldexp(nd(rng), 3 * exp(rng));
  return x;
}

// Element i of the sum over ranks 0..size-1 in that order, in float: what the collectives
// promise, written out independently of SumGatheredInRankOrder.
inline std::vector<float> RankOrderedSum(int size, int64_t n, uint32_t seed) {
  std::vector<float> sum = RankData(0, n, seed);
  for (int r = 1; r < size; ++r) {
    const std::vector<float> x = RankData(r, n, seed);
    for (int64_t i = 0; i < n; ++i) sum[i] = sum[i] + x[i];
  }
  return sum;
}

// All-to-all byte counts, uneven and with zeros: rank p sends nothing to rank (p + 1) % size.
inline int64_t Count(int from, int to, int size, int64_t scale) {
  if (size > 1 && to == (from + 1) % size) return 0;
  return ((from * 7 + to * 3) % 5 + 1) * scale + from;
}

// Byte i of what rank `from` sends rank `to`.
inline uint8_t Byte(int from, int to, int64_t i) {
  return static_cast<uint8_t>(from * 31 + to * 7 + i);
}

}  // namespace quantkv::testing
