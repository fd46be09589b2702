// A read-only memory map of a whole file; weights are used in place from the map.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace quantkv {

class MappedFile {
 public:
  enum class Mode {
    kMap,       // map the file's pages (shared page cache, 4 KiB pages)
    kHugeCopy,  // read into anonymous memory backed by transparent huge pages: streaming
                // ~100 MB of weights per token then takes far fewer TLB misses
  };
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path,
                                                          Mode mode = Mode::kMap);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size, size_t mapped)
      : path_(std::move(path)), data_(data), size_(size), mapped_(mapped) {}
  std::string path_;
  const uint8_t* data_;
  size_t size_;
  size_t mapped_;  // length of the mapping (rounded up for huge pages)
};

}  // namespace quantkv
