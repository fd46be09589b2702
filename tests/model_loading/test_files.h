// Helpers shared by the model-loading tests: reading fixtures, scratch directories, and a
// writer for synthetic safetensors files (only for malformed or edge-case inputs; reference
// values always come from the committed fixtures).
#pragma once

#include <stdlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <system_error>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testutil/paths.h"

namespace quantkv::testing {

inline std::filesystem::path ModelFixture(const std::string& name) {
  return FixturePath("models/" + name);
}

inline std::vector<uint8_t> ReadBytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline std::string ReadText(const std::filesystem::path& path) {
  std::vector<uint8_t> b = ReadBytes(path);
  return std::string(b.begin(), b.end());
}

inline nlohmann::json ReadJson(const std::filesystem::path& path) {
  return nlohmann::json::parse(ReadText(path));
}

inline void WriteBytes(const std::filesystem::path& path, const void* data, size_t n) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

inline void WriteText(const std::filesystem::path& path, const std::string& text) {
  WriteBytes(path, text.data(), text.size());
}

// A fresh directory under $TMPDIR, removed with everything in it at scope exit.
class ScratchDir {
 public:
  ScratchDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "quantkv_test_XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) ADD_FAILURE() << "mkdtemp failed";
    path_ = tmpl;
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

// Builds safetensors bytes: tensors are laid out back to back in the order added.
class SafetensorsBuilder {
 public:
  // `bytes` defaults to zeros of the size shape x dtype implies.
  SafetensorsBuilder& Add(const std::string& name, const std::string& dtype,
                          const std::vector<int64_t>& shape, std::vector<uint8_t> bytes = {}) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    const int64_t elem = dtype == "F32" ? 4 : dtype == "I64" ? 8 : dtype == "U8" ? 1 : 2;
    if (bytes.empty()) bytes.assign(static_cast<size_t>(n * elem), 0);
    const size_t begin = data_.size();
    data_.insert(data_.end(), bytes.begin(), bytes.end());
    header_[name] = {{"dtype", dtype}, {"shape", shape}, {"data_offsets", {begin, data_.size()}}};
    return *this;
  }
  nlohmann::json& header() { return header_; }
  std::vector<uint8_t>& data() { return data_; }

  // `pad_to` pads the JSON with spaces to a multiple (transformers uses 8); 1 leaves it as is.
  std::vector<uint8_t> Build(size_t pad_to = 8) const {
    std::string h = header_.dump();
    while (h.size() % pad_to != 0) h.push_back(' ');
    return Raw(h, data_);
  }
  static std::vector<uint8_t> Raw(const std::string& header, const std::vector<uint8_t>& data) {
    // Sized once and filled with memcpy: GCC 12 misreports vector::insert here
    // (-Warray-bounds).
    std::vector<uint8_t> out(8 + header.size() + data.size());
    const uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(n >> (8 * i));
    if (!header.empty()) std::memcpy(out.data() + 8, header.data(), header.size());
    if (!data.empty()) std::memcpy(out.data() + 8 + header.size(), data.data(), data.size());
    return out;
  }
  void WriteTo(const std::filesystem::path& path, size_t pad_to = 8) const {
    std::vector<uint8_t> b = Build(pad_to);
    WriteBytes(path, b.data(), b.size());
  }

 private:
  nlohmann::json header_ = nlohmann::json::object();
  std::vector<uint8_t> data_;
};

}  // namespace quantkv::testing
