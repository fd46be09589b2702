// ||a - b|| / ||b|| over two equally long float vectors: how far a run's logits are from a
// reference's, one number per comparison.
#pragma once

#include <cmath>
#include <vector>

namespace quantkv::testing {

inline double RelativeL2Error(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0, norm = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    err += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    norm += static_cast<double>(b[i]) * b[i];
  }
  return a.size() != b.size() ? INFINITY : std::sqrt(err / norm);
}

}  // namespace quantkv::testing
