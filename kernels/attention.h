// Attention of query rows over one layer of a sequence's paged KV cache. The cache is seen
// through a non-owning view (block table + pool base pointers, as flashinfer's paged_kv_t),
// so the kernel never copies the cache and dequantizes elements as it reads them.
#pragma once

#include <cstdint>

#include "kernels/thread_pool.h"

namespace quantkv::kernels {

// How K or V elements are stored inside a block. Quantized codecs join this list.
enum class KvStorage : uint8_t { kF32, kF16 };

int64_t KvStorageBytes(KvStorage s);  // bytes per element

// One layer of one sequence. Block layout: [kv_head][token_in_block][head_dim].
struct PagedKvLayerView {
  KvStorage k_storage = KvStorage::kF16;
  KvStorage v_storage = KvStorage::kF16;
  int64_t block_tokens = 16;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t n_tokens = 0;            // valid tokens of the sequence
  const int32_t* block_table = nullptr;  // logical block -> physical block id
  const uint8_t* k_base = nullptr;       // physical block b's K data at k_base + b * k_block_bytes
  const uint8_t* v_base = nullptr;
  int64_t k_block_bytes = 0;
  int64_t v_block_bytes = 0;
};

struct AttentionQuery {
  const float* q = nullptr;           // [n_q][n_heads][head_dim], RoPE already applied
  int64_t n_q = 0;
  int64_t n_heads = 0;
  const int32_t* positions = nullptr;  // causal: query i sees cache tokens 0..positions[i]
  float scale = 0.0f;                  // usually 1/sqrt(head_dim)
};

// out: [n_q][n_heads][head_dim]. Query heads map to KV heads in contiguous groups (GQA).
void PagedAttention(const AttentionQuery& query, const PagedKvLayerView& kv, float* out,
                    ThreadPool* pool);

}  // namespace quantkv::kernels
