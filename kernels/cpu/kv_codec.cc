// KV codec specs (parse / canonical spelling), geometry validation and the codec factory.
// The codecs themselves live in kv_codec_float.cc (fp32, fp16, bf16, fp8-e4m3) and
// kv_codec_uniform.cc (int8/4/3/2, symmetric or asymmetric, per token group or per channel).
#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "kernels/cpu/kv_codec_internal.h"
#include "kernels/kv_clip_model.h"
#include "kernels/kv_codec.h"

namespace quantkv::kernels {

namespace kv_codec_internal {

int KvCodecIsa() {
  static const int isa = [] {
    __builtin_cpu_init();
    int best = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      best = 1;
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl")) {
        best = 2;
      }
    }
    if (const char* force = std::getenv("QUANTKV_ISA")) {
      if (std::strcmp(force, "scalar") == 0) best = 0;
      if (std::strcmp(force, "avx2") == 0 && best > 1) best = 1;
    }
    return best;
  }();
  return isa;
}
}  // namespace kv_codec_internal

namespace {

constexpr int kMaxGroup = 1 << 16;

std::string Lower(std::string_view s) {
  std::string r(s);
  for (char& c : r) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return r;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

absl::Status SpecError(std::string_view text, std::string_view what) {
  return absl::InvalidArgumentError(absl::StrFormat("KV codec spec '%s': %s", text, what));
}

// ":nameX" with X the shortest spelling that parses back to the same float.
void AppendOption(std::string& s, const char* name, float v) {
  char buf[64];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  s += name;
  s.append(buf, ec == std::errc() ? end : buf);
}

constexpr struct {
  GgmlKvFormat format;
  const char* name;
  int bits;
} kGgmlFormats[] = {
    {GgmlKvFormat::kQ8_0, "q8_0", 8},
    {GgmlKvFormat::kQ4_0, "q4_0", 4},
    {GgmlKvFormat::kQ4_1, "q4_1", 4},
    {GgmlKvFormat::kIQ4_NL, "iq4_nl", 4},
};

const char* GgmlName(GgmlKvFormat f) {
  for (const auto& g : kGgmlFormats) {
    if (g.format == f) return g.name;
  }
  return "q?";
}

absl::StatusOr<float> ParseFraction(std::string_view text, std::string_view opt,
                                    std::string_view num, const char* what) {
  float v = 0.0f;
  const auto [end, ec] = std::from_chars(num.data(), num.data() + num.size(), v);
  if (ec != std::errc() || end != num.data() + num.size() || !std::isfinite(v) || !(v > 0.0f) ||
      v > 1.0f) {
    return SpecError(text,
                     absl::StrFormat("bad %s '%s' (want %s with 0 < X <= 1)", what, opt, what));
  }
  return v;
}

bool IsFloatType(KvCodecType t) {
  return t == KvCodecType::kF32 || t == KvCodecType::kF16 || t == KvCodecType::kBF16;
}

}  // namespace

std::string KvCodecSpec::ToString() const {
  switch (type) {
    case KvCodecType::kF32:
      return "fp32";
    case KvCodecType::kF16:
      return "fp16";
    case KvCodecType::kBF16:
      return "bf16";
    case KvCodecType::kGgml:
      return GgmlName(ggml);
    case KvCodecType::kVector:
      return absl::StrFormat("pq%dx%d", vector_dims, bits);
    case KvCodecType::kDrop:
      return keep_rows > 0 ? absl::StrFormat("drop:keep%d", keep_rows) : "drop";
    case KvCodecType::kCodebook: {
      std::string s =
          granularity == KvGranularity::kPerChannel
              ? absl::StrFormat("nl%d:chan:%s", bits, symmetric ? "sym" : "asym")
              : absl::StrFormat("nl%d:g%d:%s", bits, group_size, symmetric ? "sym" : "asym");
      if (clip != 1.0f) AppendOption(s, ":clip", clip);
      switch (codebook) {
        case KvCodebookKind::kNormalFloat:
          s += ":nf";
          break;
        case KvCodebookKind::kPower:
          AppendOption(s, ":pow", power);
          break;
        case KvCodebookKind::kLog:
          s += ":log";
          break;
        case KvCodebookKind::kCalibrated:
          s += ":lloyd";
          break;
      }
      if (rank > 0) s += absl::StrFormat(":rank%d", rank);
      if (mean_residual) s += ":meanres";
      if (keep_rows > 0) s += absl::StrFormat(":keep%d", keep_rows);
      return s;
    }
    case KvCodecType::kFp8E4M3:
    case KvCodecType::kUniform:
      break;
  }
  std::string s = type == KvCodecType::kFp8E4M3 ? "fp8" : absl::StrFormat("int%d", bits);
  if (granularity != KvGranularity::kPerTokenGroup) {
    s += granularity == KvGranularity::kPerChannel ? ":chan"
         : granularity == KvGranularity::kPerBlock ? ":block"
                                                   : ":static";
    if (type == KvCodecType::kUniform && symmetric) s += ":sym";
  } else {
    s += absl::StrFormat(":g%d", group_size);
    if (type == KvCodecType::kUniform) s += symmetric ? ":sym" : ":asym";
  }
  if (clip != 1.0f) AppendOption(s, ":clip", clip);
  if (outlier_pct > 0.0f) AppendOption(s, ":out", outlier_pct);
  if (learned_clip) s += ":learnclip";
  if (rank > 0) s += absl::StrFormat(":rank%d", rank);
  if (mean_residual) s += ":meanres";
  if (keep_rows > 0) s += absl::StrFormat(":keep%d", keep_rows);
  return s;
}

absl::StatusOr<KvCodecSpec> ParseKvCodecSpec(std::string_view text_in) {
  const std::string_view trimmed = Trim(text_in);
  const std::string text = Lower(trimmed);
  if (text.empty()) return absl::InvalidArgumentError("KV codec spec: empty");

  const std::string_view all(text);
  const size_t colon = all.find(':');
  const std::string_view name = all.substr(0, colon);
  KvCodecSpec spec;
  if (name == "fp32" || name == "f32") {
    spec.type = KvCodecType::kF32;
    spec.bits = 32;
  } else if (name == "fp16" || name == "f16") {
    spec.type = KvCodecType::kF16;
    spec.bits = 16;
  } else if (name == "bf16") {
    spec.type = KvCodecType::kBF16;
    spec.bits = 16;
  } else if (name == "fp8" || name == "fp8e4m3" || name == "fp8_e4m3") {
    spec.type = KvCodecType::kFp8E4M3;
    spec.bits = 8;
  } else if (name == "int8" || name == "int4" || name == "int3" || name == "int2") {
    spec.type = KvCodecType::kUniform;
    spec.bits = name[3] - '0';
  } else if (name == "nl4" || name == "nl3" || name == "nl2") {
    spec.type = KvCodecType::kCodebook;
    spec.bits = name[2] - '0';
  } else if (name == "drop") {
    // Evicted tokens: only the promoted rows are held, so keepN is required and alone.
    spec.type = KvCodecType::kDrop;
    spec.bits = 0;
    const std::string_view opt =
        colon == std::string_view::npos ? std::string_view() : all.substr(colon + 1);
    int v = 0;
    const bool ok = opt.size() > 4 && opt.substr(0, 4) == "keep" &&
                    std::from_chars(opt.data() + 4, opt.data() + opt.size(), v).ptr ==
                        opt.data() + opt.size() &&
                    v >= 1 && v <= 32;
    if (!ok) {
      return SpecError(trimmed,
                       "drop holds only promoted rows: it takes exactly one option, "
                       "keepN with 1 <= N <= 32 (e.g. drop:keep16)");
    }
    spec.keep_rows = v;
    return spec;
  } else if (name.size() > 2 && name.substr(0, 2) == "pq") {
    // pqMxB: M channels per sub-vector, B-bit centroid indices.
    const size_t x = name.find('x');
    int m = 0, b = 0;
    bool ok = x != std::string_view::npos && x > 2;
    if (ok) {
      const char* mid = name.data() + x;
      const char* end = name.data() + name.size();
      const auto rm = std::from_chars(name.data() + 2, mid, m);
      const auto rb = std::from_chars(mid + 1, end, b);
      ok = rm.ec == std::errc() && rm.ptr == mid && rb.ec == std::errc() && rb.ptr == end &&
           (m == 1 || m == 2 || m == 4 || m == 8 || m == 16) && b >= 2 && b <= 12;
    }
    if (!ok) {
      return SpecError(trimmed, absl::StrFormat("bad product-quantization name '%s' (want pqMxB "
                                                "with M in 1, 2, 4, 8, 16 channels per "
                                                "sub-vector and B in 2..12 bits)",
                                                name));
    }
    if (colon != std::string_view::npos) {
      return SpecError(trimmed, absl::StrFormat("%s takes no options", name));
    }
    spec.type = KvCodecType::kVector;
    spec.vector_dims = m;
    spec.bits = b;
    return spec;
  } else {
    for (const auto& g : kGgmlFormats) {
      if (name != g.name) continue;
      if (colon != std::string_view::npos) {
        return SpecError(trimmed, absl::StrFormat("%s is llama.cpp's fixed format and takes "
                                                  "no options",
                                                  name));
      }
      spec.type = KvCodecType::kGgml;
      spec.ggml = g.format;
      spec.bits = g.bits;
      spec.group_size = 32;
      spec.symmetric = g.format != GgmlKvFormat::kQ4_1;
      return spec;
    }
    return SpecError(trimmed,
                     absl::StrFormat("unknown codec name '%s' (want fp32, fp16, bf16, fp8, int8, "
                                     "int4, int3, int2, nl4, nl3, nl2, pqMxB, q8_0, q4_0, q4_1, "
                                     "iq4_nl or drop)",
                                     name));
  }
  const bool is_codebook = spec.type == KvCodecType::kCodebook;
  bool have_table = false;

  bool have_gran = false, have_sym = false, have_clip = false, have_out = false;
  std::string_view rest =
      colon == std::string_view::npos ? std::string_view() : all.substr(colon + 1);
  if (colon != std::string_view::npos && rest.empty()) {
    return SpecError(trimmed, "empty option after ':'");
  }
  while (colon != std::string_view::npos && !rest.empty()) {
    const size_t next = rest.find(':');
    const std::string_view opt = rest.substr(0, next);
    rest = next == std::string_view::npos ? std::string_view() : rest.substr(next + 1);
    if (opt.empty() || (next != std::string_view::npos && rest.empty())) {
      return SpecError(trimmed, "empty option between ':'");
    }
    if (IsFloatType(spec.type)) {
      return SpecError(trimmed, absl::StrFormat("option '%s' makes no sense for %s (it takes "
                                                "no options)",
                                                opt, name));
    }
    const bool is_fp8 = spec.type == KvCodecType::kFp8E4M3;
    if (is_codebook && (opt == "nf" || opt == "log" || opt == "lloyd" ||
                        (opt.size() > 3 && opt.substr(0, 3) == "pow"))) {
      if (have_table) {
        return SpecError(trimmed, absl::StrFormat("option '%s' conflicts with an earlier "
                                                  "codebook option",
                                                  opt));
      }
      have_table = true;
      if (opt == "nf") {
        spec.codebook = KvCodebookKind::kNormalFloat;
      } else if (opt == "log") {
        spec.codebook = KvCodebookKind::kLog;
      } else if (opt == "lloyd") {
        spec.codebook = KvCodebookKind::kCalibrated;
      } else {
        absl::StatusOr<float> p = ParseFraction(trimmed, opt, opt.substr(3), "powX");
        if (!p.ok()) return p.status();
        spec.codebook = KvCodebookKind::kPower;
        spec.power = *p;
      }
    } else if (opt == "chan" || opt == "block" || opt == "static") {
      if (is_codebook && opt != "chan") {
        return SpecError(trimmed, absl::StrFormat("option '%s' makes no sense for a codebook "
                                                  "(its scales are per token group or per channel)",
                                                  opt));
      }
      if (is_fp8) {
        return SpecError(trimmed, absl::StrFormat("option '%s' makes no sense for fp8 (its "
                                                  "scales are per token group)",
                                                  opt));
      }
      if (have_gran) {
        return SpecError(trimmed, absl::StrFormat("option '%s' conflicts with an earlier "
                                                  "granularity option",
                                                  opt));
      }
      have_gran = true;
      spec.granularity = opt == "chan"    ? KvGranularity::kPerChannel
                         : opt == "block" ? KvGranularity::kPerBlock
                                          : KvGranularity::kStatic;
    } else if (opt == "sym" || opt == "asym") {
      if (is_fp8) {
        return SpecError(trimmed, absl::StrFormat("option '%s' makes no sense for fp8 (always "
                                                  "symmetric)",
                                                  opt));
      }
      if (have_sym) {
        return SpecError(trimmed, absl::StrFormat("option '%s' repeats or conflicts with an "
                                                  "earlier sym/asym",
                                                  opt));
      }
      have_sym = true;
      spec.symmetric = opt == "sym";
    } else if (opt.size() > 4 && opt.substr(0, 4) == "clip") {
      const std::string_view num = opt.substr(4);
      float v = 0.0f;
      const auto [end, ec] = std::from_chars(num.data(), num.data() + num.size(), v);
      if (ec != std::errc() || end != num.data() + num.size() || !std::isfinite(v) || !(v > 0.0f) ||
          v > 1.0f) {
        return SpecError(trimmed,
                         absl::StrFormat("bad clip '%s' (want clipX with 0 < X <= 1)", opt));
      }
      if (have_clip) return SpecError(trimmed, absl::StrFormat("option '%s' repeats clip", opt));
      have_clip = true;
      spec.clip = v;
    } else if (opt == "meanres") {
      if (spec.type != KvCodecType::kUniform && spec.type != KvCodecType::kCodebook) {
        return SpecError(trimmed, "option 'meanres' needs an integer or codebook codec");
      }
      if (spec.mean_residual) return SpecError(trimmed, "option 'meanres' repeats");
      spec.mean_residual = true;
    } else if (opt.size() > 4 && opt.substr(0, 4) == "keep") {
      const std::string_view num = opt.substr(4);
      int v = 0;
      const auto [end, ec] = std::from_chars(num.data(), num.data() + num.size(), v);
      if (ec != std::errc() || end != num.data() + num.size() || v < 1 || v > 32) {
        return SpecError(trimmed, absl::StrFormat("bad promoted-row count '%s' (want keepN with "
                                                  "1 <= N <= 32)",
                                                  opt));
      }
      if (spec.keep_rows > 0) return SpecError(trimmed, "option 'keep' repeats");
      spec.keep_rows = v;
    } else if (opt == "learnclip") {
      if (spec.type != KvCodecType::kUniform) {
        return SpecError(trimmed, "option 'learnclip' needs an integer codec (int8..int2)");
      }
      if (spec.learned_clip) return SpecError(trimmed, "option 'learnclip' repeats");
      spec.learned_clip = true;
    } else if (opt.size() > 4 && opt.substr(0, 4) == "rank") {
      if (is_fp8) return SpecError(trimmed, "option 'rank' needs an integer or codebook codec");
      const std::string_view num = opt.substr(4);
      int v = 0;
      const auto [end, ec] = std::from_chars(num.data(), num.data() + num.size(), v);
      if (ec != std::errc() || end != num.data() + num.size() || v < 1 || v > 16) {
        return SpecError(trimmed, absl::StrFormat("bad residual rank '%s' (want rankR with 1 <= "
                                                  "R <= 16)",
                                                  opt));
      }
      if (spec.rank > 0)
        return SpecError(trimmed, absl::StrFormat("option '%s' repeats rank", opt));
      spec.rank = v;
    } else if (opt.size() > 3 && opt.substr(0, 3) == "out") {
      if (is_fp8 || is_codebook) {
        return SpecError(trimmed, "option 'out' needs an integer codec (int8..int2)");
      }
      const std::string_view num = opt.substr(3);
      float v = 0.0f;
      const auto [end, ec] = std::from_chars(num.data(), num.data() + num.size(), v);
      if (ec != std::errc() || end != num.data() + num.size() || !std::isfinite(v) || !(v > 0.0f) ||
          v > 10.0f) {
        return SpecError(trimmed, absl::StrFormat("bad outlier share '%s' (want outX with X a "
                                                  "percentage, 0 < X <= 10)",
                                                  opt));
      }
      if (have_out) return SpecError(trimmed, absl::StrFormat("option '%s' repeats out", opt));
      have_out = true;
      spec.outlier_pct = v;
    } else if (opt.size() > 1 && opt[0] == 'g' &&
               std::isdigit(static_cast<unsigned char>(opt[1]))) {
      const std::string_view num = opt.substr(1);
      int v = 0;
      const auto [end, ec] = std::from_chars(num.data(), num.data() + num.size(), v);
      if (ec != std::errc() || end != num.data() + num.size() || v < 1 || v > kMaxGroup) {
        return SpecError(trimmed, absl::StrFormat("bad group size '%s' (want gN with 1 <= N <= "
                                                  "%d)",
                                                  opt, kMaxGroup));
      }
      if (have_gran) {
        return SpecError(trimmed, absl::StrFormat("option '%s' conflicts with an earlier "
                                                  "granularity option",
                                                  opt));
      }
      have_gran = true;
      spec.granularity = KvGranularity::kPerTokenGroup;
      spec.group_size = v;
    } else if (opt == "g") {
      return SpecError(trimmed, "bad group size 'g' (want gN with N >= 1)");
    } else {
      if (is_codebook) {
        return SpecError(trimmed,
                         absl::StrFormat("unknown option '%s' (want gN, chan, sym, asym, "
                                         "clipX, rankR, meanres, keepN, nf, powX, log or lloyd)",
                                         opt));
      }
      return SpecError(
          trimmed,
          absl::StrFormat("unknown option '%s' (want gN, chan, block, "
                          "static, sym, asym, clipX, outX, rankR, learnclip, meanres or keepN)",
                          opt));
    }
  }
  return spec;
}

absl::StatusOr<std::unique_ptr<KvCodec>> KvCodec::Create(const KvCodecConfig& config) {
  const KvCodecSpec& spec = config.spec;
  const int64_t head_dim = config.head_dim;
  const int64_t block_tokens = config.block_tokens;
  const std::string name = spec.ToString();
  auto err = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrFormat("KV codec %s: %s", name, what));
  };
  if (head_dim < 1 || head_dim > (1 << 16)) {
    return err(absl::StrFormat("head_dim %d out of range [1, 65536]", head_dim));
  }
  if (block_tokens < 1 || block_tokens > (1 << 20)) {
    return err(absl::StrFormat("block_tokens %d out of range [1, 1048576]", block_tokens));
  }
  if (spec.keep_rows > 0) {
    if (spec.keep_rows > 32 || spec.keep_rows >= block_tokens || block_tokens > 65535 ||
        IsFloatType(spec.type) || spec.type == KvCodecType::kGgml ||
        spec.type == KvCodecType::kVector) {
      return err(absl::StrFormat(
          "keep%d needs an integer, fp8 or codebook codec and fewer kept rows than the %d "
          "tokens of a block (at most 32)",
          spec.keep_rows, block_tokens));
    }
    KvCodecConfig inner = config;
    inner.spec.keep_rows = 0;
    if (spec.type == KvCodecType::kDrop) {
      return kv_codec_internal::MakeKeepRowsCodec(
          spec, head_dim, block_tokens,
          kv_codec_internal::MakeDropCodec(inner.spec, head_dim, block_tokens));
    }
    absl::StatusOr<std::unique_ptr<KvCodec>> in = Create(inner);
    if (!in.ok()) return in.status();
    return kv_codec_internal::MakeKeepRowsCodec(spec, head_dim, block_tokens, std::move(*in));
  }
  if (spec.type == KvCodecType::kDrop) return err("drop needs keepN (the rows it holds)");
  if (IsFloatType(spec.type))
    return kv_codec_internal::MakeFloatCodec(spec, head_dim, block_tokens);
  if (spec.type == KvCodecType::kGgml) {
    if (head_dim % 32 != 0) {
      return err(
          absl::StrFormat("llama.cpp's formats use blocks of 32 values, so head_dim "
                          "must be a multiple of 32 (got %d)",
                          head_dim));
    }
    return kv_codec_internal::MakeGgmlCodec(spec, head_dim, block_tokens);
  }
  if (spec.type == KvCodecType::kVector) {
    if (spec.vector_dims < 1 || spec.vector_dims > 16 || head_dim % spec.vector_dims != 0 ||
        spec.bits < 2 || spec.bits > 12) {
      return err(
          absl::StrFormat("sub-vectors of %d channels must divide head_dim %d (and bits "
                          "%d be in 2..12)",
                          spec.vector_dims, head_dim, spec.bits));
    }
    return kv_codec_internal::MakeVectorCodec(config);
  }
  if (spec.type != KvCodecType::kFp8E4M3 && spec.type != KvCodecType::kUniform &&
      spec.type != KvCodecType::kCodebook) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KV codec: unknown codec type %d", static_cast<int>(spec.type)));
  }
  if (!(spec.clip > 0.0f && spec.clip <= 1.0f)) {
    return err(absl::StrFormat("clip %g not in (0, 1]", spec.clip));
  }
  if (spec.learned_clip) {
    if (spec.type != KvCodecType::kUniform || spec.granularity != KvGranularity::kPerTokenGroup) {
      return err("learnclip needs an integer codec with per-token groups (gN)");
    }
    if (static_cast<int>(config.clip_model.size()) != kClipFeatures) {
      return err(absl::StrFormat(
          "learnclip needs the layer's clip model (%d weights, got %d); make it with `quantkv "
          "calibrate --kv %s` and pass the file as --kv @FILE",
          kClipFeatures, config.clip_model.size(), name));
    }
    for (float w : config.clip_model) {
      if (!std::isfinite(w)) return err("clip model weight is not finite");
    }
  }
  if (spec.mean_residual) {
    if (spec.rank != 0 || spec.outlier_pct > 0.0f) {
      return err("meanres cannot be combined with rank or out");
    }
    KvCodecConfig inner = config;
    inner.spec.mean_residual = false;
    absl::StatusOr<std::unique_ptr<KvCodec>> in = Create(inner);
    if (!in.ok()) return in.status();
    return kv_codec_internal::MakeMeanResidualCodec(spec, head_dim, block_tokens, std::move(*in));
  }
  if (spec.rank != 0) {
    if (spec.rank < 1 || spec.rank > 16) return err("rank must be in [1, 16]");
    if (spec.rank > std::min(head_dim, block_tokens)) {
      return err(absl::StrFormat("residual rank %d exceeds min(head_dim %d, block_tokens %d)",
                                 spec.rank, head_dim, block_tokens));
    }
    if (spec.outlier_pct > 0.0f) return err("rank and out cannot be combined");
    KvCodecConfig inner = config;
    inner.spec.rank = 0;
    absl::StatusOr<std::unique_ptr<KvCodec>> in = Create(inner);
    if (!in.ok()) return in.status();
    return kv_codec_internal::MakeLowRankCodec(spec, head_dim, block_tokens, std::move(*in));
  }
  switch (spec.granularity) {
    case KvGranularity::kPerTokenGroup:
      if (spec.group_size < 1 || head_dim % spec.group_size != 0) {
        return err(absl::StrFormat("group size %d does not divide head_dim %d", spec.group_size,
                                   head_dim));
      }
      break;
    case KvGranularity::kPerChannel:
    case KvGranularity::kPerBlock:
      break;
    case KvGranularity::kStatic: {
      const bool need_min = !spec.symmetric;
      if (static_cast<int64_t>(config.static_scale.size()) != head_dim ||
          (need_min && static_cast<int64_t>(config.static_min.size()) != head_dim)) {
        return err(absl::StrFormat(
            "static scales need %d calibrated scale%s per head (got %d scales, %d minima); make "
            "a calibration file with `quantkv calibrate` and pass it as --kv @FILE",
            head_dim, need_min ? "s and minima" : "s", config.static_scale.size(),
            config.static_min.size()));
      }
      for (int64_t c = 0; c < head_dim; ++c) {
        const float sc = config.static_scale[c];
        if (!std::isfinite(sc) || sc < 0.0f || (need_min && !std::isfinite(config.static_min[c]))) {
          return err(absl::StrFormat("static scale of channel %d is not finite and >= 0", c));
        }
      }
      break;
    }
    default:
      return err("unknown granularity");
  }
  if (spec.type == KvCodecType::kCodebook) {
    if (spec.granularity != KvGranularity::kPerTokenGroup &&
        spec.granularity != KvGranularity::kPerChannel) {
      return err("codebooks have per-token-group or per-channel scales only");
    }
    if (spec.bits != 4 && spec.bits != 3 && spec.bits != 2) {
      return err(absl::StrFormat("bits %d not supported (want 4, 3 or 2)", spec.bits));
    }
    if (!(spec.power > 0.0f && spec.power <= 1.0f)) return err("pow must be in (0, 1]");
    return kv_codec_internal::MakeCodebookCodec(config);
  }
  if (spec.type == KvCodecType::kFp8E4M3) {
    if (spec.granularity != KvGranularity::kPerTokenGroup) {
      return err("fp8 has per-token-group scales only");
    }
    return kv_codec_internal::MakeFp8Codec(spec, head_dim, block_tokens);
  }
  if (spec.bits != 8 && spec.bits != 4 && spec.bits != 3 && spec.bits != 2) {
    return err(absl::StrFormat("bits %d not supported (want 8, 4, 3 or 2)", spec.bits));
  }
  const int pack = spec.bits == 8 ? 1 : spec.bits == 4 ? 2 : spec.bits == 2 ? 4 : 8;
  if (head_dim % pack != 0) {
    return err(
        absl::StrFormat("%d-bit codes pack %d per unit, so head_dim must be a multiple "
                        "of %d (got %d)",
                        spec.bits, pack, pack, head_dim));
  }
  if (spec.outlier_pct > 0.0f) {
    if (!(spec.outlier_pct <= 10.0f)) return err("outlier share must be in (0, 10] percent");
    if (head_dim * block_tokens > 65536) {
      return err(absl::StrFormat("outliers need block_tokens * head_dim <= 65536 (got %d)",
                                 head_dim * block_tokens));
    }
    KvCodecConfig dense = config;
    dense.spec.outlier_pct = 0.0f;
    return kv_codec_internal::MakeOutlierCodec(spec, head_dim, block_tokens,
                                               kv_codec_internal::MakeUniformCodec(dense));
  }
  return kv_codec_internal::MakeUniformCodec(config);
}

}  // namespace quantkv::kernels
