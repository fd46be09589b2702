// Quantize-on-append into the paged KV cache on the device: rows are written to each
// sequence's protected storage (its sinks and its ring of recent tokens, as SequenceKv holds
// them on the CPU), and blocks that fill up are encoded from the ring into their physical
// slabs. The CPU reference is KvCache::Write with KvCodec::Encode; the slab bytes follow
// kernels/kv_slab_format.h exactly.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/attention.h"
#include "kernels/kv_slab_format.h"

namespace quantkv::kernels::cuda {

// One sequence's protected rows of one layer's K or V (device pointers), in `storage`
// elements: ring token t at row t % ring_tokens, sink t < sink_tokens at row t; rows of
// [n_kv_heads][head_dim].
struct KvProtectedRows {
  uint8_t* ring = nullptr;
  uint8_t* sinks = nullptr;  // may be null when sink_tokens == 0
};

// Rows to write: x[r] ([n_kv_heads * head_dim] floats, device) goes to position positions[r]
// of sequence rows_seq[r] (an index into seqs, a device array).
struct KvWriteBatch {
  const float* x = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* row_seq = nullptr;
  const KvProtectedRows* seqs = nullptr;
  int64_t rows = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t ring_tokens = 0;
  int64_t sink_tokens = 0;
  KvStorage storage = KvStorage::kF16;  // rounded to nearest even like Fp32ToFp16
};
absl::Status KvWriteRows(const KvWriteBatch& batch, void* stream);

// One full block to encode: tokens [first_token, first_token + block_tokens) read from
// `ring` (device, as KvProtectedRows::ring) into `dst` (device), head h's slab at
// dst + h * format.slab_bytes.
struct KvEncodeJob {
  const uint8_t* ring = nullptr;
  int64_t first_token = 0;
  uint8_t* dst = nullptr;
};
// Encodes n_jobs blocks (jobs: a device array) of one layer's K or V, every head with
// `format`. Bit for bit KvCodec::Encode of the same rows for every format KvSlabFormatOf
// accepts (the rows decoded from `storage` to float first, as the CPU cache does).
absl::Status KvEncodeBlocks(const KvSlabFormat& format, int64_t n_kv_heads, int64_t ring_tokens,
                            KvStorage storage, const KvEncodeJob* jobs, int64_t n_jobs,
                            void* stream);

}  // namespace quantkv::kernels::cuda
