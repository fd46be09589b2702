#include "runtime/kv/kv_cache.h"

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_format.h"
#include "kernels/dequantize.h"
#include "kernels/fp16.h"
#include "kernels/hadamard.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

// The largest fp16 value <= v, and the smallest >= v (finite v inside the fp16 range).
uint16_t HalfAtMost(float v) {
  const uint16_t h = kernels::Fp32ToFp16(v);
  if (kernels::Fp16ToFp32(h) <= v) return h;
  if (h == 0x0000) return 0x8001;
  return (h & 0x8000) ? h + 1 : h - 1;
}
uint16_t HalfAtLeast(float v) {
  const uint16_t h = kernels::Fp32ToFp16(v);
  if (kernels::Fp16ToFp32(h) >= v) return h;
  if (h == 0x8000) return 0x0001;
  return (h & 0x8000) ? h - 1 : h + 1;
}

}  // namespace

absl::StatusOr<std::vector<KvCache::LayerCodecs>> KvCache::BuildCodecs(const KvCacheConfig& c,
                                                                       const KvPolicy& policy,
                                                                       bool* promotes) {
  const int64_t bt = policy.block_tokens;
  const int64_t per_layer = c.n_kv_heads * c.head_dim;
  std::vector<LayerCodecs> layers(c.n_layers);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const LayerStaticScales* scales = policy.StaticScalesFor(l);
    const LayerKvVectors* books = policy.CodebooksFor(l);
    const LayerKvVectors* clips = policy.ClipModelsFor(l);
    for (int kv = 0; kv < 2; ++kv) {
      SlabCodecs& sc = layers[l].kv[kv];
      const StaticScales* st = scales == nullptr ? nullptr : kv == 0 ? &scales->k : &scales->v;
      const char* what = kv == 0 ? "keys" : "values";
      if (st != nullptr && !st->scale.empty() &&
          (static_cast<int64_t>(st->scale.size()) != per_layer ||
           (!st->min.empty() && static_cast<int64_t>(st->min.size()) != per_layer))) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "KV policy '%s', layer %d %s: static scales hold %d scales and %d minima; this model "
            "needs %d (kv heads %d x head_dim %d): was the calibration file made for another "
            "model?",
            policy.name, l, what, st->scale.size(), st->min.size(), per_layer, c.n_kv_heads,
            c.head_dim));
      }
      for (int64_t h = 0; h < c.n_kv_heads; ++h) {
        kernels::KvCodecConfig cc;
        const LayerKvPolicy& hp = policy.ForHead(l, h);
        cc.spec = kv == 0 ? hp.k : hp.v;
        cc.head_dim = c.head_dim;
        cc.block_tokens = bt;
        if (st != nullptr && cc.spec.granularity == kernels::KvGranularity::kStatic) {
          auto slice = [&](const std::vector<float>& a) {
            return a.empty() ? std::vector<float>()
                             : std::vector<float>(a.begin() + h * c.head_dim,
                                                  a.begin() + (h + 1) * c.head_dim);
          };
          cc.static_scale = slice(st->scale);
          cc.static_min = slice(st->min);
        }
        if (books != nullptr && kernels::KvCodecNeedsCodebook(cc.spec)) {
          cc.codebook = kv == 0 ? books->k : books->v;
        }
        if (clips != nullptr && cc.spec.learned_clip) cc.clip_model = kv == 0 ? clips->k : clips->v;
        absl::StatusOr<std::unique_ptr<kernels::KvCodec>> codec = kernels::KvCodec::Create(cc);
        if (!codec.ok()) {
          return absl::InvalidArgumentError(
              absl::StrFormat("KV policy '%s', layer %d head %d %s: %s", policy.name, l, h, what,
                              codec.status().message()));
        }
        sc.offsets.push_back(sc.block_bytes);
        sc.block_bytes += (*codec)->slab_bytes();
        sc.ptrs.push_back(codec->get());
        if ((*codec)->spec().keep_rows > 0) *promotes = true;
        sc.heads.push_back(std::move(*codec));
      }
    }
    // Evicted tokens: attention skips a token its K slab does not hold, so V must hold the
    // same tokens, which it does when it is drop with the same slots (both are filled by
    // the same PromoteRow calls).
    for (int64_t h = 0; h < c.n_kv_heads; ++h) {
      const kernels::KvCodecSpec& k = layers[l].kv[0].heads[h]->spec();
      const kernels::KvCodecSpec& v = layers[l].kv[1].heads[h]->spec();
      const bool k_drop = k.type == kernels::KvCodecType::kDrop;
      const bool v_drop = v.type == kernels::KvCodecType::kDrop;
      if ((k_drop || v_drop) && !(k_drop && v_drop && k.keep_rows == v.keep_rows)) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "KV policy '%s', layer %d head %d: keys %s and values %s: drop evicts a token "
            "from both K and V, so both must be drop:keepN with the same N",
            policy.name, l, h, k.ToString(), v.ToString()));
      }
    }
  }
  return layers;
}

absl::StatusOr<std::vector<KvCache::LayerCodecs>> KvCache::CheckedFloorCodecs(
    const KvCacheConfig& c, const std::vector<LayerCodecs>& primary) {
  const KvPolicy& f = *c.floor;
  if (f.block_tokens != c.policy.block_tokens || f.sink_tokens != c.policy.sink_tokens ||
      f.window_tokens != c.policy.window_tokens || f.pre_rope_keys != c.policy.pre_rope_keys ||
      f.rotate_k != c.policy.rotate_k || f.rotate_v != c.policy.rotate_v) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KV floor '%s': its block, sink, window, rope= and rotate= must be those of '%s' (a "
        "requantized block is re-encoded in place, the rest of the cache unchanged)",
        f.name, c.policy.name));
  }
  if (c.page_summaries) {
    return absl::InvalidArgumentError("KV floor: not with page selection (--page-fraction)");
  }
  for (const LayerCodecs& layer : primary) {
    if (std::any_of(layer.kv[0].heads.begin(), layer.kv[0].heads.end(),
                    [](const auto& codec) { return codec->drops_rows(); })) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "KV floor: '%s' evicts tokens (drop); requantizing its blocks would bring them back",
          c.policy.name));
    }
  }
  bool promotes = false;
  QKV_ASSIGN_OR_RETURN(std::vector<LayerCodecs> floor, BuildCodecs(c, f, &promotes));
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const int64_t have = primary[l].kv[0].block_bytes + primary[l].kv[1].block_bytes;
    const int64_t need = floor[l].kv[0].block_bytes + floor[l].kv[1].block_bytes;
    if (have % 2 != 0 || 2 * need > have) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "KV floor '%s': layer %d's K and V take %d bytes per block, more than half of the %d "
          "bytes of '%s' (two requantized blocks must share one); choose fewer bits or fewer "
          "scales, e.g. k=int2:chan:clip0.7,v=int2:chan:sym under int4-comp",
          f.name, l, need, have, c.policy.name));
    }
  }
  return floor;
}

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(const KvCacheConfig& c) {
  if (c.n_layers <= 0 || c.n_kv_heads <= 0 || c.head_dim <= 0 || c.max_step_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KV cache: layers %d, kv heads %d, head_dim %d and step tokens %d must be positive",
        c.n_layers, c.n_kv_heads, c.head_dim, c.max_step_tokens));
  }
  const int64_t bt = c.policy.block_tokens;
  if (c.policy.pre_rope_keys && c.rope == nullptr) {
    return absl::InvalidArgumentError(
        "KV cache: rope=pre (pre-RoPE keys) needs the model's rotary embedding");
  }
  if ((c.policy.rotate_k || c.policy.rotate_v) && (c.head_dim & (c.head_dim - 1)) != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KV cache: rotate= needs a power-of-two head_dim (Hadamard), got %d", c.head_dim));
  }
  bool promotes = false;
  QKV_ASSIGN_OR_RETURN(std::vector<LayerCodecs> layers, BuildCodecs(c, c.policy, &promotes));
  int64_t all_layers = 0;
  for (const LayerCodecs& lc : layers) all_layers += lc.kv[0].block_bytes + lc.kv[1].block_bytes;
  std::vector<LayerCodecs> floor;
  if (c.floor.has_value()) {
    QKV_ASSIGN_OR_RETURN(floor, CheckedFloorCodecs(c, layers));
  }
  const int64_t summary_bytes =
      c.page_summaries ? c.n_layers * c.n_kv_heads * 2 * c.head_dim * 2 : 0;
  all_layers += summary_bytes;
  const int64_t n_blocks = c.max_bytes / all_layers;
  if (n_blocks < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KV cache: budget of %d bytes holds no block (one block of %d tokens needs %d bytes)",
        c.max_bytes, bt, all_layers));
  }
  if (n_blocks > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("KV cache: budget needs more than 2^31 blocks");
  }
  std::unique_ptr<KvCache> cache(new KvCache(c, static_cast<int32_t>(n_blocks)));
  cache->promotes_ = promotes;
  cache->pool_bytes_ = static_cast<size_t>(n_blocks * all_layers);
  // Anonymous, lazily backed memory: a large budget costs only the pages written.
  void* pool = ::mmap(nullptr, cache->pool_bytes_, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (pool == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("KV cache: cannot reserve %d bytes", cache->pool_bytes_));
  }
  cache->pool_ = static_cast<uint8_t*>(pool);
  uint8_t* p = cache->pool_;
  // One region per layer; a block's K slabs then its V slabs lie together, so a floor
  // block (K and V) fits in half of a block even when its keys alone take more than half
  // of the block's keys.
  for (size_t l = 0; l < layers.size(); ++l) {
    SlabCodecs& k = layers[l].kv[0];
    SlabCodecs& v = layers[l].kv[1];
    const int64_t stride = k.block_bytes + v.block_bytes;
    k.pool = p;
    v.pool = p + k.block_bytes;
    k.stride = v.stride = stride;
    if (!floor.empty()) {  // floor block f lives at half-block f of the same region
      SlabCodecs& fk = floor[l].kv[0];
      SlabCodecs& fv = floor[l].kv[1];
      fk.pool = p;
      fv.pool = p + fk.block_bytes;
      fk.stride = fv.stride = stride / 2;
    }
    p += n_blocks * stride;
  }
  cache->floor_ = std::move(floor);
  if (c.page_summaries) cache->summaries_ = reinterpret_cast<uint16_t*>(p);
  cache->layers_ = std::move(layers);
  cache->block_bytes_all_layers_ = all_layers;
  cache->ring_tokens_ = c.policy.window_tokens + bt + c.max_step_tokens;
  if (c.policy.rotate_k || c.policy.rotate_v) {
    cache->rotation_signs_ = kernels::HadamardSigns(c.head_dim, kernels::kKvRotationSeed);
  }
  cache->storage_ = c.policy.protected_fp32() ? kernels::KvStorage::kF32 : kernels::KvStorage::kF16;
  return cache;
}

KvCache::KvCache(const KvCacheConfig& config, int32_t n_blocks)
    : config_(config), allocator_(n_blocks) {}

KvCache::~KvCache() {
  if (pool_ != nullptr) ::munmap(pool_, pool_bytes_);
}

int64_t KvCache::RowBytes() const {
  return config_.n_kv_heads * config_.head_dim * kernels::KvStorageBytes(storage_);
}

uint8_t* KvCache::RingRow(SequenceKv& seq, int64_t layer, int kv, int64_t t) const {
  return seq.ring.data() + ((layer * 2 + kv) * ring_tokens_ + t % ring_tokens_) * RowBytes();
}

uint8_t* KvCache::SinkRow(SequenceKv& seq, int64_t layer, int kv, int64_t t) const {
  return seq.sinks.data() + ((layer * 2 + kv) * config_.policy.sink_tokens + t) * RowBytes();
}

absl::Status KvCache::Reserve(SequenceKv& seq, int64_t n_tokens) {
  const int64_t need = n_tokens / block_tokens();
  const size_t had = seq.blocks.size();
  while (static_cast<int64_t>(seq.blocks.size()) < need) {
    absl::StatusOr<int32_t> b = allocator_.Allocate();
    if (!b.ok()) {
      for (size_t i = had; i < seq.blocks.size(); ++i) (void)allocator_.Release(seq.blocks[i]);
      seq.blocks.resize(had);
      return absl::ResourceExhaustedError(absl::StrFormat(
          "KV cache full: %d tokens need %d blocks of %d tokens; the pool has %d blocks "
          "(%d tokens) under its byte budget; raise --kv-budget-mb or shorten the context",
          n_tokens, need, block_tokens(), allocator_.num_blocks(), capacity_tokens()));
    }
    seq.blocks.push_back(*b);
  }
  if (seq.ring.empty()) seq.ring.resize(config_.n_layers * 2 * ring_tokens_ * RowBytes());
  if (seq.sinks.empty() && config_.policy.sink_tokens > 0) {
    seq.sinks.resize(config_.n_layers * 2 * config_.policy.sink_tokens * RowBytes());
  }
  return absl::OkStatus();
}

void KvCache::Free(SequenceKv& seq) {
  for (int32_t b : seq.blocks) {
    // A floor pair -1 - 2a, -1 - (2a + 1) shares physical block a: released once.
    if (b >= 0) {
      (void)allocator_.Release(b);
    } else if ((-1 - static_cast<int64_t>(b)) % 2 == 0) {
      (void)allocator_.Release(static_cast<int32_t>((-1 - static_cast<int64_t>(b)) / 2));
    }
  }
  seq = SequenceKv{};
}

void KvCache::RetainRows(SequenceKv& seq, bool on) const {
  seq.retain_rows = on;
  seq.retained.clear();
  seq.retained.shrink_to_fit();
  if (on) seq.retained.resize(static_cast<size_t>(2 * config_.n_layers));
  // Retention covers a sequence from its first row, so RetainedRow(t) is token t's.
  if (on && seq.length > 0) seq.retain_rows = false;
}

const uint8_t* KvCache::RetainedRow(const SequenceKv& seq, int64_t layer, int kv, int64_t t) const {
  if (layer < 0 || layer >= config_.n_layers || t < 0 ||
      static_cast<int64_t>(seq.retained.size()) != 2 * config_.n_layers) {
    return nullptr;
  }
  const std::vector<uint8_t>& kept = seq.retained[layer * 2 + kv];
  if ((t + 1) * RowBytes() > static_cast<int64_t>(kept.size())) return nullptr;
  return kept.data() + t * RowBytes();
}

int64_t KvCache::RequantizablePairs(const SequenceKv& seq) const {
  if (floor_.empty()) return 0;
  const int64_t written =
      std::min<int64_t>(static_cast<int64_t>(seq.blocks.size()), seq.length / block_tokens());
  int64_t pairs = 0;
  for (int64_t b = seq.floor_blocks; b + 1 < written; b += 2) {
    if (allocator_.ref_count(seq.blocks[b]) != 1 || allocator_.ref_count(seq.blocks[b + 1]) != 1) {
      break;  // shared blocks (a common prefix) stay as they are
    }
    ++pairs;
  }
  return pairs;
}

int64_t KvCache::Requantize(SequenceKv& seq, int64_t pairs) {
  pairs = std::min(pairs, RequantizablePairs(seq));
  const int64_t bt = block_tokens(), d = config_.head_dim, H = config_.n_kv_heads;
  std::vector<float> rows(static_cast<size_t>(4 * H * bt * d));  // [K|V][block][head]
  for (int64_t k = 0; k < pairs; ++k) {
    const int64_t b = seq.floor_blocks;
    const int32_t first = seq.blocks[b], second = seq.blocks[b + 1];
    for (int64_t l = 0; l < config_.n_layers; ++l) {
      // Both blocks' K and V decoded (in the encoded domain) before the first is
      // overwritten: its two halves cover its K and V slabs.
      for (int kv = 0; kv < 2; ++kv) {
        const SlabCodecs& sc = layers_[l].kv[kv];
        for (int half = 0; half < 2; ++half) {
          const uint8_t* block =
              sc.pool + static_cast<int64_t>(half == 0 ? first : second) * sc.stride;
          for (int64_t h = 0; h < H; ++h) {
            sc.heads[h]->Decode(block + sc.offsets[h], 0, bt,
                                rows.data() + ((kv * 2 + half) * H + h) * bt * d);
          }
        }
      }
      for (int kv = 0; kv < 2; ++kv) {
        const SlabCodecs& fc = floor_[l].kv[kv];
        for (int half = 0; half < 2; ++half) {
          uint8_t* dst = fc.pool + (2 * static_cast<int64_t>(first) + half) * fc.stride;
          for (int64_t h = 0; h < H; ++h) {
            fc.heads[h]->Encode(rows.data() + ((kv * 2 + half) * H + h) * bt * d,
                                dst + fc.offsets[h]);
          }
        }
      }
    }
    (void)allocator_.Release(second);
    seq.blocks[b] = -1 - 2 * first;
    seq.blocks[b + 1] = -1 - (2 * first + 1);
    seq.floor_blocks += 2;
  }
  requantized_blocks_ += 2 * pairs;
  return pairs;
}

void KvCache::Write(SequenceKv& seq, int64_t layer, int64_t pos, int64_t n, const float* k,
                    const float* v) {
  const int64_t row = config_.n_kv_heads * config_.head_dim;
  for (int kv = 0; kv < 2; ++kv) {
    const float* src = kv == 0 ? k : v;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = pos + i;
      uint8_t* dst = RingRow(seq, layer, kv, t);
      if (storage_ == kernels::KvStorage::kF32) {
        std::memcpy(dst, src + i * row, row * sizeof(float));
      } else {
        kernels::Fp32ToFp16Row(src + i * row, reinterpret_cast<uint16_t*>(dst), row);
      }
      if (t < config_.policy.sink_tokens) {
        std::memcpy(SinkRow(seq, layer, kv, t), dst, RowBytes());
      }
      if (seq.retain_rows) {
        std::vector<uint8_t>& kept = seq.retained[layer * 2 + kv];
        if (static_cast<int64_t>(kept.size()) == t * RowBytes()) {  // rows arrive in order
          kept.insert(kept.end(), dst, dst + RowBytes());
        }
      }
    }
  }
  const int64_t bt = block_tokens();
  for (int64_t b = pos / bt; b < (pos + n) / bt; ++b) EncodeBlock(seq, layer, b);
}

void KvCache::EncodeBlock(SequenceKv& seq, int64_t layer, int64_t b) {
  const int64_t bt = block_tokens();
  const int64_t d = config_.head_dim;
  std::vector<float> x(static_cast<size_t>(bt * d));
  for (int kv = 0; kv < 2; ++kv) {
    const SlabCodecs& sc = layers_[layer].kv[kv];
    uint8_t* block = sc.pool + static_cast<int64_t>(seq.blocks[b]) * sc.stride;
    for (int64_t h = 0; h < config_.n_kv_heads; ++h) {
      for (int64_t t = 0; t < bt; ++t) {
        const uint8_t* r =
            RingRow(seq, layer, kv, b * bt + t) + h * d * kernels::KvStorageBytes(storage_);
        if (storage_ == kernels::KvStorage::kF32) {
          std::memcpy(x.data() + t * d, r, d * sizeof(float));
        } else {
          kernels::Fp16ToFp32Row(reinterpret_cast<const uint16_t*>(r), x.data() + t * d, d);
        }
      }
      if (kv == 0 && summaries_ != nullptr) {  // keys as attention sees them
        uint16_t* sum = const_cast<uint16_t*>(Summary(seq.blocks[b], layer, h));
        for (int64_t c = 0; c < d; ++c) {
          float lo = x[c], hi = x[c];
          for (int64_t t = 1; t < bt; ++t) {
            lo = std::min(lo, x[t * d + c]);
            hi = std::max(hi, x[t * d + c]);
          }
          // Rounded outwards, so the bound stays an upper bound.
          sum[c] = HalfAtMost(lo);
          sum[d + c] = HalfAtLeast(hi);
        }
      }
      ToEncodedDomain(x.data(), bt, b * bt, kv);
      sc.heads[h]->Encode(x.data(), block + sc.offsets[h]);
    }
  }
}

void KvCache::ToEncodedDomain(float* x, int64_t n, int64_t pos, int kv) const {
  // Pre-RoPE keys: the ring holds keys as attention uses them (rotated); the encoded
  // form is the un-rotated key, whose channels keep their outliers in place.
  if (kv == 0 && config_.policy.pre_rope_keys) {
    config_.rope->RotateRows(x, n, pos, /*inverse=*/true);
  }
  if (kv == 0 ? config_.policy.rotate_k : config_.policy.rotate_v) {
    kernels::HadamardRotate(x, n, config_.head_dim, rotation_signs_.data(), /*inverse=*/false);
  }
}

const uint16_t* KvCache::Summary(int32_t block, int64_t layer, int64_t h) const {
  const int64_t d = config_.head_dim;
  return summaries_ +
         ((static_cast<int64_t>(block) * config_.n_layers + layer) * config_.n_kv_heads + h) * 2 *
             d;
}

bool KvCache::SelectPages(const SequenceKv& seq, int64_t layer, int64_t n_tokens, const float* q,
                          int64_t n_q, int64_t n_heads, double fraction, int64_t min_blocks,
                          std::vector<uint8_t>* skip) const {
  if (summaries_ == nullptr) return false;
  const int64_t n_blocks =
      std::min<int64_t>(static_cast<int64_t>(seq.blocks.size()), n_tokens / block_tokens());
  const int64_t keep = std::max<int64_t>(
      min_blocks, static_cast<int64_t>(std::ceil(fraction * static_cast<double>(n_blocks))));
  if (keep >= n_blocks) return false;
  const int64_t d = config_.head_dim, H = config_.n_kv_heads, group = n_heads / H;
  skip->assign(static_cast<size_t>(H * n_blocks), 1);
  std::vector<std::pair<float, int64_t>> score(static_cast<size_t>(n_blocks));
  std::vector<float> lo(d), hi(d);
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t b = 0; b < n_blocks; ++b) {
      const uint16_t* s = Summary(seq.blocks[b], layer, h);
      kernels::Fp16ToFp32Row(s, lo.data(), d);
      kernels::Fp16ToFp32Row(s + d, hi.data(), d);
      double ub = 0;
      for (int64_t i = 0; i < n_q; ++i) {
        for (int64_t j = 0; j < group; ++j) {
          const float* qv = q + (i * n_heads + h * group + j) * d;
          for (int64_t c = 0; c < d; ++c) ub += std::max(qv[c] * lo[c], qv[c] * hi[c]);
        }
      }
      score[b] = {static_cast<float>(-ub), b};  // ascending: best first
    }
    std::nth_element(score.begin(), score.begin() + keep, score.end());
    for (int64_t k = 0; k < keep; ++k) (*skip)[h * n_blocks + score[k].second] = 0;
  }
  return true;
}

int64_t KvCache::PromoteRow(SequenceKv& seq, int64_t layer, int64_t pos, float priority) {
  const int64_t bt = block_tokens(), d = config_.head_dim;
  const int64_t b = pos / bt;
  if (!promotes_ || layer < 0 || layer >= config_.n_layers || pos < 0 ||
      b >= static_cast<int64_t>(seq.blocks.size()) || (b + 1) * bt > seq.length ||
      seq.blocks[b] < 0) {
    return 0;
  }
  const uint8_t* retained =
      pos < seq.length - ring_tokens_ ? RetainedRow(seq, layer, 0, pos) : nullptr;
  if (pos < seq.length - ring_tokens_ && retained == nullptr) return 0;
  int64_t kept = 0;
  std::vector<float> x(static_cast<size_t>(d));
  for (int kv = 0; kv < 2; ++kv) {
    const SlabCodecs& sc = layers_[layer].kv[kv];
    uint8_t* block = sc.pool + static_cast<int64_t>(seq.blocks[b]) * sc.stride;
    for (int64_t h = 0; h < config_.n_kv_heads; ++h) {
      if (sc.heads[h]->spec().keep_rows == 0) continue;
      const uint8_t* r =
          (retained != nullptr ? RetainedRow(seq, layer, kv, pos) : RingRow(seq, layer, kv, pos)) +
          h * d * kernels::KvStorageBytes(storage_);
      if (storage_ == kernels::KvStorage::kF32) {
        std::memcpy(x.data(), r, d * sizeof(float));
      } else {
        kernels::Fp16ToFp32Row(reinterpret_cast<const uint16_t*>(r), x.data(), d);
      }
      ToEncodedDomain(x.data(), 1, pos, kv);
      kept += sc.heads[h]->KeepRow(block + sc.offsets[h], pos - b * bt, x.data(), priority);
    }
  }
  return kept;
}

kernels::KvLayerView KvCache::View(const SequenceKv& seq, int64_t layer, int64_t n_tokens) const {
  const LayerCodecs& lc = layers_[layer];
  kernels::KvLayerView v;
  v.n_kv_heads = config_.n_kv_heads;
  v.head_dim = config_.head_dim;
  v.block_tokens = block_tokens();
  v.n_tokens = n_tokens;
  kernels::KvSlabs* dst[2] = {&v.k, &v.v};
  for (int kv = 0; kv < 2; ++kv) {
    const SlabCodecs& sc = lc.kv[kv];
    dst[kv]->codecs = sc.ptrs.data();
    dst[kv]->slab_offsets = sc.offsets.data();
    dst[kv]->base = sc.pool;
    dst[kv]->block_bytes = sc.stride;
  }
  if (seq.floor_blocks > 0) {
    kernels::KvSlabs* fdst[2] = {&v.k_floor, &v.v_floor};
    for (int kv = 0; kv < 2; ++kv) {
      const SlabCodecs& fc = floor_[layer].kv[kv];
      fdst[kv]->codecs = fc.ptrs.data();
      fdst[kv]->slab_offsets = fc.offsets.data();
      fdst[kv]->base = fc.pool;
      fdst[kv]->block_bytes = fc.stride;
    }
    v.has_floor = true;
  }
  v.block_table = seq.blocks.data();
  v.n_blocks =
      std::min<int64_t>(static_cast<int64_t>(seq.blocks.size()), n_tokens / block_tokens());
  if (config_.policy.pre_rope_keys) v.k_pre_rope = config_.rope;
  if (config_.policy.rotate_k) v.k_rotation = rotation_signs_.data();
  if (config_.policy.rotate_v) v.v_rotation = rotation_signs_.data();
  v.storage = storage_;
  const int64_t row = RowBytes();
  v.k_ring = seq.ring.data() + (layer * 2 + 0) * ring_tokens_ * row;
  v.v_ring = seq.ring.data() + (layer * 2 + 1) * ring_tokens_ * row;
  v.ring_tokens = ring_tokens_;
  if (config_.policy.sink_tokens > 0) {
    v.k_sinks = seq.sinks.data() + (layer * 2 + 0) * config_.policy.sink_tokens * row;
    v.v_sinks = seq.sinks.data() + (layer * 2 + 1) * config_.policy.sink_tokens * row;
  }
  v.sink_tokens = config_.policy.sink_tokens;
  v.window_tokens = config_.policy.window_tokens;
  return v;
}

kernels::KvLayerView KvCache::RetainedView(const SequenceKv& seq, int64_t layer,
                                           int64_t n_tokens) const {
  kernels::KvLayerView v = View(seq, layer, n_tokens);
  if (n_tokens < 1 || RetainedRow(seq, layer, 1, n_tokens - 1) == nullptr) return v;
  // No encoded blocks: RingStart is 0, so every token past the sinks comes from the "ring",
  // here the retained rows in token order.
  v.n_blocks = 0;
  v.has_floor = false;
  v.k_ring = seq.retained[layer * 2 + 0].data();
  v.v_ring = seq.retained[layer * 2 + 1].data();
  v.ring_tokens = n_tokens;
  return v;
}

int64_t KvCache::ProtectedTokensAt(int64_t n) const {
  if (n <= 0) return 0;
  const int64_t sinks = std::min(config_.policy.sink_tokens, n);
  const int64_t full = n / block_tokens();
  const int64_t ring_start = std::max(
      sinks,
      std::min(full * block_tokens(), std::max<int64_t>(0, n - config_.policy.window_tokens)));
  return sinks + (n - ring_start);
}

int64_t KvCache::SequenceBytes(const SequenceKv& seq) const {
  // A requantized pair holds one physical block.
  return (static_cast<int64_t>(seq.blocks.size()) - seq.floor_blocks / 2) *
             block_bytes_all_layers_ +
         ProtectedTokensAt(seq.length) * RowBytes() * 2 * config_.n_layers;
}

double KvCache::SequenceBitsPerElement(const SequenceKv& seq) const {
  if (seq.length <= 0) return 0;
  const double elements = 2.0 * config_.n_layers * config_.n_kv_heads * config_.head_dim *
                          static_cast<double>(seq.length);
  return 8.0 * static_cast<double>(SequenceBytes(seq)) / elements;
}

double KvCache::BytesPerTokenAt(int64_t n) const {
  if (n <= 0) return 0;
  const double bytes =
      static_cast<double>(n / block_tokens()) * block_bytes_all_layers_ +
      static_cast<double>(ProtectedTokensAt(n)) * RowBytes() * 2 * config_.n_layers;
  return bytes / static_cast<double>(n);
}

double KvCache::BitsPerElementAt(int64_t n) const {
  const double elements_per_token = 2.0 * config_.n_layers * config_.n_kv_heads * config_.head_dim;
  return 8.0 * BytesPerTokenAt(n) / elements_per_token;
}

}  // namespace quantkv
