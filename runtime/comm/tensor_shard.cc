#include "runtime/comm/tensor_shard.h"

#include <algorithm>

#include "absl/strings/str_format.h"

namespace quantkv {

ShardRange SplitEvenly(int64_t units, int rank, int ranks) {
  const int64_t base = units / ranks;
  const int64_t extra = units % ranks;
  ShardRange r;
  r.begin = rank * base + std::min<int64_t>(rank, extra);
  r.size = base + (rank < extra ? 1 : 0);
  return r;
}

absl::StatusOr<TensorShard> PlanTensorShard(const ShardShape& s, int rank, int ranks) {
  if (ranks < 1 || rank < 0 || rank >= ranks) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tensor parallel: rank %d outside a group of %d", rank, ranks));
  }
  if (s.n_kv_heads < 1 || s.n_heads % s.n_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tensor parallel: %d query heads do not form groups over %d KV heads",
                        s.n_heads, s.n_kv_heads));
  }
  if (ranks > s.n_kv_heads) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tensor parallel: --tp %d exceeds the model's %d KV heads (attention is split by KV "
        "head; use --tp %d or fewer)",
        ranks, s.n_kv_heads, s.n_kv_heads));
  }
  const int64_t align = std::max<int64_t>(1, s.intermediate_align);
  if (s.intermediate % align != 0 || s.intermediate / align < ranks) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tensor parallel: the intermediate size %d does not split into %d parts of whole "
        "%d-element weight blocks",
        s.intermediate, ranks, align));
  }
  TensorShard t;
  t.rank = rank;
  t.ranks = ranks;
  t.kv_heads = SplitEvenly(s.n_kv_heads, rank, ranks);
  const int64_t group = s.n_heads / s.n_kv_heads;
  t.heads = {t.kv_heads.begin * group, t.kv_heads.size * group};
  const ShardRange units = SplitEvenly(s.intermediate / align, rank, ranks);
  t.intermediate = {units.begin * align, units.size * align};
  const int64_t o_align = std::max<int64_t>(1, s.o_align);
  if ((t.heads.begin * s.head_dim) % o_align != 0 || (t.heads.size * s.head_dim) % o_align != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tensor parallel: rank %d's query heads [%d, %d) of dimension %d do not fall on whole "
        "%d-element blocks of attn_output",
        rank, t.heads.begin, t.heads.end(), s.head_dim, o_align));
  }
  return t;
}

}  // namespace quantkv
