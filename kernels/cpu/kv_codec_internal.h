// Internal to kernels/cpu: shared between kv_codec.cc, kv_codec_float.cc and
// kv_codec_uniform.cc (no public header).
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"

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

// Defined in kv_codec_keep_rows.cc: drop's inner codec, which stores nothing and decodes
// zeros (the rows a drop:keepN slab does not hold are skipped by attention).
std::unique_ptr<KvCodec> MakeDropCodec(const KvCodecSpec& spec, int64_t head_dim,
                                       int64_t block_tokens);

// Defined in kv_codec_keep_rows.cc: `inner` (spec without keep_rows) plus the kept rows.
std::unique_ptr<KvCodec> MakeKeepRowsCodec(const KvCodecSpec& spec, int64_t head_dim,
                                           int64_t block_tokens, std::unique_ptr<KvCodec> inner);

// Defined in kv_codec_outliers.cc: `inner` (spec without outliers) plus the sparse list.
std::unique_ptr<KvCodec> MakeOutlierCodec(const KvCodecSpec& spec, int64_t head_dim,
                                          int64_t block_tokens, std::unique_ptr<KvCodec> inner);

// Defined in kv_codec_lowrank.cc: `inner` (spec without rank) plus the rank-R residual.
std::unique_ptr<KvCodec> MakeLowRankCodec(const KvCodecSpec& spec, int64_t head_dim,
                                          int64_t block_tokens, std::unique_ptr<KvCodec> inner);

// Defined in kv_codec_lowrank.cc: `inner` plus the per-channel mean residual (meanres).
std::unique_ptr<KvCodec> MakeMeanResidualCodec(const KvCodecSpec& spec, int64_t head_dim,
                                               int64_t block_tokens,
                                               std::unique_ptr<KvCodec> inner);

// Defined in kv_codec_ggml.cc: llama.cpp's q8_0 / q4_0 / q4_1 / iq4_nl (head_dim % 32 == 0).
std::unique_ptr<KvCodec> MakeGgmlCodec(const KvCodecSpec& spec, int64_t head_dim,
                                       int64_t block_tokens);

// Defined in kv_codebook.cc: the non-linear codebook codec; fails when calibrated levels are
// missing or malformed.
absl::StatusOr<std::unique_ptr<KvCodec>> MakeCodebookCodec(const KvCodecConfig& config);

// Defined in kv_vector_quant.cc: product quantization; fails without calibrated centroids.
absl::StatusOr<std::unique_ptr<KvCodec>> MakeVectorCodec(const KvCodecConfig& config);

}  // namespace quantkv::kernels::kv_codec_internal
