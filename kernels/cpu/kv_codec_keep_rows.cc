// Promoted token rows: the inner codec's slab followed by `keep_rows` slots, each a uint16
// token index (0xFFFF: free), an fp32 priority and head_dim fp16 values. Encode leaves every
// slot free; KeepRow fills them afterwards with the rows the cache is told matter most
// (router entropy, attention mass), so the choice can use what is only known after the
// block was written; Decode overwrites kept rows with their exact values. A mixed-precision
// cache at token granularity: most tokens at the inner codec's bits, a few in fp16, within
// a fixed budget per block.
#include <cstring>
#include <memory>
#include <vector>

#include "kernels/cpu/kv_codec_internal.h"
#include "kernels/cpu/unaligned.h"
#include "kernels/dequantize.h"
#include "kernels/fp16.h"

namespace quantkv::kernels::kv_codec_internal {
namespace {

constexpr uint16_t kFree = 0xFFFF;

class KeepRowsCodec final : public KvCodec {
 public:
  KeepRowsCodec(const KvCodecSpec& spec, int64_t head_dim, int64_t block_tokens,
                std::unique_ptr<KvCodec> inner)
      : KvCodec(spec, head_dim, block_tokens),
        inner_(std::move(inner)),
        slot_bytes_(2 + 4 + 2 * head_dim) {}

  int64_t slab_bytes() const override {
    return inner_->slab_bytes() + spec().keep_rows * slot_bytes_;
  }

  void Encode(const float* x, uint8_t* slab) const override {
    inner_->Encode(x, slab);
    for (int s = 0; s < spec().keep_rows; ++s) internal::StoreU16(Slot(slab, s), kFree);
  }

  void Decode(const uint8_t* slab, int64_t t0, int64_t t1, float* out) const override {
    inner_->Decode(slab, t0, t1, out);
    const int64_t d = head_dim();
    std::vector<uint16_t> half;
    for (int s = 0; s < spec().keep_rows; ++s) {
      const uint8_t* slot = Slot(slab, s);
      const uint16_t t = internal::LoadU16(slot);
      if (t == kFree || t < t0 || t >= t1) continue;
      half.resize(static_cast<size_t>(d));
      std::memcpy(half.data(), Values(slot), half.size() * 2);  // may be unaligned
      Fp16ToFp32Row(half.data(), out + (t - t0) * d, d);
    }
  }

  uint64_t HeldRows(const uint8_t* slab, int64_t t0, int64_t t1) const override {
    if (!drops_rows()) return KvCodec::HeldRows(slab, t0, t1);
    uint64_t held = 0;
    for (int s = 0; s < spec().keep_rows; ++s) {
      const uint16_t t = internal::LoadU16(Slot(slab, s));
      if (t != kFree && t >= t0 && t < t1) held |= uint64_t{1} << (t - t0);
    }
    return held;
  }

  bool KeepRow(uint8_t* slab, int64_t t, const float* row, float priority) const override {
    if (t < 0 || t >= block_tokens() || !(priority == priority)) return false;
    int target = -1;
    float lowest = 0;
    for (int s = 0; s < spec().keep_rows; ++s) {
      uint8_t* slot = Slot(slab, s);
      const uint16_t kept = internal::LoadU16(slot);
      if (kept == t) {  // already kept: keep the higher priority
        if (priority > Priority(slot)) SetPriority(slot, priority);
        return true;
      }
      if (kept == kFree) {
        if (target < 0 || lowest > -INFINITY) target = s, lowest = -INFINITY;
        continue;
      }
      if (target < 0 || Priority(slot) < lowest) target = s, lowest = Priority(slot);
    }
    if (target < 0 || !(priority > lowest)) return false;
    uint8_t* slot = Slot(slab, target);
    internal::StoreU16(slot, static_cast<uint16_t>(t));
    SetPriority(slot, priority);
    // Through a buffer: the slot's values sit at an offset that may not be 2-byte aligned.
    std::vector<uint16_t> half(static_cast<size_t>(head_dim()));
    Fp32ToFp16Row(row, half.data(), head_dim());
    std::memcpy(Values(slot), half.data(), half.size() * 2);
    return true;
  }

 private:
  uint8_t* Slot(uint8_t* slab, int s) const {
    return slab + inner_->slab_bytes() + s * slot_bytes_;
  }
  const uint8_t* Slot(const uint8_t* slab, int s) const {
    return slab + inner_->slab_bytes() + s * slot_bytes_;
  }
  static float Priority(const uint8_t* slot) {
    float p;
    std::memcpy(&p, slot + 2, 4);
    return p;
  }
  static void SetPriority(uint8_t* slot, float p) { std::memcpy(slot + 2, &p, 4); }
  static uint8_t* Values(uint8_t* slot) { return slot + 6; }
  static const uint8_t* Values(const uint8_t* slot) { return slot + 6; }

  std::unique_ptr<KvCodec> inner_;
  int64_t slot_bytes_;
};

// drop's inner codec: no bytes; rows decode to zeros (finite, so a skipped token's row in a
// decoded tile is harmless).
class DropCodec final : public KvCodec {
 public:
  DropCodec(const KvCodecSpec& spec, int64_t head_dim, int64_t block_tokens)
      : KvCodec(spec, head_dim, block_tokens) {}
  int64_t slab_bytes() const override { return 0; }
  void Encode(const float*, uint8_t*) const override {}
  void Decode(const uint8_t*, int64_t t0, int64_t t1, float* out) const override {
    std::memset(out, 0, static_cast<size_t>((t1 - t0) * head_dim()) * sizeof(float));
  }
};

}  // namespace

std::unique_ptr<KvCodec> MakeDropCodec(const KvCodecSpec& spec, int64_t head_dim,
                                       int64_t block_tokens) {
  return std::make_unique<DropCodec>(spec, head_dim, block_tokens);
}

std::unique_ptr<KvCodec> MakeKeepRowsCodec(const KvCodecSpec& spec, int64_t head_dim,
                                           int64_t block_tokens, std::unique_ptr<KvCodec> inner) {
  return std::make_unique<KeepRowsCodec>(spec, head_dim, block_tokens, std::move(inner));
}

}  // namespace quantkv::kernels::kv_codec_internal
