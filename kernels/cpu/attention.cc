#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "kernels/cpu/attention_internal.h"
#include "kernels/cpu/attention_lookup.h"
#include "kernels/cpu/attention_tile.h"
#include "kernels/cpu/quant_dot.h"
#include "kernels/dequantize.h"

namespace quantkv::kernels {
namespace {

using attention_internal::kTileTokens;
using attention_internal::RowSource;

constexpr int64_t kTileQueries = 32;

// The rows of token tile [s, e) of one head in both forms a query may need: as decoded
// from encoded blocks and as kept in the protected storage (sinks / ring). Each form is
// produced once per tile and shared by every query of the query tile.
struct TileRows {
  std::vector<float> encoded, exact;
  // Keys only, for the vectorized tile kernel: both forms transposed to [head_dim][tile].
  std::vector<float> encoded_t, exact_t;
};

// DecodeRange over [t0, t1), split where blocks change between the view's codecs and its
// floor codecs (requantized blocks), each run seen through a view of one kind.
void DecodeRuns(const KvLayerView& kv, int64_t g, const float* q, int64_t group, float scale,
                int64_t p, int64_t t0, int64_t t1, float* m, float* l, float* acc) {
  if (!kv.has_floor) {
    attention_internal::DecodeRange(kv, g, q, group, scale, p, t0, t1, m, l, acc);
    return;
  }
  KvLayerView floor_view = kv;
  floor_view.k = kv.k_floor;
  floor_view.v = kv.v_floor;
  const int64_t bt = kv.block_tokens;
  const int64_t encoded_end = kv.n_blocks * bt;
  for (int64_t t = t0; t < t1;) {
    // Tokens past the encoded blocks come from the protected copy: any view serves.
    const bool floor = t < encoded_end && kv.block_table[t / bt] < 0;
    int64_t e = t;
    while (e < t1 && (e < encoded_end && kv.block_table[e / bt] < 0) == floor) {
      e = std::min(t1, (e / bt + 1) * bt);
    }
    if (e == t) e = t1;  // past the encoded blocks
    attention_internal::DecodeRange(floor ? floor_view : kv, g, q, group, scale, p, t, e, m, l,
                                    acc);
    t = e;
  }
}

}  // namespace

int64_t KvStorageBytes(KvStorage s) { return s == KvStorage::kF32 ? 4 : 2; }

int64_t RingStart(const KvLayerView& v, int64_t p) {
  // Blocks completed by position p are encoded unless they reach into the window.
  const int64_t full = std::min(v.n_blocks, (p + 1) / v.block_tokens);
  return std::min(full * v.block_tokens, std::max<int64_t>(0, p + 1 - v.window_tokens));
}

void Attention(const AttentionQuery& query, const KvLayerView& kv, float* out, ThreadPool* pool) {
  const int64_t d = kv.head_dim;
  const int64_t group = query.n_heads / kv.n_kv_heads;
  const int64_t n_qtiles = (query.n_q + kTileQueries - 1) / kTileQueries;
  const int64_t rows_per_tile = kTileQueries * group;
  // Work items are (query tile, kv head, sequence split): each decoded K/V tile serves
  // every query of the query tile and the whole GQA head group. Decode has one query tile,
  // so long contexts are also split along the sequence (flash-decoding) to use all
  // threads; each split keeps online-softmax state (max m, sum l, weighted V) that is
  // merged exactly afterwards.
  const int64_t threads =
      query.split_threads > 0 ? query.split_threads : (pool == nullptr ? 1 : pool->size());
  const int64_t base_tasks = n_qtiles * kv.n_kv_heads;
  int64_t n_splits = 1;
  if (base_tasks < 2 * threads) {
    n_splits = std::clamp<int64_t>((2 * threads + base_tasks - 1) / base_tasks, 1,
                                   std::max<int64_t>(1, kv.n_tokens / (8 * kTileTokens)));
  }
  const int64_t n_tasks = base_tasks * n_splits;
  // Per task: rows_per_tile (m, l) pairs and rows_per_tile x d accumulators.
  std::vector<float> state_m(n_tasks * rows_per_tile), state_l(n_tasks * rows_per_tile),
      state_acc(n_tasks * rows_per_tile * d);
  const bool decode = query.fused_decode && attention_internal::DecodeKernelsUsable(query.n_q, d);
  auto run = [&](int64_t t0, int64_t t1, int) {
    std::vector<float> sc(static_cast<size_t>(kTileTokens));
    std::vector<float> tables;  // key lookup tables, one per query row of the tile
    TileRows kt, vt;
    kt.encoded.resize(kTileTokens * d);
    kt.exact.resize(kTileTokens * d);
    vt.encoded.resize(kTileTokens * d);
    vt.exact.resize(kTileTokens * d);
    kt.encoded_t.resize(kTileTokens * d);
    kt.exact_t.resize(kTileTokens * d);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t split = task % n_splits;
      const int64_t qt = task / n_splits / kv.n_kv_heads;
      const int64_t g = task / n_splits % kv.n_kv_heads;
      const int64_t i0 = qt * kTileQueries;
      const int64_t i1 = std::min(query.n_q, i0 + kTileQueries);
      float* m = state_m.data() + task * rows_per_tile;
      float* l = state_l.data() + task * rows_per_tile;
      float* acc = state_acc.data() + task * rows_per_tile * d;
      std::fill(m, m + rows_per_tile, -INFINITY);
      std::fill(l, l + rows_per_tile, 0.0f);
      std::fill(acc, acc + rows_per_tile * d, 0.0f);
      int64_t p_max = 0, p_min = INT64_MAX;
      for (int64_t i = i0; i < i1; ++i) {
        p_max = std::max<int64_t>(p_max, query.positions[i]);
        p_min = std::min<int64_t>(p_min, query.positions[i]);
      }
      const int64_t n_ctx = std::min(p_max + 1, kv.n_tokens);
      const int64_t n_tiles = (n_ctx + kTileTokens - 1) / kTileTokens;
      const int64_t s_begin = n_tiles * split / n_splits * kTileTokens;
      const int64_t s_end = std::min(n_ctx, n_tiles * (split + 1) / n_splits * kTileTokens);
      // Product-quantized keys of a few queries are scored by table lookup (tiled path).
      const bool lut = query.fused_decode && query.n_q <= attention_internal::kDecodeMaxQueries &&
                       attention_internal::KeyLookup::Usable(kv, g);
      // Evicted tokens (drop:keepN keys): only the tiled path skips them.
      const bool drops = kv.k.codecs[g]->drops_rows();
      if (decode && !lut && !drops) {
        // Few queries: each runs its GQA rows through the decode kernels on its own, over
        // the runs of tokens page selection keeps (online softmax carries across runs).
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t r = (i - i0) * group;
          const int64_t p = query.positions[i];
          const float* qi = query.q + (i * query.n_heads + g * group) * d;
          int64_t t = s_begin;
          while (t < s_end) {
            if (SkipsToken(kv, g, p, t)) {  // (a skipped block's last tokens may be in the ring)
              ++t;
              continue;
            }
            int64_t e = t + 1;
            while (e < s_end && !SkipsToken(kv, g, p, e)) {
              e = kv.skip_blocks == nullptr ? s_end : e + 1;
            }
            DecodeRuns(kv, g, qi, group, query.scale, p, t, e, m + r, l + r, acc + r * d);
            t = e;
          }
        }
        continue;
      }
      const RowSource keys(kv, 0, g), values(kv, 1, g);
      const bool simd = !lut && attention_internal::TileKernelUsable(d);
      std::optional<attention_internal::KeyLookup> lookup;
      if (lut) {
        lookup.emplace(kv, g);
        const int64_t ts = lookup->table_size();
        tables.resize(static_cast<size_t>((i1 - i0) * group * ts));
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = 0; j < group; ++j) {
            lookup->Build(query.q + (i * query.n_heads + g * group + j) * d,
                          tables.data() + ((i - i0) * group + j) * ts);
          }
        }
      }
      for (int64_t s = s_begin; s < s_end; s += kTileTokens) {
        const int64_t e = std::min(s_end, s + kTileTokens);
        // Which forms does some query of this tile read? Token t is exact for query p when
        // it is a sink or at/after RingStart(p), which grows with p; encoded otherwise.
        const int64_t enc_end = std::min(e, RingStart(kv, p_max));
        const int64_t enc_begin = std::max(s, std::min(kv.sink_tokens, enc_end));
        if (enc_begin < enc_end) {
          if (!lut) keys.Encoded(enc_begin, enc_end, kt.encoded.data() + (enc_begin - s) * d);
          values.Encoded(enc_begin, enc_end, vt.encoded.data() + (enc_begin - s) * d);
          if (simd) {
            attention_internal::TransposeTile(kt.encoded.data(), enc_begin - s, enc_end - s, d,
                                              kt.encoded_t.data());
          }
        }
        // Bit t - s: encoded token t is evicted (its K slab does not hold it).
        uint64_t dropped = 0;
        for (int64_t t = enc_begin; drops && t < enc_end;) {
          const int64_t b = t / kv.block_tokens;
          const int64_t end = std::min(enc_end, (b + 1) * kv.block_tokens);
          const KvSlabs& slabs = kv.SlabsOf(0, b);
          const uint64_t held = slabs.codecs[g]->HeldRows(
              slabs.Slab(kv.block_table[b], g), t - b * kv.block_tokens, end - b * kv.block_tokens);
          dropped |= (~held & attention_internal::TileBits(0, end - t)) << (t - s);
          t = end;
        }
        // Exact rows: sinks in the tile, and tokens some query reads from the ring.
        const int64_t sink_end = std::min(e, kv.sink_tokens);
        if (s < sink_end) {
          keys.Exact(s, sink_end, kt.exact.data());
          values.Exact(s, sink_end, vt.exact.data());
          if (simd) {
            attention_internal::TransposeTile(kt.exact.data(), 0, sink_end - s, d,
                                              kt.exact_t.data());
          }
        }
        const int64_t ring_begin = std::max({s, sink_end, RingStart(kv, p_min)});
        if (ring_begin < e) {
          keys.Exact(ring_begin, e, kt.exact.data() + (ring_begin - s) * d);
          values.Exact(ring_begin, e, vt.exact.data() + (ring_begin - s) * d);
          if (simd) {
            attention_internal::TransposeTile(kt.exact.data(), ring_begin - s, e - s, d,
                                              kt.exact_t.data());
          }
        }
        if (simd) {
          const attention_internal::TileForms forms{kt.encoded_t.data(), kt.exact_t.data(),
                                                    vt.encoded.data(), vt.exact.data()};
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t p = query.positions[i];
            if (s > p) continue;
            const int64_t ring = std::max(RingStart(kv, p), std::min(kv.sink_tokens, p + 1));
            const int64_t sk = std::min(kv.sink_tokens, p + 1);
            attention_internal::TileSpan span;
            span.n = std::min(e, p + 1) - s;
            span.enc_begin = std::clamp<int64_t>(sk - s, 0, span.n);
            span.enc_end = std::clamp<int64_t>(ring - s, span.enc_begin, span.n);
            if (kv.skip_blocks != nullptr) {
              for (int64_t t = 0; t < span.n; ++t) {
                if (SkipsToken(kv, g, p, s + t)) span.skip |= uint64_t{1} << t;
              }
            }
            span.skip |= dropped & attention_internal::TileBits(span.enc_begin, span.enc_end);
            const int64_t r = (i - i0) * group;
            attention_internal::TileUpdate(query.q + (i * query.n_heads + g * group) * d, group, d,
                                           forms, span, query.scale, m + r, l + r, acc + r * d);
          }
          continue;
        }
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t p = query.positions[i];
          if (s > p) continue;
          const int64_t te = std::min(e, p + 1);
          const int64_t ring = std::max(RingStart(kv, p), std::min(kv.sink_tokens, p + 1));
          const int64_t sk = std::min(kv.sink_tokens, p + 1);
          for (int64_t j = 0; j < group; ++j) {
            const int64_t r = (i - i0) * group + j;
            const float* qv = query.q + (i * query.n_heads + g * group + j) * d;
            float tile_max = -INFINITY;
            const float* table = lut ? tables.data() + r * lookup->table_size() : nullptr;
            for (int64_t t = s; t < te; ++t) {
              const bool exact = t < sk || t >= ring;
              // Page selection's skipped blocks and evicted tokens are not attended.
              if (SkipsToken(kv, g, p, t) || (!exact && (dropped >> (t - s) & 1) != 0)) {
                sc[t - s] = -INFINITY;
                continue;
              }
              const float dot =
                  exact || !lut ? internal::DotF32(
                                      qv, (exact ? kt.exact : kt.encoded).data() + (t - s) * d, d)
                                : lookup->Dot(table, t);
              sc[t - s] = dot * query.scale;
              tile_max = std::max(tile_max, sc[t - s]);
            }
            if (tile_max == -INFINITY) continue;  // every token of the tile skipped
            const float m_new = std::max(m[r], tile_max);
            const float correction = std::exp(m[r] - m_new);
            float* a = acc + r * d;
            if (correction != 1.0f) {
              for (int64_t x = 0; x < d; ++x) a[x] *= correction;
            }
            float lsum = l[r] * correction;
            for (int64_t t = s; t < te; ++t) {
              const float pr = std::exp(sc[t - s] - m_new);
              if (pr == 0.0f) continue;  // a skipped token (or one that underflows)
              lsum += pr;
              const bool exact = t < sk || t >= ring;
              const float* vrow = (exact ? vt.exact : vt.encoded).data() + (t - s) * d;
              for (int64_t x = 0; x < d; ++x) a[x] += pr * vrow[x];
            }
            m[r] = m_new;
            l[r] = lsum;
          }
        }
      }
    }
  };
  if (pool == nullptr) {
    run(0, n_tasks, 0);
  } else {
    pool->ParallelFor(n_tasks, run);
  }
  // Exact log-sum-exp merge of the splits: O = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
  for (int64_t base = 0; base < base_tasks; ++base) {
    const int64_t qt = base / kv.n_kv_heads;
    const int64_t g = base % kv.n_kv_heads;
    const int64_t i0 = qt * kTileQueries;
    const int64_t i1 = std::min(query.n_q, i0 + kTileQueries);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = 0; j < group; ++j) {
        const int64_t r = (i - i0) * group + j;
        float mx = -INFINITY;
        for (int64_t sp = 0; sp < n_splits; ++sp) {
          mx = std::max(mx, state_m[(base * n_splits + sp) * rows_per_tile + r]);
        }
        float* o = out + (i * query.n_heads + g * group + j) * d;
        std::fill(o, o + d, 0.0f);
        double lsum = 0;
        for (int64_t sp = 0; sp < n_splits; ++sp) {
          const int64_t task = base * n_splits + sp;
          const float ms = state_m[task * rows_per_tile + r];
          if (ms == -INFINITY) continue;  // the split lies after this query's position
          const float w = std::exp(ms - mx);
          lsum += w * state_l[task * rows_per_tile + r];
          const float* a = state_acc.data() + (task * rows_per_tile + r) * d;
          for (int64_t x = 0; x < d; ++x) o[x] += w * a[x];
        }
        const float inv = static_cast<float>(1.0 / lsum);
        for (int64_t x = 0; x < d; ++x) o[x] *= inv;
        if (query.lse != nullptr) {
          query.lse[i * query.n_heads + g * group + j] = mx + static_cast<float>(std::log(lsum));
        }
      }
    }
  }
}

}  // namespace quantkv::kernels
