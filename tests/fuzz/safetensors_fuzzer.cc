// libFuzzer entry point for the safetensors parser: no crash, errors name the file, and an
// accepted file's tensors lie inside the buffer, do not overlap, and match shape x dtype.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <vector>

#include "runtime/model/safetensors.h"

namespace {

volatile uint64_t g_sink;
constexpr char kName[] = "fuzz.safetensors";

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "safetensors_fuzzer: contract violated: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto parsed = quantkv::SafetensorsFile::Parse(std::span<const uint8_t>(data, size), kName);
  if (!parsed.ok()) {
    if (parsed.status().message().find(kName) == std::string_view::npos) {
      std::fprintf(stderr, "%s\n", std::string(parsed.status().message()).c_str());
      Fail("error message does not name the file");
    }
    return 0;
  }
  const quantkv::SafetensorsFile& f = **parsed;
  uint64_t sink = 0;
  std::vector<std::pair<const uint8_t*, int64_t>> ranges;
  for (const quantkv::SafetensorsTensor& t : f.tensors()) {
    if (f.Find(t.name) != &t) Fail("Find does not return the tensor");
    int64_t n = 1;
    for (int64_t d : t.shape) {
      if (d < 0) Fail("negative dim");
      n *= d;  // bounded: the parser checked the product for overflow
    }
    if (n != t.n_elements) Fail("n_elements != product of shape");
    const int64_t elem = t.type == quantkv::kernels::GgmlType::kF32 ? 4 : 2;
    if (t.n_bytes != n * elem) Fail("n_bytes != n_elements x dtype size");
    if (t.data < data || static_cast<size_t>(t.n_bytes) > size ||
        static_cast<size_t>(t.data - data) > size - static_cast<size_t>(t.n_bytes)) {
      Fail("tensor data outside the buffer");
    }
    if (t.n_bytes > 0) sink += t.data[0] + t.data[t.n_bytes - 1];
    ranges.emplace_back(t.data, t.n_bytes);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i - 1].first + ranges[i - 1].second > ranges[i].first) Fail("tensors overlap");
  }
  for (const auto& [k, v] : f.metadata()) sink += k.size() + v.size();
  g_sink = sink;  // keeps the reads above from being optimised away
  return 0;
}
