// Device storage of the paged KV cache: one pool of fixed-size blocks per (layer, K|V),
// indexed by the physical block ids of a BlockAllocator. Block metadata (tables, lengths)
// lives with the owner of the sequence (SequenceBlocks), apart from this storage.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/attention.h"
#include "runtime/kv/block_allocator.h"
#include "runtime/kv/kv_format.h"

namespace quantkv {

struct KvCacheConfig {
  int64_t n_layers = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_tokens = 16;
  KvFormat format = KvFormat::kF16;
  int64_t max_bytes = int64_t{1} << 30;  // pool budget; sets the number of blocks
};

// A sequence's block table and length; owned by whoever schedules the sequence.
struct SequenceBlocks {
  std::vector<int32_t> blocks;
  int64_t length = 0;  // tokens written
};

class PagedKvCache {
 public:
  static absl::StatusOr<std::unique_ptr<PagedKvCache>> Create(const KvCacheConfig& config);
  ~PagedKvCache();
  PagedKvCache(const PagedKvCache&) = delete;
  PagedKvCache& operator=(const PagedKvCache&) = delete;

  const KvCacheConfig& config() const { return config_; }
  BlockAllocator& allocator() { return allocator_; }
  const BlockAllocator& allocator() const { return allocator_; }

  // Adds blocks to `seq` until it can hold n_tokens; on failure `seq` is unchanged.
  absl::Status Reserve(SequenceBlocks& seq, int64_t n_tokens);
  // Returns all of seq's blocks to the allocator and empties it.
  void Free(SequenceBlocks& seq);

  // Stores K and V rows ([n][n_kv_heads * head_dim] each) for positions [pos, pos + n)
  // of `layer`; the blocks must have been reserved.
  void Write(const SequenceBlocks& seq, int64_t layer, int64_t pos, int64_t n, const float* k,
             const float* v);

  kernels::PagedKvLayerView View(const SequenceBlocks& seq, int64_t layer,
                                 int64_t n_tokens) const;

  int64_t block_bytes() const { return block_bytes_; }  // one of K or V, one layer
  int64_t bytes_per_token() const;                     // all layers, K and V
  double bits_per_element() const;
  int64_t capacity_tokens() const { return allocator_.num_blocks() * config_.block_tokens; }

 private:
  PagedKvCache(const KvCacheConfig& config, int32_t n_blocks, int64_t block_bytes,
               uint8_t* pool, size_t pool_bytes);
  uint8_t* Pool(int64_t layer, int kv) const;

  KvCacheConfig config_;
  BlockAllocator allocator_;
  int64_t block_bytes_;
  uint8_t* pool_;
  size_t pool_bytes_;
};

}  // namespace quantkv
