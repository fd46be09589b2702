// Comparison of secrets (API keys, worker tokens) without an early exit, so the time taken
// does not reveal how much of a candidate matched (only the lengths).
#pragma once

#include <string_view>

namespace quantkv {

// True when candidate == expected; always walks expected's full length.
inline bool ConstantTimeEquals(std::string_view candidate, std::string_view expected) {
  volatile unsigned char diff = candidate.size() == expected.size() ? 0 : 1;
  for (size_t i = 0; i < expected.size(); ++i) {
    const unsigned char x = i < candidate.size() ? static_cast<unsigned char>(candidate[i]) : 0;
    diff = diff | (x ^ static_cast<unsigned char>(expected[i]));
  }
  return diff == 0;
}

}  // namespace quantkv
