// Attention of query rows over one layer of a sequence's KV cache, seen through a
// non-owning view (in the spirit of flashinfer's paged_kv_t): full blocks encoded by a
// codec and addressed through a block table, plus the tokens kept in full precision —
// the first `sink_tokens` (attention sinks) and a ring of the most recent ones (the
// window and the not yet full tail block). Each query sees the cache exactly as decode
// would at its position, so a prefill-scored token reads the same values as a decoded one.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/kv_codec.h"
#include "kernels/kv_slab_format.h"
#include "kernels/rope.h"
#include "kernels/thread_pool.h"

namespace quantkv::kernels {

// Element type of the full-precision (protected) token storage.
enum class KvStorage : uint8_t { kF32, kF16 };

int64_t KvStorageBytes(KvStorage s);  // bytes per element

// K or V of the encoded blocks of one layer: head h of physical block p is the slab at
// base + p * block_bytes + slab_offsets[h], stored by codecs[h]. Heads may use different
// codecs (mixed precision per head; static scales differ per head).
struct KvSlabs {
  const KvCodec* const* codecs = nullptr;  // [n_kv_heads]
  const int64_t* slab_offsets = nullptr;   // [n_kv_heads], bytes from the block start
  const uint8_t* base = nullptr;
  int64_t block_bytes = 0;  // all heads

  // A negative id -1 - f is floor block f (see KvLayerView::k_floor): the same arithmetic.
  const uint8_t* Slab(int32_t block, int64_t h) const {
    const int64_t id = block >= 0 ? block : -1 - static_cast<int64_t>(block);
    return base + id * block_bytes + slab_offsets[h];
  }
};

struct KvLayerView {
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_tokens = 0;
  int64_t n_tokens = 0;  // tokens in the cache for this layer

  // Encoded blocks: logical block b is physical block_table[b] for b < n_blocks.
  KvSlabs k, v;
  const int32_t* block_table = nullptr;
  int64_t n_blocks = 0;
  // Blocks re-encoded to lower precision under memory pressure (KvCache::Requantize): a
  // block_table entry -1 - f is block f of these slabs (two share one physical block of
  // k/v). has_floor is true when some block of this view is one.
  KvSlabs k_floor, v_floor;
  bool has_floor = false;
  // The slabs that hold logical block b's K (kv = 0) or V.
  const KvSlabs& SlabsOf(int kv, int64_t b) const {
    return block_table[b] >= 0 ? (kv ? v : k) : (kv ? v_floor : k_floor);
  }
  // Pre-RoPE key quantization: encoded keys are stored before the rotary embedding, and a
  // key row decoded for token t is rotated to position t with this table before use.
  // nullptr: encoded keys are stored rotated, like the protected ones always are.
  const RopeTable* k_pre_rope = nullptr;
  // Rotated storage (kernels/hadamard.h): encoded K / V rows are stored Hadamard-rotated
  // with these signs [head_dim] and rotated back after decoding. nullptr: not rotated.
  const float* k_rotation = nullptr;
  const float* v_rotation = nullptr;

  // Protected tokens, rows of [n_kv_heads][head_dim] elements of `storage`.
  KvStorage storage = KvStorage::kF16;
  const uint8_t* k_ring = nullptr;  // token t at row t % ring_tokens
  const uint8_t* v_ring = nullptr;
  int64_t ring_tokens = 0;
  const uint8_t* k_sinks = nullptr;  // token t < sink_tokens at row t
  const uint8_t* v_sinks = nullptr;
  int64_t sink_tokens = 0;
  int64_t window_tokens = 0;
  // Page selection (Quest): [n_kv_heads][n_blocks], nonzero where that KV head's queries
  // skip the encoded tokens of logical block b (sinks and ring tokens are always read).
  // nullptr: every block is read.
  const uint8_t* skip_blocks = nullptr;
};

// True when the query at position p skips token t of KV head h: t is read from an encoded
// block (not a sink, before RingStart(p)) that skip_blocks marks.
inline bool SkipsToken(const KvLayerView& v, int64_t h, int64_t p, int64_t t);

// Where the query at position p reads token t from: sinks for t < min(sink_tokens, p+1);
// the ring for t >= RingStart(view, p); encoded blocks in between.
int64_t RingStart(const KvLayerView& view, int64_t p);

inline bool SkipsToken(const KvLayerView& v, int64_t h, int64_t p, int64_t t) {
  return v.skip_blocks != nullptr && t >= v.sink_tokens && t < RingStart(v, p) &&
         v.skip_blocks[h * v.n_blocks + t / v.block_tokens] != 0;
}

struct AttentionQuery {
  const float* q = nullptr;  // [n_q][n_heads][head_dim], RoPE already applied
  int64_t n_q = 0;
  int64_t n_heads = 0;
  const int32_t* positions = nullptr;  // causal: query i sees tokens 0..positions[i]
  float scale = 0.0f;                  // usually 1/sqrt(head_dim)
  // Few queries (decode) may take the fused decode kernels, which read codes directly, or
  // score product-quantized keys by table lookup; both round differently from the tiled
  // kernel. false keeps every call on the tiled kernel, so that a token scored in a prefill
  // chunk gets bit for bit what decode gives it.
  bool fused_decode = true;
  // The thread count that decides how long contexts are split (flash-decoding); 0: the
  // pool's. A caller running several Attention calls side by side without a pool passes the
  // pool size, so each call computes exactly what it would on the whole pool.
  int split_threads = 0;
  // Optional output [n_q][n_heads]: each row's log-sum-exp of its (scaled) scores over the
  // tokens it attended, so that exp(score - lse) is a token's attention probability
  // (kernels/attention_mass.h). nullptr: not computed.
  float* lse = nullptr;
};

// out: [n_q][n_heads][head_dim]. Query heads map to KV heads in contiguous groups (GQA).
void Attention(const AttentionQuery& query, const KvLayerView& kv, float* out, ThreadPool* pool);

namespace cuda {
// The device counterpart of KvLayerView for a batch of sequences: one layer's encoded
// blocks (one format for all K heads, one for all V heads) in a pool addressed by physical
// block id, and each sequence's block table and protected rows (kernels/kv_encode.h). A
// query at position p reads token t exactly where KvLayerView says (RingStart above): sinks
// for t < min(sink_tokens, p + 1), the ring for t >= RingStart(p), encoded blocks between.
struct DeviceKvLayer {
  KvSlabFormat k_format, v_format;
  // Head h of physical block b: k_base + b * block_stride + h * k_format.slab_bytes (and V's).
  const uint8_t* k_base = nullptr;
  const uint8_t* v_base = nullptr;
  int64_t block_stride = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_tokens = 0;
  int64_t ring_tokens = 0;
  int64_t sink_tokens = 0;
  int64_t window_tokens = 0;
  KvStorage storage = KvStorage::kF16;  // of the protected rows
};

// One sequence of the batch as this layer sees it (device pointers).
struct DeviceSeqKv {
  const int32_t* block_table = nullptr;  // physical ids of its full blocks
  int64_t n_blocks = 0;                  // encoded blocks (KvLayerView::n_blocks)
  int64_t n_tokens = 0;                  // tokens in the cache, this step's included
  const uint8_t* k_ring = nullptr;       // rows as KvProtectedRows
  const uint8_t* v_ring = nullptr;
  const uint8_t* k_sinks = nullptr;
  const uint8_t* v_sinks = nullptr;
};

struct DeviceAttentionBatch {
  const float* q = nullptr;            // [rows][n_heads][head_dim], RoPE applied
  const int32_t* positions = nullptr;  // [rows]: row r sees tokens 0..positions[r]
  const int32_t* row_seq = nullptr;    // [rows]: index into seqs
  const DeviceSeqKv* seqs = nullptr;   // device array
  int64_t rows = 0;
  int64_t n_heads = 0;
  float scale = 0.0f;
  // Longest context of any row (max positions[r] + 1): sizes the flash-decoding split.
  int64_t max_context = 0;
  float* out = nullptr;  // [rows][n_heads][head_dim]
  // Flash-decoding partials (PagedAttentionWorkspaceBytes); device memory.
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

// Bytes of workspace PagedAttention needs for this many rows, heads and longest context.
int64_t PagedAttentionWorkspaceBytes(int64_t rows, int64_t n_heads, int64_t head_dim,
                                     int64_t max_context);

// Attention of every row over its sequence: the context split over thread blocks
// (flash-decoding) and merged by exact log-sum-exp; each K/V element read once per GQA
// group; codes decoded in registers. `stream` a cudaStream_t.
absl::Status PagedAttention(const DeviceKvLayer& kv, const DeviceAttentionBatch& batch,
                            void* stream);
}  // namespace cuda

}  // namespace quantkv::kernels
