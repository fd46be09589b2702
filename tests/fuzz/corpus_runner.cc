// A deterministic stand-in for libFuzzer that runs in every build: feeds each corpus file,
// then seeded mutations of it (bit flips, interesting integers, truncations, insertions,
// deletions, chunk copies), to the same LLVMFuzzerTestOneInput the libFuzzer target uses.
// The entry point aborts on a contract violation; this program only has to drive it.
//
//   <runner> CORPUS_DIR [MUTATIONS=20000] [SEED=1]
//
// MUTATIONS is the total, spread evenly over the files (at least one each).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

// splitmix64: tiny, seedable, and the same on every platform.
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t Next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  size_t Below(size_t n) { return n == 0 ? 0 : static_cast<size_t>(Next() % n); }

 private:
  uint64_t s_;
};

// Values that sit on the edges of length and count checks.
constexpr uint64_t kInteresting[] = {
    0,
    1,
    2,
    3,
    7,
    8,
    9,
    31,
    32,
    33,
    63,
    64,
    127,
    128,
    255,
    256,
    4095,
    4096,
    65535,
    65536,
    0x7fffffffull,
    0x80000000ull,
    0xffffffffull,
    0x100000000ull,
    1ull << 40,
    1ull << 50,
    0x7fffffffffffffffull,
    0x8000000000000000ull,
    0xfffffffffffffff0ull,
    0xffffffffffffffffull,
};

void Mutate(std::vector<uint8_t>& b, Rng& rng) {
  const int rounds = 1 + static_cast<int>(rng.Below(3));
  for (int r = 0; r < rounds; ++r) {
    switch (rng.Below(8)) {
      case 0:  // flip a few bits
        if (!b.empty()) {
          for (int i = 0, n = 1 + static_cast<int>(rng.Below(4)); i < n; ++i) {
            b[rng.Below(b.size())] ^= static_cast<uint8_t>(1u << rng.Below(8));
          }
        }
        break;
      case 1:  // a random byte
        if (!b.empty()) b[rng.Below(b.size())] = static_cast<uint8_t>(rng.Next());
        break;
      case 2:  // an interesting 1/2/4/8-byte little-endian integer, often on an aligned slot
        if (!b.empty()) {
          const size_t width = size_t{1} << rng.Below(4);
          size_t pos = rng.Below(b.size());
          if (rng.Below(2) == 0) pos &= ~size_t{3};
          uint64_t v = kInteresting[rng.Below(std::size(kInteresting))];
          if (rng.Below(4) == 0) v += b.size();  // lengths just past the end
          for (size_t i = 0; i < width && pos + i < b.size(); ++i) {
            b[pos + i] = static_cast<uint8_t>(v >> (8 * i));
          }
        }
        break;
      case 3:  // truncate
        b.resize(rng.Below(b.size() + 1));
        break;
      case 4: {  // insert random bytes
        const size_t pos = rng.Below(b.size() + 1);
        std::vector<uint8_t> ins(1 + rng.Below(16));
        for (uint8_t& c : ins) c = static_cast<uint8_t>(rng.Next());
        b.insert(b.begin() + static_cast<std::ptrdiff_t>(pos), ins.begin(), ins.end());
        break;
      }
      case 5:  // delete a range
        if (!b.empty()) {
          const size_t pos = rng.Below(b.size());
          const size_t n = std::min(b.size() - pos, 1 + rng.Below(32));
          b.erase(b.begin() + static_cast<std::ptrdiff_t>(pos),
                  b.begin() + static_cast<std::ptrdiff_t>(pos + n));
        }
        break;
      case 6:  // copy a chunk over another place (duplicates keys, names, headers)
        if (b.size() > 2) {
          const size_t from = rng.Below(b.size());
          const size_t to = rng.Below(b.size());
          const size_t n = std::min({b.size() - from, b.size() - to, 1 + rng.Below(64)});
          const std::vector<uint8_t> chunk(b.begin() + from, b.begin() + from + n);
          std::copy(chunk.begin(), chunk.end(), b.begin() + to);
        }
        break;
      case 7:  // an ASCII byte: hits JSON structure and digits in safetensors headers
        if (!b.empty()) {
          static constexpr char kJson[] = "{}[]\",:0123456789-.eE ntfu\\";
          b[rng.Below(b.size())] = static_cast<uint8_t>(kJson[rng.Below(sizeof(kJson) - 1)]);
        }
        break;
    }
  }
}

// Feeds an exact-size heap copy (a vector's spare capacity would hide reads past the end
// from AddressSanitizer).
void Run(const std::vector<uint8_t>& b) {
  std::unique_ptr<uint8_t[]> exact(new uint8_t[std::max<size_t>(b.size(), 1)]);
  std::copy(b.begin(), b.end(), exact.get());
  LLVMFuzzerTestOneInput(exact.get(), b.size());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR [MUTATIONS] [SEED]\n", argv[0]);
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  const long total = argc > 2 ? std::strtol(argv[2], nullptr, 10) : 20000;
  const uint64_t seed = argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 1;
  std::vector<std::filesystem::path> files;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    if (e.is_regular_file()) files.push_back(e.path());
  }
  if (ec || files.empty()) {
    std::fprintf(stderr, "%s: no corpus files (%s)\n", dir.c_str(), ec.message().c_str());
    return 1;
  }
  std::sort(files.begin(), files.end());  // directory order is not deterministic
  const auto start = std::chrono::steady_clock::now();
  size_t runs = 0;
  Rng rng(seed);
  const long n_files = static_cast<long>(files.size());
  for (long k = 0; k < n_files; ++k) {
    const auto& path = files[k];
    const long mutations = std::max(1L, total / n_files + (k < total % n_files ? 1 : 0));
    std::ifstream in(path, std::ios::binary);
    const std::vector<uint8_t> original((std::istreambuf_iterator<char>(in)),
                                        std::istreambuf_iterator<char>());
    Run(original);
    ++runs;
    for (long i = 0; i < mutations; ++i) {
      std::vector<uint8_t> b = original;
      Mutate(b, rng);
      Run(b);
      ++runs;
    }
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr, "%zu inputs from %zu files in %.2f s, no crash\n", runs, files.size(), secs);
  return 0;
}
