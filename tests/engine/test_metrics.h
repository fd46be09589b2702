// Error measures shared by the kernel and cache tests.
#pragma once

#include <cmath>
#include <vector>

namespace quantkv::testing {

// ||a - ref|| / ||ref|| over all elements.
inline double RelError(const std::vector<float>& a, const std::vector<float>& ref) {
  double e = 0, n = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    e += (a[i] - ref[i]) * (a[i] - ref[i]);
    n += ref[i] * ref[i];
  }
  return std::sqrt(e / n);
}

}  // namespace quantkv::testing
