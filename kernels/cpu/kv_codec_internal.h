// Internal to kernels/cpu: shared between kv_codec.cc, kv_codec_float.cc and
// kv_codec_uniform.cc (no public header).
#pragma once

#include <cstdint>
#include <memory>

#include "kernels/kv_codec.h"

namespace quantkv::kernels::kv_codec_internal {

// 0: scalar, 1: AVX2+FMA+F16C, 2: AVX-512 F/BW/VL (+AVX2, FMA, F16C). QUANTKV_ISA=scalar|avx2
// caps it, as for the matmul kernels. Defined in kv_codec.cc.
int KvCodecIsa();

// Smallest fp16 >= v (v >= 0; NaN -> 0), capped at the largest finite fp16. Defined in
// kv_codec_uniform.cc.
uint16_t Fp16RoundUp(float v);

// Defined in kv_codec_float.cc.
std::unique_ptr<KvCodec> MakeFloatCodec(const KvCodecSpec& spec, int64_t head_dim,
                                        int64_t block_tokens);
std::unique_ptr<KvCodec> MakeFp8Codec(const KvCodecSpec& spec, int64_t head_dim,
                                      int64_t block_tokens);

// Defined in kv_codec_uniform.cc.
std::unique_ptr<KvCodec> MakeUniformCodec(const KvCodecConfig& config);

// Defined in kv_codec_outliers.cc: `inner` (spec without outliers) plus the sparse list.
std::unique_ptr<KvCodec> MakeOutlierCodec(const KvCodecSpec& spec, int64_t head_dim,
                                          int64_t block_tokens, std::unique_ptr<KvCodec> inner);

}  // namespace quantkv::kernels::kv_codec_internal
