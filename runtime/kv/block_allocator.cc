#include "runtime/kv/block_allocator.h"

#include "absl/strings/str_format.h"

namespace quantkv {

BlockAllocator::BlockAllocator(int32_t n_blocks) : ref_counts_(std::max(0, n_blocks), 0) {
  free_.reserve(ref_counts_.size());
  for (int32_t b = num_blocks() - 1; b >= 0; --b) free_.push_back(b);
}

absl::StatusOr<int32_t> BlockAllocator::Allocate() {
  if (free_.empty()) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("KV cache: all %d blocks are in use", num_blocks()));
  }
  const int32_t b = free_.back();
  free_.pop_back();
  ref_counts_[b] = 1;
  return b;
}

absl::Status BlockAllocator::CheckAllocated(int32_t block, const char* op) const {
  if (block < 0 || block >= num_blocks()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KV cache: %s of block %d, outside [0, %d)", op, block, num_blocks()));
  }
  if (ref_counts_[block] == 0) {
    return absl::FailedPreconditionError(
        absl::StrFormat("KV cache: %s of block %d, which is free", op, block));
  }
  return absl::OkStatus();
}

absl::Status BlockAllocator::Retain(int32_t block) {
  if (absl::Status s = CheckAllocated(block, "retain"); !s.ok()) return s;
  ++ref_counts_[block];
  return absl::OkStatus();
}

absl::Status BlockAllocator::Release(int32_t block) {
  if (absl::Status s = CheckAllocated(block, "release"); !s.ok()) return s;
  if (--ref_counts_[block] == 0) free_.push_back(block);
  return absl::OkStatus();
}

}  // namespace quantkv
