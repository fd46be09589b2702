#include "runtime/kv/paged_kv_cache.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "absl/strings/str_format.h"
#include "kernels/dequantize.h"

namespace quantkv {

absl::StatusOr<std::unique_ptr<PagedKvCache>> PagedKvCache::Create(const KvCacheConfig& c) {
  if (c.n_layers <= 0 || c.n_kv_heads <= 0 || c.head_dim <= 0 || c.block_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KV cache: layers %d, kv heads %d, head_dim %d, block tokens %d must all be positive",
        c.n_layers, c.n_kv_heads, c.head_dim, c.block_tokens));
  }
  const int64_t elem = kernels::KvStorageBytes(KvFormatStorage(c.format));
  const int64_t block_bytes = c.n_kv_heads * c.block_tokens * c.head_dim * elem;
  const int64_t per_block_all_layers = 2 * c.n_layers * block_bytes;
  const int64_t n_blocks = c.max_bytes / per_block_all_layers;
  if (n_blocks < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KV cache: budget of %d bytes holds no block (one block of %d tokens needs %d bytes)",
        c.max_bytes, c.block_tokens, per_block_all_layers));
  }
  if (n_blocks > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("KV cache: budget needs more than 2^31 blocks");
  }
  const size_t pool_bytes = static_cast<size_t>(n_blocks * per_block_all_layers);
  // Anonymous, lazily backed memory: a large budget costs only the pages that get written.
  void* pool = ::mmap(nullptr, pool_bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (pool == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("KV cache: cannot reserve %d bytes", pool_bytes));
  }
  return std::unique_ptr<PagedKvCache>(new PagedKvCache(
      c, static_cast<int32_t>(n_blocks), block_bytes, static_cast<uint8_t*>(pool), pool_bytes));
}

PagedKvCache::PagedKvCache(const KvCacheConfig& config, int32_t n_blocks, int64_t block_bytes,
                           uint8_t* pool, size_t pool_bytes)
    : config_(config),
      allocator_(n_blocks),
      block_bytes_(block_bytes),
      pool_(pool),
      pool_bytes_(pool_bytes) {}

PagedKvCache::~PagedKvCache() { ::munmap(pool_, pool_bytes_); }

uint8_t* PagedKvCache::Pool(int64_t layer, int kv) const {
  return pool_ + (layer * 2 + kv) * static_cast<int64_t>(allocator_.num_blocks()) * block_bytes_;
}

absl::Status PagedKvCache::Reserve(SequenceBlocks& seq, int64_t n_tokens) {
  const int64_t need = (n_tokens + config_.block_tokens - 1) / config_.block_tokens;
  const size_t had = seq.blocks.size();
  while (static_cast<int64_t>(seq.blocks.size()) < need) {
    absl::StatusOr<int32_t> b = allocator_.Allocate();
    if (!b.ok()) {
      for (size_t i = had; i < seq.blocks.size(); ++i) (void)allocator_.Release(seq.blocks[i]);
      seq.blocks.resize(had);
      return absl::ResourceExhaustedError(absl::StrFormat(
          "KV cache full: %d tokens need %d blocks of %d tokens, %d blocks in the pool (%d "
          "tokens); raise the KV budget or shorten the context",
          n_tokens, need, config_.block_tokens, allocator_.num_blocks(), capacity_tokens()));
    }
    seq.blocks.push_back(*b);
  }
  return absl::OkStatus();
}

void PagedKvCache::Free(SequenceBlocks& seq) {
  for (int32_t b : seq.blocks) (void)allocator_.Release(b);
  seq.blocks.clear();
  seq.length = 0;
}

void PagedKvCache::Write(const SequenceBlocks& seq, int64_t layer, int64_t pos, int64_t n,
                         const float* k, const float* v) {
  const int64_t d = config_.head_dim;
  const int64_t row = config_.n_kv_heads * d;
  const int64_t bt = config_.block_tokens;
  const bool f16 = config_.format == KvFormat::kF16;
  const int64_t elem = f16 ? 2 : 4;
  for (int kv = 0; kv < 2; ++kv) {
    uint8_t* pool = Pool(layer, kv);
    const float* src = kv == 0 ? k : v;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t p = pos + t;
      uint8_t* block = pool + static_cast<int64_t>(seq.blocks[p / bt]) * block_bytes_;
      for (int64_t h = 0; h < config_.n_kv_heads; ++h) {
        uint8_t* dst = block + ((h * bt + p % bt) * d) * elem;
        const float* s = src + t * row + h * d;
        if (f16) {
          kernels::Fp32ToFp16Row(s, reinterpret_cast<uint16_t*>(dst), d);
        } else {
          std::memcpy(dst, s, d * sizeof(float));
        }
      }
    }
  }
}

kernels::PagedKvLayerView PagedKvCache::View(const SequenceBlocks& seq, int64_t layer,
                                             int64_t n_tokens) const {
  kernels::PagedKvLayerView view;
  view.k_storage = view.v_storage = KvFormatStorage(config_.format);
  view.block_tokens = config_.block_tokens;
  view.n_kv_heads = config_.n_kv_heads;
  view.head_dim = config_.head_dim;
  view.n_tokens = n_tokens;
  view.block_table = seq.blocks.data();
  view.k_base = Pool(layer, 0);
  view.v_base = Pool(layer, 1);
  view.k_block_bytes = view.v_block_bytes = block_bytes_;
  return view;
}

int64_t PagedKvCache::bytes_per_token() const {
  return 2 * config_.n_layers * block_bytes_ / config_.block_tokens;
}

double PagedKvCache::bits_per_element() const { return KvFormatBitsPerElement(config_.format); }

}  // namespace quantkv
