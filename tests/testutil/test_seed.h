// A fresh random seed per test process, printed so a failure can be replayed:
// QUANTKV_TEST_SEED=N fixes it.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <random>

namespace quantkv::testing {

inline uint64_t TestSeed() {
  static const uint64_t seed = [] {
    uint64_t s;
    if (const char* e = std::getenv("QUANTKV_TEST_SEED")) {
      s = std::strtoull(e, nullptr, 10);
    } else {
      s = (static_cast<uint64_t>(std::random_device{}()) << 32) | std::random_device{}();
    }
    std::cout << "[ seed ] " << s << " (QUANTKV_TEST_SEED=" << s << " replays)\n";
    return s;
  }();
  return seed;
}

}  // namespace quantkv::testing
