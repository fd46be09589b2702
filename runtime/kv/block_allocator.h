// Pure bookkeeping for the paged KV cache: which physical blocks are free, and how many
// sequences share each one (prefix sharing). Knows nothing about what a block stores.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace quantkv {

class BlockAllocator {
 public:
  explicit BlockAllocator(int32_t n_blocks);

  // RESOURCE_EXHAUSTED when no block is free.
  absl::StatusOr<int32_t> Allocate();
  // Another owner for an allocated block.
  absl::Status Retain(int32_t block);
  // Drops one owner; the block is free again when the last one goes.
  absl::Status Release(int32_t block);

  int32_t num_blocks() const { return static_cast<int32_t>(ref_counts_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t ref_count(int32_t block) const { return ref_counts_.at(block); }

 private:
  absl::Status CheckAllocated(int32_t block, const char* op) const;
  std::vector<int32_t> free_;  // a stack: recently freed blocks are reused first (warm)
  std::vector<int32_t> ref_counts_;
};

}  // namespace quantkv
