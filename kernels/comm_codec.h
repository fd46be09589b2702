// Codecs for activations exchanged between tensor-parallel ranks (compressed all-reduce,
// runtime/comm/compressed_communicator.h): a float span becomes a self-describing payload
// of group-quantized codes, each group of `group_size` consecutive values with one fp16
// scale, optionally with its `outliers` largest |x| kept apart in fp16 with their indices
// (so that a few outlier channels do not inflate the group's scale).
//
// The quantizers are the KV cache's (kernels/kv_codec.h, symmetric int8/int4 and OCP FP8
// E4M3 per token group), used with one group per "token": the arithmetic, and with it the
// error analysis, is shared.
//
// Payload layout (little-endian):
//   header   16 bytes: "QKVA", version 1, type, group_size, outliers, n (int64)
//   codes    ceil(n / group_size) groups of group_size codes (the last group zero-padded),
//            group_size bytes (int8, fp8) or group_size / 2 (int4, low nibble first)
//   scales   one fp16 per group
//   outliers outliers * groups uint8 indices within their group, then as many fp16 values
// Codes and scales are stored in segments of kCommCodecSegmentGroups groups (each
// segment's codes then its scales), so the payload size is linear in the group count.
//
// Non-finite inputs: a group holding one decodes to NaN throughout (a diverging model
// stays visibly diverged instead of being clamped into the fp16 range).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace quantkv::kernels {

class KvCodec;

enum class CommCodecType : uint8_t {
  kInt8 = 1,     // symmetric, codes in [-127, 127], x = q * scale, scale = amax / 127
  kInt4 = 2,     // symmetric, codes in [-7, 7], scale = amax / 7
  kFp8E4M3 = 3,  // OCP E4M3 (max 448), x = e4m3 * scale, scale = amax / 448
};

struct CommCodecConfig {
  CommCodecType type = CommCodecType::kInt8;
  // Values per fp16 scale: a multiple of 8 in [32, 128].
  int group_size = 64;
  // Largest-|x| values per group kept in fp16 beside the codes: 0 to group_size / 8. The
  // default 2 because the row-parallel partial sums of LLMs have a few huge channels: on
  // SmolLM2-135M at TP=2 they take int8:g64's perplexity change from -0.17% to -0.015%
  // (KL 3e-3 -> 1.6e-4) for 0.75 more bits per value.
  int outliers = 2;

  // Canonical spelling, parseable by ParseCommCodecConfig: "int8:g64:out2", "int4:g32:out0".
  std::string ToString() const;
};

// Grammar: NAME[:gN][:outK] with NAME in int8|int4|fp8; defaults g64, out2. Errors name the
// bad part.
absl::StatusOr<CommCodecConfig> ParseCommCodecConfig(std::string_view text);

// Groups per codes-then-scales segment of a payload (see the layout above).
inline constexpr int64_t kCommCodecSegmentGroups = 4096;
inline constexpr int64_t kCommCodecHeaderBytes = 16;

// What a payload's header says.
struct CommPayloadHeader {
  CommCodecConfig config;
  int64_t n = 0;
};
// Reads and checks a header (magic, version, a valid config, n >= 0, bytes enough for the
// whole payload it describes).
absl::StatusOr<CommPayloadHeader> ReadCommPayloadHeader(const uint8_t* payload, int64_t bytes);

class CommCodec {
 public:
  // Checks the config (type, group size, outlier count).
  static absl::StatusOr<std::unique_ptr<CommCodec>> Create(const CommCodecConfig& config);
  ~CommCodec();

  const CommCodecConfig& config() const { return config_; }

  // Exact size of the payload of n values (header included).
  int64_t PayloadBytes(int64_t n) const;
  // Payload bytes per value for large n, for messages: 8 bits int8 g64 -> 8.25 + header.
  double BitsPerValue() const;

  // x[0..n) -> payload[0..PayloadBytes(n)). Deterministic: the same input bits give the
  // same payload bytes on every machine. Not thread-safe (scratch buffers).
  void Encode(const float* x, int64_t n, uint8_t* payload);
  // payload -> out[0..n). INVALID_ARGUMENT when the header is malformed or disagrees with
  // this codec's config or with n, or `bytes` is short. The result depends only on the
  // payload bytes (every rank decoding a payload gets the same bits).
  absl::Status Decode(const uint8_t* payload, int64_t bytes, float* out, int64_t n);

  // Analytic bound on |decode(encode(x))[i] - x[i]| for one value of magnitude abs_x in a
  // group whose non-outlier values have max |x| = inlier_amax; `outlier` when the value was
  // kept as an fp16 outlier. +inf beyond the fp16 range (inlier_amax / qmax above 65504, an
  // outlier above 65504). Derivation in comm_codec.cc.
  double ElementErrorBound(double inlier_amax, double abs_x, bool outlier) const;
  // ElementErrorBound for every value of x[0..n), with the encoder's outlier choice.
  void ErrorBounds(const float* x, int64_t n, double* bound) const;

 private:
  explicit CommCodec(const CommCodecConfig& config);
  // The `outliers` indices of the largest |v[c]| (c < len), largest first, lower index on ties.
  void PickOutliers(const float* v, int64_t len, uint8_t* idx) const;
  // The codec for a segment of `groups` groups (the full-segment one, or the tail one).
  KvCodec* CodecFor(int64_t groups);

  CommCodecConfig config_;
  int bits_ = 8;
  int64_t record_bytes_ = 0;  // codes + scale of one group
  // KvCodecs over one full segment and over a shorter last segment, made on demand.
  std::unique_ptr<KvCodec> segment_codec_;
  std::unique_ptr<KvCodec> tail_codec_;
  int64_t tail_groups_ = 0;
  std::vector<float> scratch_;
};

namespace cuda {
// CommCodec::Encode / Decode on the device (the compressed exchange's pack and unpack kernels),
// byte for byte the CPU payload for the same input. x, payload, out: device pointers;
// payload holds CommCodec::PayloadBytes(n) bytes. Decode checks the header on the host first
// (it copies the 16 header bytes down) and fails like the CPU's on a bad one.
absl::Status CommEncode(const CommCodecConfig& config, const float* x, int64_t n, uint8_t* payload,
                        void* stream);
absl::Status CommDecode(const CommCodecConfig& config, const uint8_t* payload, int64_t bytes,
                        float* out, int64_t n, void* stream);
}  // namespace cuda

}  // namespace quantkv::kernels
