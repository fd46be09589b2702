// libFuzzer entry point for the GGUF parser. Beyond "no crash", it checks the parser's
// contract: an error names the file, and an accepted file only points inside the buffer.
// Every value is read back, so an out-of-range view shows up under AddressSanitizer.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>

#include "runtime/model/gguf.h"

namespace {

volatile uint64_t g_sink;
constexpr char kName[] = "fuzz.gguf";

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "gguf_fuzzer: contract violated: %s\n", what);
  std::abort();
}

bool Inside(const uint8_t* p, size_t n, const uint8_t* begin, size_t size) {
  return p >= begin && n <= size && static_cast<size_t>(p - begin) <= size - n;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto parsed = quantkv::GgufFile::Parse(std::span<const uint8_t>(data, size), kName);
  if (!parsed.ok()) {
    if (parsed.status().message().find(kName) == std::string_view::npos) {
      std::fprintf(stderr, "%s\n", std::string(parsed.status().message()).c_str());
      Fail("error message does not name the file");
    }
    return 0;
  }
  const quantkv::GgufFile& f = **parsed;
  uint64_t sink = 0;
  for (const quantkv::GgufKv& kv : f.metadata()) {
    if (f.Find(kv.key) != &kv) Fail("Find does not return the entry");
    if (!kv.str.empty()) {
      if (!Inside(reinterpret_cast<const uint8_t*>(kv.str.data()), kv.str.size(), data, size)) {
        Fail("string value outside the buffer");
      }
      sink += static_cast<uint8_t>(kv.str.front()) + static_cast<uint8_t>(kv.str.back());
    }
    for (std::string_view s : kv.strings) {
      if (!s.empty()) {
        if (!Inside(reinterpret_cast<const uint8_t*>(s.data()), s.size(), data, size)) {
          Fail("array string outside the buffer");
        }
        sink += static_cast<uint8_t>(s.front()) + static_cast<uint8_t>(s.back());
      }
    }
    // The typed getters decode array elements; they must stay within the array.
    if (auto a = f.GetIntArray(kv.key); a.ok()) {
      for (int64_t v : *a) sink += static_cast<uint64_t>(v);
    }
    if (auto a = f.GetFloatArray(kv.key); a.ok()) {
      for (double v : *a) sink += static_cast<uint64_t>(v == v);
    }
    sink += f.GetInt(kv.key).ok() + f.GetFloat(kv.key).ok() + f.GetString(kv.key).ok() +
            f.GetBool(kv.key).ok() + f.GetStringArray(kv.key).ok();
  }
  for (const quantkv::GgufTensor& t : f.tensors()) {
    if (f.FindTensor(t.name) != &t) Fail("FindTensor does not return the tensor");
    if (t.n_bytes < 0 || t.n_elements < 0) Fail("negative tensor size");
    if (!Inside(t.data, static_cast<size_t>(t.n_bytes), data, size)) {
      Fail("tensor data outside the buffer");
    }
    if (t.n_bytes > 0) sink += t.data[0] + t.data[t.n_bytes - 1];
    if (t.offset % f.alignment() != 0) Fail("misaligned tensor accepted");
  }
  g_sink = sink;  // keeps the reads above from being optimised away
  return 0;
}
