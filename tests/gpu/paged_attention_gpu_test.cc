// kernels::cuda::PagedAttention against kernels::Attention over a real (CPU) KvCache.
//
// On the CPU (no GPU needed): argument errors come back as InvalidArgument before anything
// is launched, and the workspace size follows the documented chunking. The cache-building
// half of the GPU tests (policies parse, slab formats match the codecs, the CPU reference
// runs) also runs here before the test skips.
// On a GPU: a KvCache with several sequences (contexts 1, 7, 130, 1000, 5000) and random
// K/V under several policies (fp16, int8, int4-comp, int2-comp, fp8, and odd geometries:
// head_dim 80 / 100 / 128 / 256, GQA groups 1 / 2 / 3 / 8 / 12, fp32 protected rows, token groups
// narrower than a decode run), its pool bytes, block tables, rings and sinks copied to the
// device; decode rows (one per sequence), a prefill batch (many positions of several
// sequences) and a batch that needs no split are compared with the CPU kernel.
//
// Inputs are random per run (seed printed); QUANTKV_TEST_SEED replays one.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/kv_codec.h"
#include "kernels/kv_slab_format.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/kv/kv_policy.h"
#include "tests/gpu/gpu_test_util.h"

namespace quantkv {
namespace {

using gpu_test::DeviceBuffer;
using kernels::cuda::DeviceAttentionBatch;
using kernels::cuda::DeviceKvLayer;
using kernels::cuda::DeviceSeqKv;
using kernels::cuda::PagedAttention;
using kernels::cuda::PagedAttentionWorkspaceBytes;

// ---------------------------------------------------------------- host-side checks

// A layer and batch that pass every check but one that each test breaks. The pointers are
// never dereferenced: validation fails before any launch.
struct Args {
  DeviceKvLayer kv;
  DeviceAttentionBatch b;
  Args() {
    const kernels::KvCodecSpec spec = *kernels::ParseKvCodecSpec("int4:g32:asym");
    kv.k_format = kv.v_format = *kernels::KvSlabFormatOf(spec, 64, 32);
    kv.k_base = kv.v_base = Fake<uint8_t>();
    kv.block_stride = 2 * 3 * kv.k_format.slab_bytes;
    kv.n_kv_heads = 3;
    kv.head_dim = 64;
    kv.block_tokens = 32;
    kv.ring_tokens = 64;
    b.q = Fake<float>();
    b.positions = Fake<int32_t>();
    b.row_seq = Fake<int32_t>();
    b.seqs = Fake<DeviceSeqKv>();
    b.rows = 4;
    b.n_heads = 9;
    b.scale = 0.125f;
    b.max_context = 5000;
    b.out = Fake<float>();
    b.workspace_bytes = PagedAttentionWorkspaceBytes(4, 9, 64, 5000);
    b.workspace = Fake<void>();
  }
  template <typename T>
  static T* Fake() {
    return reinterpret_cast<T*>(uintptr_t{1} << 20);
  }
};

void ExpectInvalid(const Args& a, const char* what) {
  const absl::Status s = PagedAttention(a.kv, a.b, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << what << ": " << s;
}

TEST(PagedAttentionHost, RejectsBadArgumentsBeforeLaunching) {
  {
    Args a;
    a.b.rows = -1;
    ExpectInvalid(a, "negative rows");
  }
  {
    Args a;
    a.b.n_heads = 10;
    ExpectInvalid(a, "heads not a multiple of KV heads");
  }
  {
    Args a;
    a.b.n_heads = 0;
    ExpectInvalid(a, "no heads");
  }
  {
    Args a;
    a.kv.n_kv_heads = 0;
    ExpectInvalid(a, "no KV heads");
  }
  {
    Args a;
    a.kv.head_dim = 128;
    ExpectInvalid(a, "head_dim differs from the formats'");
  }
  {
    Args a;
    a.kv.v_format = *kernels::KvSlabFormatOf(*kernels::ParseKvCodecSpec("fp16"), 128, 32);
    ExpectInvalid(a, "V format for another head_dim");
  }
  {
    Args a;
    a.kv.block_tokens = 64;
    ExpectInvalid(a, "block size differs from the formats'");
  }
  {
    Args a;
    a.kv.head_dim = 512;
    a.kv.k_format.head_dim = a.kv.v_format.head_dim = 512;
    ExpectInvalid(a, "head_dim above 256");
  }
  {
    Args a;
    a.kv.ring_tokens = 0;
    ExpectInvalid(a, "no ring");
  }
  {
    Args a;
    a.kv.sink_tokens = -1;
    ExpectInvalid(a, "negative sinks");
  }
  {
    Args a;
    a.kv.k_format.bits = 5;
    ExpectInvalid(a, "5-bit codes");
  }
  {
    Args a;
    a.b.max_context = -1;
    ExpectInvalid(a, "negative max_context");
  }
  for (int which = 0; which < 7; ++which) {
    Args a;
    switch (which) {
      case 0:
        a.b.q = nullptr;
        break;
      case 1:
        a.b.positions = nullptr;
        break;
      case 2:
        a.b.row_seq = nullptr;
        break;
      case 3:
        a.b.seqs = nullptr;
        break;
      case 4:
        a.b.out = nullptr;
        break;
      case 5:
        a.kv.k_base = nullptr;
        break;
      default:
        a.kv.v_base = nullptr;
        break;
    }
    ExpectInvalid(a, "null pointer");
  }
  {
    Args a;
    a.b.workspace_bytes -= 4;
    ExpectInvalid(a, "workspace too small");
  }
  {
    Args a;
    a.b.workspace = nullptr;
    ExpectInvalid(a, "no workspace");
  }
  {
    Args a;  // nothing to do: OK without touching the device
    a.b.rows = 0;
    a.b.q = nullptr;
    EXPECT_TRUE(PagedAttention(a.kv, a.b, nullptr).ok());
  }
}

// The documented split: chunks of whole 128-token tiles, one per tile, at most
// max(1, 1024 / rows) of them; partials of (head_dim + 2) floats per row, head and chunk, and
// no workspace when a row is not split.
int64_t ExpectedWorkspace(int64_t rows, int64_t heads, int64_t d, int64_t ctx) {
  const int64_t tiles = (std::max<int64_t>(ctx, 1) + 127) / 128;
  const int64_t want = std::min(tiles, std::max<int64_t>(1, 1024 / rows));
  const int64_t per = (tiles + want - 1) / want;
  const int64_t chunks = (tiles + per - 1) / per;
  return chunks <= 1 ? 0 : rows * heads * chunks * (d + 2) * 4;
}

TEST(PagedAttentionHost, WorkspaceBytes) {
  EXPECT_EQ(PagedAttentionWorkspaceBytes(1, 9, 64, 1), 0);
  EXPECT_EQ(PagedAttentionWorkspaceBytes(1, 9, 64, 128), 0);
  EXPECT_EQ(PagedAttentionWorkspaceBytes(1, 9, 64, 129), 1 * 9 * 2 * 66 * 4);
  EXPECT_EQ(PagedAttentionWorkspaceBytes(1, 9, 64, 5000), 1 * 9 * 40 * 66 * 4);
  EXPECT_EQ(PagedAttentionWorkspaceBytes(0, 9, 64, 5000), 0);
  EXPECT_EQ(PagedAttentionWorkspaceBytes(2048, 9, 64, 5000), 0);  // prefill: no split
  for (int64_t rows : {1, 3, 7, 64, 266, 1000, 1024, 1025}) {
    for (int64_t ctx : {0, 1, 127, 128, 129, 1000, 5000, 70000, 1 << 20}) {
      const int64_t ws = PagedAttentionWorkspaceBytes(rows, 32, 128, ctx);
      EXPECT_EQ(ws, ExpectedWorkspace(rows, 32, 128, ctx)) << rows << " rows, context " << ctx;
      // Bounded for any context: at most 1024 (row, chunk) partials per head.
      EXPECT_LE(ws, int64_t{1024} * 32 * 130 * 4);
    }
  }
}

// ---------------------------------------------------------------- against the CPU kernel

struct Config {
  std::string policy;
  int64_t n_kv_heads, n_heads, head_dim;
  std::vector<int64_t> contexts;
};

struct Batch {
  std::vector<int32_t> positions, row_seq;  // row_seq: index into the cache's sequences
};

class CacheCase {
 public:
  static constexpr int64_t kLayer =
      1;  // of two: the second layer's region is not at the pool start
  static constexpr int64_t kMaxStep = 256;

  // Builds the cache and fills every sequence with random rows (both layers).
  void Build(const Config& c, std::mt19937_64& rng) {
    c_ = c;
    absl::StatusOr<KvPolicy> policy = ParseKvPolicy(c.policy);
    ASSERT_TRUE(policy.ok()) << c.policy << ": " << policy.status();
    KvCacheConfig cc;
    cc.n_layers = 2;
    cc.n_kv_heads = c.n_kv_heads;
    cc.head_dim = c.head_dim;
    cc.policy = *policy;
    cc.max_bytes = int64_t{48} << 20;
    cc.max_step_tokens = kMaxStep;
    absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(cc);
    ASSERT_TRUE(cache.ok()) << c.policy << ": " << cache.status();
    cache_ = std::move(*cache);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const int64_t row = c.n_kv_heads * c.head_dim;
    seqs_.resize(c.contexts.size());
    for (size_t i = 0; i < c.contexts.size(); ++i) {
      SequenceKv& seq = seqs_[i];
      const int64_t n = c.contexts[i];
      ASSERT_TRUE(cache_->Reserve(seq, n).ok()) << c.policy << ": context " << n;
      for (int64_t pos = 0; pos < n; pos += kMaxStep) {
        const int64_t step = std::min(kMaxStep, n - pos);
        for (int64_t l = 0; l < 2; ++l) {
          std::vector<float> k(step * row), v(step * row);
          for (int64_t e = 0; e < step * row; ++e) {
            // A per-channel offset in K, as real keys have (what per-channel scales are for).
            k[e] = normal(rng) + 0.5f * static_cast<float>(e % c.head_dim % 5);
            v[e] = normal(rng);
          }
          cache_->Write(seq, l, pos, step, k.data(), v.data());
        }
        seq.length = pos + step;
      }
    }
  }

  // Decode: one row per sequence at its last position.
  Batch Decode() const {
    Batch b;
    for (size_t i = 0; i < seqs_.size(); ++i) {
      b.positions.push_back(static_cast<int32_t>(c_.contexts[i] - 1));
      b.row_seq.push_back(static_cast<int32_t>(i));
    }
    return b;
  }
  // Prefill: the last up-to-`per_seq` positions of every sequence (all the ring still
  // serves), shuffled so rows of one sequence are not adjacent.
  Batch Prefill(int64_t per_seq, std::mt19937_64& rng, int64_t max_context = INT64_MAX) const {
    std::vector<std::pair<int32_t, int32_t>> rows;
    for (size_t i = 0; i < seqs_.size(); ++i) {
      const int64_t n = c_.contexts[i];
      if (n > max_context) continue;
      for (int64_t p = std::max<int64_t>(0, n - per_seq); p < n; ++p) {
        rows.push_back({static_cast<int32_t>(p), static_cast<int32_t>(i)});
      }
    }
    std::shuffle(rows.begin(), rows.end(), rng);
    Batch b;
    for (auto [p, s] : rows) {
      b.positions.push_back(p);
      b.row_seq.push_back(s);
    }
    return b;
  }

  // Runs the batch on the device and on the CPU and compares.
  void Compare(const Batch& batch, std::mt19937_64& rng, const std::string& what) {
    const int64_t d = c_.head_dim, heads = c_.n_heads;
    const int64_t rows = static_cast<int64_t>(batch.positions.size());
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> q(rows * heads * d);
    for (float& x : q) x = 2.0f * normal(rng);  // peaky enough that the softmax matters
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));

    // CPU reference, each sequence's rows in one call (the tiled kernel, fp32).
    std::vector<float> ref(rows * heads * d);
    for (size_t s = 0; s < seqs_.size(); ++s) {
      std::vector<int64_t> idx;
      for (int64_t r = 0; r < rows; ++r) {
        if (batch.row_seq[r] == static_cast<int32_t>(s)) idx.push_back(r);
      }
      if (idx.empty()) continue;
      std::vector<float> qs(idx.size() * heads * d), os(idx.size() * heads * d);
      std::vector<int32_t> ps(idx.size());
      for (size_t i = 0; i < idx.size(); ++i) {
        std::copy_n(q.data() + idx[i] * heads * d, heads * d, qs.data() + i * heads * d);
        ps[i] = batch.positions[idx[i]];
      }
      kernels::AttentionQuery aq;
      aq.q = qs.data();
      aq.n_q = static_cast<int64_t>(idx.size());
      aq.n_heads = heads;
      aq.positions = ps.data();
      aq.scale = scale;
      aq.fused_decode = false;
      const kernels::KvLayerView view = cache_->View(seqs_[s], kLayer, c_.contexts[s]);
      kernels::Attention(aq, view, os.data(), nullptr);
      for (size_t i = 0; i < idx.size(); ++i) {
        std::copy_n(os.data() + i * heads * d, heads * d, ref.data() + idx[i] * heads * d);
      }
    }

    // The device layer: the CPU pool's region of this layer, as is.
    const kernels::KvLayerView v0 = cache_->View(seqs_[0], kLayer, c_.contexts[0]);
    DeviceKvLayer kv;
    for (int x = 0; x < 2; ++x) {
      const kernels::KvSlabs& slabs = x == 0 ? v0.k : v0.v;
      const kernels::KvCodec* codec = slabs.codecs[0];
      absl::StatusOr<kernels::KvSlabFormat> f =
          kernels::KvSlabFormatOf(codec->spec(), d, v0.block_tokens);
      ASSERT_TRUE(f.ok()) << c_.policy << ": " << f.status();
      ASSERT_EQ(f->slab_bytes, codec->slab_bytes()) << c_.policy;
      for (int64_t h = 0; h < c_.n_kv_heads; ++h) {
        ASSERT_EQ(slabs.slab_offsets[h], h * f->slab_bytes) << c_.policy;
      }
      (x == 0 ? kv.k_format : kv.v_format) = *f;
    }
    ASSERT_EQ(v0.k.block_bytes, v0.v.block_bytes);
    ASSERT_GT(v0.v.base, v0.k.base);
    kv.block_stride = v0.k.block_bytes;
    kv.n_kv_heads = c_.n_kv_heads;
    kv.head_dim = d;
    kv.block_tokens = v0.block_tokens;
    kv.ring_tokens = v0.ring_tokens;
    kv.sink_tokens = v0.sink_tokens;
    kv.window_tokens = v0.window_tokens;
    kv.storage = v0.storage;
    if (!device_ready_) {
      // The CPU-only half ends here (the reference ran, the formats match).
      reference_only_ = true;
      return;
    }
    const int64_t region = cache_->allocator().num_blocks() * kv.block_stride;
    std::vector<uint8_t> pool(v0.k.base, v0.k.base + region);
    DeviceBuffer d_pool(pool);
    kv.k_base = d_pool.as<uint8_t>();
    kv.v_base = d_pool.as<uint8_t>() + (v0.v.base - v0.k.base);

    std::vector<std::unique_ptr<DeviceBuffer>> keep;
    std::vector<DeviceSeqKv> seqs(seqs_.size());
    for (size_t s = 0; s < seqs_.size(); ++s) {
      const SequenceKv& sq = seqs_[s];
      const kernels::KvLayerView view = cache_->View(sq, kLayer, c_.contexts[s]);
      std::vector<int32_t> table = sq.blocks;
      if (table.empty()) table.push_back(0);
      keep.push_back(std::make_unique<DeviceBuffer>(table));
      seqs[s].block_table = keep.back()->as<int32_t>();
      seqs[s].n_blocks = view.n_blocks;
      seqs[s].n_tokens = c_.contexts[s];
      keep.push_back(std::make_unique<DeviceBuffer>(sq.ring));
      const uint8_t* ring = keep.back()->as<uint8_t>();
      seqs[s].k_ring = ring + (view.k_ring - sq.ring.data());
      seqs[s].v_ring = ring + (view.v_ring - sq.ring.data());
      if (view.sink_tokens > 0) {
        keep.push_back(std::make_unique<DeviceBuffer>(sq.sinks));
        const uint8_t* sinks = keep.back()->as<uint8_t>();
        seqs[s].k_sinks = sinks + (view.k_sinks - sq.sinks.data());
        seqs[s].v_sinks = sinks + (view.v_sinks - sq.sinks.data());
      }
    }
    DeviceBuffer d_seqs(seqs.size() * sizeof(DeviceSeqKv));
    d_seqs.Upload(seqs.data());
    DeviceBuffer d_q(q), d_pos(batch.positions), d_row_seq(batch.row_seq);
    DeviceBuffer d_out(rows * heads * d * sizeof(float));
    ASSERT_EQ(cudaMemset(d_out.get(), 0xff, d_out.bytes()), cudaSuccess);  // NaN: unwritten
    int64_t max_context = 0;
    for (int32_t p : batch.positions) max_context = std::max<int64_t>(max_context, p + 1);
    const int64_t ws_bytes = PagedAttentionWorkspaceBytes(rows, heads, d, max_context);
    DeviceBuffer d_ws(ws_bytes);

    DeviceAttentionBatch ab;
    ab.q = d_q.f32();
    ab.positions = d_pos.as<int32_t>();
    ab.row_seq = d_row_seq.as<int32_t>();
    ab.seqs = d_seqs.as<DeviceSeqKv>();
    ab.rows = rows;
    ab.n_heads = heads;
    ab.scale = scale;
    ab.max_context = max_context;
    ab.out = d_out.f32();
    ab.workspace = d_ws.get();
    ab.workspace_bytes = ws_bytes;
    const absl::Status st = PagedAttention(kv, ab, nullptr);
    ASSERT_TRUE(st.ok()) << c_.policy << " " << what << ": " << st;
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << c_.policy << " " << what;
    const std::vector<float> got = d_out.ToHost<float>();

    int64_t bad = 0;
    double worst = 0;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t e = 0; e < heads * d; ++e) {
        const float want = ref[r * heads * d + e], have = got[r * heads * d + e];
        const double err = std::fabs(static_cast<double>(want) - have);
        const double tol = 1e-4 * std::max(1.0, std::fabs(static_cast<double>(want)));
        worst = std::max(worst, err / tol);
        if (!(err <= tol) && bad++ < 8) {
          ADD_FAILURE() << c_.policy << " " << what << ": row " << r << " (position "
                        << batch.positions[r] << " of context " << c_.contexts[batch.row_seq[r]]
                        << "), head " << e / d << ", channel " << e % d << ": gpu " << have
                        << ", cpu " << want;
        }
      }
    }
    EXPECT_EQ(bad, 0) << c_.policy << " " << what << ": " << bad << " of " << rows * heads * d
                      << " outputs off";
    std::cout << "[ " << c_.policy << " " << what << " ] " << rows << " rows, max context "
              << max_context << ", worst error " << worst << " x tolerance\n";
  }

  bool device_ready_ = false;
  bool reference_only_ = false;

 private:
  Config c_;
  std::unique_ptr<KvCache> cache_;
  std::vector<SequenceKv> seqs_;
};

void RunConfig(const Config& c) {
  const uint64_t seed = gpu_test::FreshSeed();
  std::mt19937_64 rng(seed);
  CacheCase cc;
  cc.device_ready_ = kernels::cuda::CudaDeviceCount() > 0;
  cc.Build(c, rng);
  if (testing::Test::HasFatalFailure()) return;
  cc.Compare(cc.Decode(), rng, "decode");
  if (testing::Test::HasFatalFailure()) return;
  cc.Compare(cc.Prefill(64, rng), rng, "prefill");
  if (testing::Test::HasFatalFailure()) return;
  cc.Compare(cc.Prefill(128, rng, /*max_context=*/128), rng, "unsplit");
  if (cc.reference_only_) GTEST_SKIP() << "no CUDA device: only the CPU half ran";
}

const std::vector<int64_t> kContexts = {1, 7, 130, 1000, 5000};

TEST(PagedAttentionGpu, Fp16) { RunConfig({"fp16", 3, 9, 64, kContexts}); }
TEST(PagedAttentionGpu, Int8) { RunConfig({"int8", 3, 9, 64, kContexts}); }
TEST(PagedAttentionGpu, Int4Comp) { RunConfig({"int4-comp", 3, 9, 64, kContexts}); }
TEST(PagedAttentionGpu, Int2Comp) { RunConfig({"int2-comp", 3, 9, 64, kContexts}); }
TEST(PagedAttentionGpu, Fp8) { RunConfig({"fp8", 3, 9, 64, kContexts}); }
// 7 query heads per KV head (Qwen2.5-0.5B's 14/2): a group between 4 and 8 once lost heads.
TEST(PagedAttentionGpu, GroupOfSeven) { RunConfig({"int4-comp", 2, 14, 64, kContexts}); }

// head_dim 128, a GQA group of 8.
TEST(PagedAttentionGpu, HeadDim128Group8) {
  RunConfig({"int4-comp", 2, 16, 128, {1, 7, 300, 2000}});
}
// head_dim 256 (32 run lanes), a group of 12 (two head subgroups, the second partial),
// symmetric token groups for K, fp8 V.
TEST(PagedAttentionGpu, HeadDim256Group12) {
  RunConfig({"k=int4:g32:sym,v=fp8:g32,sink=2,window=16,block=64", 1, 12, 256, {5, 130, 700}});
}
// head_dim 80 (padded run lanes), a group of 2, 3-bit per-channel K, small blocks.
TEST(PagedAttentionGpu, HeadDim80Int3) {
  RunConfig({"k=int3:chan,v=int4:g16:asym,sink=1,window=4,block=16", 2, 4, 80, {1, 50, 333}});
}
// Token groups narrower than a decode run (element-wise fallback), per-block scales, no GQA.
TEST(PagedAttentionGpu, NarrowGroupsAndBlockScales) {
  RunConfig({"k=int4:g4:asym,v=int2:block,block=32,window=40", 4, 4, 64, {1, 7, 130, 1000}});
}
// head_dim 100: the last decode run is partial (element-wise); odd token rows of codes and
// the per-channel minima lie where the wide loads cannot take them (byte-wise paths).
TEST(PagedAttentionGpu, HeadDim100PartialRun) {
  RunConfig({"k=int4:chan,v=int8:g50:asym,block=32,window=40", 2, 6, 100, {1, 7, 130, 1000}});
}
// fp32 protected rows (an fp32 cache), bf16 and fp32 slabs.
TEST(PagedAttentionGpu, Fp32Storage) {
  RunConfig({"fp32,sink=3,window=5,block=16", 2, 6, 64, {1, 7, 130, 1000}});
}
TEST(PagedAttentionGpu, Bf16) { RunConfig({"bf16,sink=2,block=32", 3, 9, 64, {1, 7, 130, 1000}}); }

}  // namespace
}  // namespace quantkv
