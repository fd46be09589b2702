#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/quant_dot.h"
#include "kernels/dequantize.h"

namespace quantkv::kernels {
namespace {

// Rows [t0, t1) x head_dim of head h of K (kv = 0) or V (kv = 1), in either form:
// Encoded() decodes them from their blocks, Exact() reads the protected copy (sinks for
// t < sink_tokens, the ring otherwise).
class RowSource {
 public:
  RowSource(const KvLayerView& v, int kv, int64_t h) : v_(v), kv_(kv), h_(h) {}

  // Tokens must lie in encoded blocks (t1 <= n_blocks * block_tokens).
  void Encoded(int64_t t0, int64_t t1, float* out) const {
    const KvCodec* codec = kv_ ? v_.v_codec : v_.k_codec;
    const uint8_t* base = kv_ ? v_.v_base : v_.k_base;
    const int64_t bytes = kv_ ? v_.v_block_bytes : v_.k_block_bytes;
    for (int64_t t = t0; t < t1;) {
      const int64_t b = t / v_.block_tokens;
      const int64_t end = std::min(t1, (b + 1) * v_.block_tokens);
      const uint8_t* slab =
          base + static_cast<int64_t>(v_.block_table[b]) * bytes + h_ * codec->slab_bytes();
      codec->Decode(slab, t - b * v_.block_tokens, end - b * v_.block_tokens,
                    out + (t - t0) * v_.head_dim);
      t = end;
    }
  }

  void Exact(int64_t t0, int64_t t1, float* out) const {
    for (int64_t t = t0; t < t1; ++t) {
      const bool sink = t < v_.sink_tokens;
      const uint8_t* base = sink ? (kv_ ? v_.v_sinks : v_.k_sinks) : (kv_ ? v_.v_ring : v_.k_ring);
      const int64_t row = sink ? t : t % v_.ring_tokens;
      const int64_t off = (row * v_.n_kv_heads + h_) * v_.head_dim;
      float* o = out + (t - t0) * v_.head_dim;
      if (v_.storage == KvStorage::kF32) {
        std::copy_n(reinterpret_cast<const float*>(base) + off, v_.head_dim, o);
      } else {
        Fp16ToFp32Row(reinterpret_cast<const uint16_t*>(base) + off, o, v_.head_dim);
      }
    }
  }

 private:
  const KvLayerView& v_;
  int kv_;
  int64_t h_;
};

constexpr int64_t kTileTokens = 64;
constexpr int64_t kTileQueries = 32;

// The rows of token tile [s, e) of one head in both forms a query may need: as decoded
// from encoded blocks and as kept in the protected storage (sinks / ring). Each form is
// produced once per tile and shared by every query of the query tile.
struct TileRows {
  std::vector<float> encoded, exact;
};

}  // namespace

int64_t KvStorageBytes(KvStorage s) { return s == KvStorage::kF32 ? 4 : 2; }

int64_t RingStart(const KvLayerView& v, int64_t p) {
  // Blocks completed by position p are encoded unless they reach into the window.
  const int64_t full = std::min(v.n_blocks, (p + 1) / v.block_tokens);
  return std::min(full * v.block_tokens, std::max<int64_t>(0, p + 1 - v.window_tokens));
}

void Attention(const AttentionQuery& query, const KvLayerView& kv, float* out,
               ThreadPool* pool) {
  const int64_t d = kv.head_dim;
  const int64_t group = query.n_heads / kv.n_kv_heads;
  const int64_t n_qtiles = (query.n_q + kTileQueries - 1) / kTileQueries;
  // One task per (query tile, kv head): each decoded K/V tile serves every query of the
  // tile and the whole GQA head group. Online softmax (flash attention) keeps the state
  // per query row: running max m, sum l, and the weighted V accumulator.
  const int64_t n_tasks = n_qtiles * kv.n_kv_heads;
  auto run = [&](int64_t t0, int64_t t1, int) {
    std::vector<float> acc, m, l, sc(static_cast<size_t>(kTileTokens));
    TileRows kt, vt;
    kt.encoded.resize(kTileTokens * d);
    kt.exact.resize(kTileTokens * d);
    vt.encoded.resize(kTileTokens * d);
    vt.exact.resize(kTileTokens * d);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t qt = task / kv.n_kv_heads;
      const int64_t g = task % kv.n_kv_heads;
      const int64_t i0 = qt * kTileQueries;
      const int64_t i1 = std::min(query.n_q, i0 + kTileQueries);
      const int64_t nq = i1 - i0;
      const int64_t rows = nq * group;
      acc.assign(static_cast<size_t>(rows * d), 0.0f);
      m.assign(static_cast<size_t>(rows), -INFINITY);
      l.assign(static_cast<size_t>(rows), 0.0f);
      int64_t p_max = 0, p_min = INT64_MAX;
      for (int64_t i = i0; i < i1; ++i) {
        p_max = std::max<int64_t>(p_max, query.positions[i]);
        p_min = std::min<int64_t>(p_min, query.positions[i]);
      }
      const int64_t n_ctx = std::min(p_max + 1, kv.n_tokens);
      const RowSource keys(kv, 0, g), values(kv, 1, g);
      for (int64_t s = 0; s < n_ctx; s += kTileTokens) {
        const int64_t e = std::min(n_ctx, s + kTileTokens);
        // Which forms does some query of this tile read? Token t is exact for query p when
        // it is a sink or at/after RingStart(p), which grows with p; encoded otherwise.
        const int64_t enc_end = std::min(e, RingStart(kv, p_max));
        const int64_t enc_begin = std::max(s, std::min(kv.sink_tokens, enc_end));
        if (enc_begin < enc_end) {
          keys.Encoded(enc_begin, enc_end, kt.encoded.data() + (enc_begin - s) * d);
          values.Encoded(enc_begin, enc_end, vt.encoded.data() + (enc_begin - s) * d);
        }
        // Exact rows: sinks in the tile, and tokens some query reads from the ring.
        const int64_t sink_end = std::min(e, kv.sink_tokens);
        if (s < sink_end) {
          keys.Exact(s, sink_end, kt.exact.data());
          values.Exact(s, sink_end, vt.exact.data());
        }
        const int64_t ring_begin = std::max({s, sink_end, RingStart(kv, p_min)});
        if (ring_begin < e) {
          keys.Exact(ring_begin, e, kt.exact.data() + (ring_begin - s) * d);
          values.Exact(ring_begin, e, vt.exact.data() + (ring_begin - s) * d);
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
            for (int64_t t = s; t < te; ++t) {
              const bool exact = t < sk || t >= ring;
              const float* krow = (exact ? kt.exact : kt.encoded).data() + (t - s) * d;
              sc[t - s] = internal::DotF32(qv, krow, d) * query.scale;
              tile_max = std::max(tile_max, sc[t - s]);
            }
            const float m_new = std::max(m[r], tile_max);
            const float correction = std::exp(m[r] - m_new);
            float* a = acc.data() + r * d;
            if (correction != 1.0f) {
              for (int64_t x = 0; x < d; ++x) a[x] *= correction;
            }
            float lsum = l[r] * correction;
            for (int64_t t = s; t < te; ++t) {
              const float pr = std::exp(sc[t - s] - m_new);
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
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = 0; j < group; ++j) {
          const int64_t r = (i - i0) * group + j;
          const float inv = 1.0f / l[r];
          float* o = out + (i * query.n_heads + g * group + j) * d;
          for (int64_t x = 0; x < d; ++x) o[x] = acc[r * d + x] * inv;
        }
      }
    }
  };
  if (pool == nullptr) {
    run(0, n_tasks, 0);
  } else {
    pool->ParallelFor(n_tasks, run);
  }
}

}  // namespace quantkv::kernels
