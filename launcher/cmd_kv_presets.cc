// `quantkv kv-presets`: the named KV cache policies with their measured size.
#include "absl/strings/str_format.h"
#include "launcher/commands.h"
#include "runtime/kv/kv_cache.h"

namespace quantkv::launcher {
namespace {

struct PresetsFlags {
  int64_t head_dim = 64;
  int64_t ctx = 2048;
  int64_t layers = 30;  // SmolLM2-135M's, for the per-sequence size
  int64_t kv_heads = 3;
};

int Run(const PresetsFlags& o, CommandContext& ctx) {
  ctx.out << absl::StrFormat("%-10s %7s %8s %10s  %-54s %s\n", "preset", "bits", "vs fp16",
                             "MB/seq", "spec", "description");
  for (const KvPreset& p : KvPresets()) {
    KvCacheConfig c;
    c.n_layers = 1;
    c.n_kv_heads = 1;
    c.head_dim = o.head_dim;
    auto policy = ParseKvPolicy(p.name);
    if (!policy.ok()) return ReportFailure(ctx, policy.status());
    c.policy = *policy;
    c.max_bytes = int64_t{16} << 20;
    auto cache = KvCache::Create(c);
    if (!cache.ok()) return ReportFailure(ctx, cache.status());
    const double bits = (*cache)->BitsPerElementAt(o.ctx);
    // K and V of every layer and KV head, every token of one --ctx sequence.
    const double mb = bits / 8 * 2 * o.layers * o.kv_heads * o.head_dim * o.ctx / 1e6;
    ctx.out << absl::StrFormat("%-10s %7.3f %7.2fx %10.1f  %-54s %s\n", p.name, bits, 16.0 / bits,
                               mb, p.spec, p.description);
  }
  ctx.out << absl::StrFormat(
      "\nbits/element include all scales, zero points and the fp16 sinks, window and tail, "
      "for a %d-token sequence with head_dim %d; MB/seq: that sequence's K and V in %d "
      "layers x %d KV heads.\n",
      o.ctx, o.head_dim, o.layers, o.kv_heads);
  return kExitOk;
}

}  // namespace

Subcommand KvPresetsSubcommand() {
  return MakeSubcommand<PresetsFlags>(
      "kv-presets", "list the KV cache presets with their bits per element",
      [](FlagSet& f, PresetsFlags& o) {
        f.Int<int64_t>("head-dim", &o.head_dim, 64, "head dimension to size the codecs for",
                       {.min = 8, .max = 1024});
        f.Int<int64_t>("ctx", &o.ctx, 2048, "sequence length the average is taken at",
                       {.min = 1, .max = int64_t{1} << 24});
        f.Int<int64_t>("layers", &o.layers, 30, "layers, for MB per sequence (SmolLM2-135M: 30)",
                       {.min = 1, .max = 1024});
        f.Int<int64_t>("kv-heads", &o.kv_heads, 3,
                       "KV heads, for MB per sequence (SmolLM2-135M: 3)", {.min = 1, .max = 1024});
      },
      Run);
}

}  // namespace quantkv::launcher
