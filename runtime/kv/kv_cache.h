// Storage of the quantized paged KV cache. Full blocks are encoded by the layer's codec
// (KvPolicy) into a pool of physical blocks, indexed by the ids of a BlockAllocator; one
// id addresses that block in every layer. Tokens that stay in full precision — the
// attention sinks and a ring holding the recent window and the partially filled tail
// block — live with the sequence (SequenceKv), which its owner (engine or scheduler) holds.
// A block is encoded the moment it fills up ("quantized in place" of its ring rows).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/attention.h"
#include "kernels/kv_codec.h"
#include "runtime/kv/block_allocator.h"
#include "runtime/kv/kv_policy.h"

namespace quantkv {

struct KvCacheConfig {
  int64_t n_layers = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  KvPolicy policy;                       // codecs, block size, sinks, window
  int64_t max_bytes = int64_t{1} << 30;  // budget of the encoded-block pool
  // Most tokens one sequence appends in one step (prefill chunk); sizes the ring so every
  // query of a chunk still finds its window and tail in it.
  int64_t max_step_tokens = 512;
  // The model's rotary embedding; needed when policy.pre_rope_keys (keys are un-rotated
  // before encoding and attention re-rotates them). Must outlive the cache.
  const kernels::RopeTable* rope = nullptr;
  // Page selection (Quest): keep, per encoded block, layer and KV head, each key channel's
  // min and max (fp16, as attention sees the keys) for SelectPages. Counted in the block's
  // bytes (2 x head_dim x 2 bytes per head and layer).
  bool page_summaries = false;
  // Elastic precision under memory pressure: the codecs Requantize re-encodes a sequence's
  // oldest blocks to (e.g. 4 -> 2 bits). Its block size, sinks, window, rope= and rotate=
  // must be the policy's, and each layer's K and V slabs must fit in half of the policy's,
  // so that two requantized blocks share one physical block and the other is freed. Not
  // with page_summaries.
  std::optional<KvPolicy> floor;
};

// One sequence's cache state, owned by whoever schedules the sequence.
struct SequenceKv {
  std::vector<int32_t> blocks;  // physical ids of its full (encoded) blocks
  int64_t length = 0;           // tokens written
  std::vector<uint8_t> ring;    // [layer][K|V][ring_tokens][n_kv_heads][head_dim]
  std::vector<uint8_t> sinks;   // [layer][K|V][sink_tokens][n_kv_heads][head_dim]
  // Blocks [0, floor_blocks) are requantized to the floor codecs, in pairs: entries -1 - 2a
  // and -1 - (2a + 1) of `blocks` are the two halves of physical block a.
  int64_t floor_blocks = 0;
  // Retained exact rows (RetainRows): every row written while retain_rows is set, [layer *
  // 2 + kv][token][n_kv_heads][head_dim] in the protected storage's type. Outside the pool
  // budget, like the ring: SnapKV's decision at a prompt's end needs the prompt's exact
  // rows, at the cost of an fp16 copy of the prompt until then.
  bool retain_rows = false;
  std::vector<std::vector<uint8_t>> retained;
};

class KvCache {
 public:
  static absl::StatusOr<std::unique_ptr<KvCache>> Create(const KvCacheConfig& config);
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  const KvCacheConfig& config() const { return config_; }
  const KvPolicy& policy() const { return config_.policy; }
  BlockAllocator& allocator() { return allocator_; }
  const BlockAllocator& allocator() const { return allocator_; }
  int64_t block_tokens() const { return config_.policy.block_tokens; }
  // Rows of a sequence's protected ring (window + a block + the longest step), per layer and
  // K/V; a device copy of the cache (runtime/engine/device_forward.h) uses the same.
  int64_t ring_tokens() const { return ring_tokens_; }

  // Makes room for `seq` to grow to n_tokens: blocks for every block that will be full,
  // and its protected storage. On failure `seq` is unchanged.
  absl::Status Reserve(SequenceKv& seq, int64_t n_tokens);
  // Returns the blocks and protected storage of seq and empties it.
  void Free(SequenceKv& seq);

  // Elastic precision (KvCacheConfig::floor): re-encodes seq's oldest `pairs` pairs of
  // full blocks not yet requantized to the floor codecs, each pair into the first block's
  // storage, and frees the second: one block of the pool per pair. Blocks shared with
  // another sequence are not touched. Returns the pairs done (at most
  // RequantizablePairs(seq)); 0 without a floor.
  int64_t Requantize(SequenceKv& seq, int64_t pairs);
  int64_t RequantizablePairs(const SequenceKv& seq) const;
  bool elastic() const { return !floor_.empty(); }
  // Blocks requantized over the cache's life (two per freed block).
  int64_t requantized_blocks() const { return requantized_blocks_; }
  // Drops blocks past the first `n_tokens`... not needed yet; sequences only grow.

  // Stores K and V rows ([n][n_kv_heads * head_dim]) for positions [pos, pos + n) of
  // `layer` (pos == seq.length, reserved beforehand) and encodes blocks that fill up.
  void Write(SequenceKv& seq, int64_t layer, int64_t pos, int64_t n, const float* k,
             const float* v);

  // Promoted tokens (codecs with keep_rows, kernels/kv_codec.h): offers token `pos` of
  // `layer` to its encoded block's kept-row slots in every KV head, K and V, at `priority`
  // (KvCodec::KeepRow: it takes a free slot or the lowest-priority one). The exact row comes
  // from the fp16 ring, so pos must be in an encoded block and among the last ring tokens
  // of seq.length written; others are not promoted. Returns the slabs that kept it.
  // While seq.retain_rows is set (RetainRows), rows still retained can be promoted at any
  // later time as well.
  int64_t PromoteRow(SequenceKv& seq, int64_t layer, int64_t pos, float priority);
  // Keeps (on) every row written to seq, which must still be empty (otherwise nothing is
  // retained), in seq.retained; off drops them.
  void RetainRows(SequenceKv& seq, bool on) const;
  // Retained row of token t ([n_kv_heads][head_dim] in storage()), or nullptr.
  const uint8_t* RetainedRow(const SequenceKv& seq, int64_t layer, int kv, int64_t t) const;
  kernels::KvStorage storage() const { return storage_; }
  // View() of the retained rows instead: every token read exactly (no encoded block), for a
  // prompt that SnapKV compresses only at its end. View() itself when seq does not retain
  // all n_tokens rows.
  kernels::KvLayerView RetainedView(const SequenceKv& seq, int64_t layer, int64_t n_tokens) const;
  // True when some layer's codec keeps promoted rows.
  bool promotes() const { return promotes_; }

  // Page selection (Quest; needs page_summaries): for the n_q queries q ([n_q][n_heads]
  // [head_dim], RoPE applied) attending to the first n_tokens of `layer`, an upper bound
  // of q·k per encoded block and KV head from the blocks' key min/max, summed over the
  // head group's queries; every block but the max(min_blocks, ceil(fraction x blocks))
  // best of each KV head is marked in *skip ([n_kv_heads][n_blocks], for
  // KvLayerView::skip_blocks). False (and *skip untouched) when nothing would be skipped.
  bool SelectPages(const SequenceKv& seq, int64_t layer, int64_t n_tokens, const float* q,
                   int64_t n_q, int64_t n_heads, double fraction, int64_t min_blocks,
                   std::vector<uint8_t>* skip) const;

  // The attention view of `layer` once n_tokens are written.
  kernels::KvLayerView View(const SequenceKv& seq, int64_t layer, int64_t n_tokens) const;

  // Bytes of one encoded block in all layers, K and V.
  int64_t block_bytes_all_layers() const { return block_bytes_all_layers_; }
  // Bytes `seq` holds at its current length: encoded blocks plus protected tokens it needs
  // (sinks, window, tail); the transient slack of the prefill ring is not counted.
  int64_t SequenceBytes(const SequenceKv& seq) const;
  // SequenceBytes as bits per cached element of its seq.length tokens (requantized blocks
  // counted at their size); 0 for an empty sequence.
  double SequenceBitsPerElement(const SequenceKv& seq) const;
  // Bits per cached element including all metadata and protected fp16 tokens, for a
  // sequence of n_tokens tokens.
  double BitsPerElementAt(int64_t n_tokens) const;
  // Bytes per token at n_tokens tokens (all layers, K and V).
  double BytesPerTokenAt(int64_t n_tokens) const;
  // Encoded tokens the pool can hold.
  int64_t capacity_tokens() const { return allocator_.num_blocks() * block_tokens(); }

 private:
  // One of K or V of a layer: a codec per head (static scales and mixed precision differ by
  // head) and where each head's slab sits in a block.
  struct SlabCodecs {
    std::vector<std::unique_ptr<kernels::KvCodec>> heads;
    std::vector<const kernels::KvCodec*> ptrs;  // heads[h].get(), for KvSlabs
    std::vector<int64_t> offsets;
    int64_t block_bytes = 0;  // all heads
    uint8_t* pool = nullptr;
    // Bytes between consecutive blocks in the layer's region (its K and V slabs together;
    // half of that for floor codecs).
    int64_t stride = 0;
  };
  struct LayerCodecs {
    SlabCodecs kv[2];  // K, V
  };
  KvCache(const KvCacheConfig& config, int32_t n_blocks);
  static absl::StatusOr<std::vector<LayerCodecs>> BuildCodecs(const KvCacheConfig& c,
                                                              const KvPolicy& policy,
                                                              bool* promotes);
  // The floor's codecs, checked against the primary ones (see KvCacheConfig::floor).
  static absl::StatusOr<std::vector<LayerCodecs>> CheckedFloorCodecs(
      const KvCacheConfig& c, const std::vector<LayerCodecs>& primary);
  int64_t RowBytes() const;  // one protected token row (all heads) of K or V
  uint8_t* RingRow(SequenceKv& seq, int64_t layer, int kv, int64_t t) const;
  uint8_t* SinkRow(SequenceKv& seq, int64_t layer, int kv, int64_t t) const;
  void EncodeBlock(SequenceKv& seq, int64_t layer, int64_t b);
  // The transforms a row goes through before encoding (pre-RoPE keys un-rotated, Hadamard
  // rotation), on n rows of one head starting at position pos.
  void ToEncodedDomain(float* x, int64_t n, int64_t pos, int kv) const;
  bool promotes_ = false;
  uint16_t* summaries_ = nullptr;  // [block][layer][head][min|max][head_dim], page_summaries
  const uint16_t* Summary(int32_t block, int64_t layer, int64_t h) const;
  int64_t ProtectedTokensAt(int64_t n_tokens) const;

  KvCacheConfig config_;
  BlockAllocator allocator_;
  std::vector<LayerCodecs> layers_;
  std::vector<LayerCodecs> floor_;  // empty without KvCacheConfig::floor
  int64_t requantized_blocks_ = 0;
  int64_t ring_tokens_ = 0;
  kernels::KvStorage storage_ = kernels::KvStorage::kF16;
  int64_t block_bytes_all_layers_ = 0;
  uint8_t* pool_ = nullptr;
  size_t pool_bytes_ = 0;
  std::vector<float> rotation_signs_;  // [head_dim] when the policy rotates K or V
};

}  // namespace quantkv
